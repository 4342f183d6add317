"""LyCORIS 4.1.3 is the oracle: its own loader applies the files oftmerge reads and writes.

* the reader: for diag-oft (plain, clamp active, rescaled, Conv2d) and BOFT, oftmerge's fold of
  the effective generator equals the weight LyCORIS's ``merge_to`` computes;
* the merge: LyCORIS loads every merged file, and its weights equal oftmerge's fold of the merge
  and an independent implementation of the paper's Eq. 7-8 on the clamped generators;
* one input merged alone (any format, any scale 1) computes the input's function; ``scale``
  is the fractional rotation ``cayley(s Q)``.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from oftmerge.errors import IncompatibleAdaptersError
from oftmerge.formats.diffusion import read_diffusion_adapter
from oftmerge.kernels.fold import fold_rescaled
from oftmerge.ops.diffusion import convert_diffusion, merge_diffusion

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Tiny(nn.Module):
    """Linear layers of several widths (LyCORIS picks other block sizes for them) and a 3x3 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 32)
        self.b = nn.Linear(32, 64)
        self.c = nn.Conv2d(8, 16, 3)


def _base() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return Tiny().state_dict()


def _make(tmp: Path, algo: str, seed: int, *, amount: float = 0.05, **kwargs: object) -> Path:
    torch.manual_seed(0)
    model = Tiny()
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1, algo=algo, **kwargs)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.loras:
            mod.oft_blocks.copy_(torch.randn(mod.oft_blocks.shape, generator=g) * amount)
            if getattr(mod, "rescaled", False):
                mod.rescale.copy_(1 + 0.1 * torch.randn(mod.rescale.shape, generator=g))
    path = tmp / f"{algo}-{seed}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path


def _lycoris_weights(path: Path) -> dict[str, torch.Tensor]:
    """The base's weights after LyCORIS's own loader merged ``path`` into them (multiplier 1)."""
    torch.manual_seed(0)
    model = Tiny()
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(path), model)
    assert len(net.loras) == 3, "LyCORIS did not load every module of the file"
    net.merge_to()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _oftmerge_weights(path: Path) -> dict[str, torch.Tensor]:
    a = read_diffusion_adapter(path)
    base = _base()
    out = dict(base)
    for name, mod in a.modules.items():
        key = name.removeprefix("lycoris_") + ".weight"
        rotation = a.rotation_map.rotation(a.generator(name))
        out[key] = fold_rescaled(base[key], rotation, mod.spec(a.side), a.rescale(name))
    return out


def _max_diff(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> float:
    return max(float((x[k] - y[k]).abs().max()) for k in x)


VARIANTS = [
    pytest.param("diag-oft", {}, id="diag-oft"),
    pytest.param("diag-oft", {"constraint": 1e-3}, id="diag-oft-constrained"),
    pytest.param("diag-oft", {"rescaled": True}, id="diag-oft-rescaled"),
    pytest.param("boft", {}, id="boft"),
    pytest.param("boft", {"rescaled": True, "constraint": 1e-2}, id="boft-rescaled-constrained"),
]


@pytest.mark.parametrize(("algo", "kwargs"), VARIANTS)
def test_reader_equals_lycoris(tmp_path: Path, algo: str, kwargs: dict) -> None:
    path = _make(tmp_path, algo, 1, **kwargs)
    a = read_diffusion_adapter(path)
    assert a.format == "lycoris" and a.algo == algo
    if "constraint" in kwargs:  # the clamp must be active for the test to mean anything
        raw = {n: a.raw(n) for n in a.modules}
        assert all(float((r - r.transpose(-1, -2)).norm()) > a.modules[n].constraint for n, r in raw.items())  # type: ignore[operator]
    if algo == "boft":
        assert max(m.stages for m in a.modules.values()) >= 3
    sizes = {m.block_size for m in a.modules.values()}
    assert sizes, "no modules"
    assert _max_diff(_oftmerge_weights(path), _lycoris_weights(path)) < 1e-5


def _eq78(paths: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The paper's Eq. 7-8 on LyCORIS's effective generators, written from the spec (not from oftmerge's kernels)."""
    from safetensors.torch import load_file

    files = [load_file(str(p)) for p in paths]
    w = weights or [1.0] * len(files)
    base = _base()
    out = dict(base)
    for name in ("a", "b", "c"):
        qs, scales = [], []
        for f in files:
            blocks = f[f"lycoris_{name}.oft_blocks"].double()
            q = blocks - blocks.transpose(-1, -2)
            alpha = float(f[f"lycoris_{name}.alpha"])
            bound = alpha * blocks.shape[0] * blocks.shape[1]
            if bound > 0 and float(q.norm()) + 1e-8 > bound:
                q = q * bound / (float(q.norm()) + 1e-8)
            qs.append(q)
            s = f.get(f"lycoris_{name}.rescale")
            scales.append(torch.ones(blocks.shape[0] * blocks.shape[1], dtype=torch.float64) if s is None else s.double().reshape(-1))
        total = sum(wi * q for wi, q in zip(w, qs))
        c = sum(wi * float(q.norm()) for wi, q in zip(w, qs)) / sum(w) / float(total.norm())  # type: ignore[union-attr]
        q = c * total
        eye = torch.eye(q.shape[-1], dtype=torch.float64)
        rot = torch.linalg.solve(eye + q, eye - q)  # (I + Q)^-1 (I - Q): what LyCORIS applies to each block of rows
        weight = base[f"{name}.weight"].double()
        rows = weight.reshape(q.shape[0], q.shape[1], -1)
        folded = torch.einsum("kij,kjc->kic", rot, rows).reshape(weight.shape)
        geo = torch.exp(sum(wi * s.log() for wi, s in zip(w, scales)) / sum(w))
        out[f"{name}.weight"] = (folded * geo.reshape(-1, *([1] * (weight.dim() - 1)))).float()
    return out


def test_merge_loads_in_lycoris_and_equals_eq78(tmp_path: Path) -> None:
    paths = [_make(tmp_path, "diag-oft", 1, rescaled=True), _make(tmp_path, "diag-oft", 2, constraint=2e-3), _make(tmp_path, "diag-oft", 3)]
    out = tmp_path / "merged.safetensors"
    result = merge_diffusion(paths, out=out)
    assert result.saved_to == out and out.is_file()
    lyc = _lycoris_weights(out)
    assert _max_diff(_oftmerge_weights(out), lyc) < 1e-5
    assert _max_diff(_eq78(paths), lyc) < 1e-5
    meta = json.loads(read_diffusion_adapter(out).metadata["oftmerge"])
    assert [i["sha256"] for i in meta["inputs"]] and meta["method"] == "orthomerge" and meta["rescale"] == "geometric"


def test_weighted_merge_equals_eq78(tmp_path: Path) -> None:
    paths = [_make(tmp_path, "diag-oft", 4, rescaled=True), _make(tmp_path, "diag-oft", 5, rescaled=True)]
    out = tmp_path / "weighted.safetensors"
    merge_diffusion(paths, weights=[3.0, 1.0], out=out)
    assert _max_diff(_eq78(paths, [3.0, 1.0]), _lycoris_weights(out)) < 1e-5


@pytest.mark.parametrize(("algo", "kwargs"), VARIANTS[:3])
def test_single_input_reproduces_its_function(tmp_path: Path, algo: str, kwargs: dict) -> None:
    src = _make(tmp_path, algo, 7, **kwargs)
    out = tmp_path / "alone.safetensors"
    merge_diffusion([src], out=out)
    assert _max_diff(_lycoris_weights(out), _lycoris_weights(src)) < 1e-6


def test_scale_is_a_fractional_rotation(tmp_path: Path) -> None:
    src = _make(tmp_path, "diag-oft", 8)
    half = merge_diffusion([src], scale=0.5)
    a = read_diffusion_adapter(src)
    for m in half.merged:
        assert torch.allclose(m.generator, 0.5 * a.generator(m.name), atol=1e-12)
    # cayley(Q/2) applied twice is cayley(Q)'s rotation only approximately; the generator is what is exact:
    twice = merge_diffusion([src], scale=2.0)
    assert all(torch.allclose(t.generator, 2 * a.generator(t.name), atol=1e-12) for t in twice.merged)


def test_boft_merge_refused_with_fold_advice(tmp_path: Path) -> None:
    paths = [_make(tmp_path, "boft", 1), _make(tmp_path, "boft", 2)]
    with pytest.raises(Exception, match="Fold it into the model"):
        merge_diffusion(paths, out=tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


def _renamed(src: Path, dst: Path, prefix: str) -> Path:
    """A LyCORIS file as ``lycoris.kohya`` names U-Net modules (``lora_unet_``)."""
    from safetensors.torch import load_file, save_file

    save_file({k.replace("lycoris_", prefix, 1): v for k, v in load_file(str(src)).items()}, str(dst))
    return dst


def test_convert_lycoris_kohya_round_trip_is_exact(tmp_path: Path) -> None:
    src = _renamed(_make(tmp_path, "diag-oft", 9, constraint=1e-3), tmp_path / "unet.safetensors", "lora_unet_")
    kohya = convert_diffusion(src, tmp_path / "kohya.safetensors", to="kohya").saved_to
    assert kohya is not None
    k = read_diffusion_adapter(kohya)
    assert k.format == "kohya" and len({m.alpha for m in k.modules.values()}) == 1
    back = convert_diffusion(kohya, tmp_path / "back.safetensors", to="lycoris").saved_to
    assert back is not None
    base = _base()
    a, b = read_diffusion_adapter(src), read_diffusion_adapter(back)
    for name in a.modules:  # the same function (the grid may differ: kohya stores one block count for all modules)
        key = name.removeprefix("lora_unet_") + ".weight"
        folds = [fold_rescaled(base[key], f.rotation_map.rotation(f.generator(name)), f.modules[name].spec("output")) for f in (a, k, b)]
        assert all(float((x - folds[0]).abs().max()) < 1e-6 for x in folds[1:])
        assert b.modules[name].block_size <= b.modules[name].num_blocks  # a grid LyCORIS loads


def test_kohya_writer_regrids_to_one_block_count(tmp_path: Path) -> None:
    src = _renamed(_make(tmp_path, "diag-oft", 10), tmp_path / "unet.safetensors", "lora_unet_")
    a = read_diffusion_adapter(src)
    assert len({m.num_blocks for m in a.modules.values()}) > 1  # the LyCORIS file mixes block counts
    k = read_diffusion_adapter(convert_diffusion(src, tmp_path / "k.safetensors", to="kohya").saved_to)  # type: ignore[arg-type]
    assert len({m.num_blocks for m in k.modules.values()}) == 1
    base = _base()
    for name, mod in a.modules.items():
        key = name.removeprefix("lora_unet_") + ".weight"
        x = fold_rescaled(base[key], a.rotation_map.rotation(a.generator(name)), mod.spec("output"))
        y = fold_rescaled(base[key], k.rotation_map.rotation(k.generator(name)), k.modules[name].spec("output"))
        assert float((x - y).abs().max()) < 1e-6


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oftmerge", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr, proc.stderr


def test_bad_inputs_give_one_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    a = _make(tmp_path, "diag-oft", 11)
    k = convert_diffusion(_renamed(a, tmp_path / "u.safetensors", "lora_unet_"), tmp_path / "k.safetensors", to="kohya").saved_to
    assert k is not None
    _one_line_error(_cli("merge", a, k, "-o", "m.safetensors", cwd=tmp_path), "pass --to FORMAT")
    fewer = tmp_path / "fewer.safetensors"
    save_file({n: t for n, t in load_file(str(a)).items() if not n.startswith("lycoris_c.")}, str(fewer))
    _one_line_error(_cli("merge", a, fewer, "-o", "m.safetensors", cwd=tmp_path), "adapts other modules")
    unknown = tmp_path / "unknown.safetensors"
    save_file({**load_file(str(a)), "lycoris_a.lora_down.weight": torch.zeros(2, 2)}, str(unknown))
    _one_line_error(_cli("merge", a, unknown, "-o", "m.safetensors", cwd=tmp_path), "unknown tensor")
    nonsquare = tmp_path / "nonsquare.safetensors"
    save_file({**load_file(str(a)), "lycoris_a.oft_blocks": torch.zeros(8, 4, 3)}, str(nonsquare))
    _one_line_error(_cli("inspect", nonsquare, cwd=tmp_path), "non-square")
    assert not (tmp_path / "m.safetensors").exists()


def test_output_is_atomic_and_guarded(tmp_path: Path) -> None:
    a, b = _make(tmp_path, "diag-oft", 12), _make(tmp_path, "diag-oft", 13)
    before = a.read_bytes()
    _one_line_error(_cli("merge", a, b, "-o", a, "--overwrite", cwd=tmp_path), "would replace")
    assert a.read_bytes() == before
    out = tmp_path / "m.safetensors"
    assert _cli("merge", a, b, "-o", out, cwd=tmp_path).returncode == 0
    _one_line_error(_cli("merge", a, b, "-o", out, cwd=tmp_path), "already exists")
    assert _cli("merge", a, b, "-o", out, "--weights", "1,2", "--overwrite", cwd=tmp_path).returncode == 0
    someone = tmp_path / "theirs.safetensors"
    someone.write_bytes(before)
    _one_line_error(_cli("merge", a, b, "-o", someone, "--overwrite", cwd=tmp_path), "not an earlier oftmerge output")
    assert someone.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_inspect_reports_clamp_and_cosines(tmp_path: Path) -> None:
    a, b = _make(tmp_path, "diag-oft", 14, constraint=1e-3), _make(tmp_path, "diag-oft", 14, rescaled=True)
    proc = _cli("inspect", a, b, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    mods = report["files"][0]["modules"]
    assert all(m["clamped"] for m in mods) and all(math.isclose(m["q_norm"], m["constraint"], rel_tol=1e-6) for m in mods)
    assert report["files"][1]["modules"][0]["rescale"] is not None
    assert report["cosine"][0][0] == pytest.approx(1.0) and -1.0 <= report["cosine"][0][1] <= 1.0


def _module_folds(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    a = read_diffusion_adapter(path)
    base = _base()
    out = {}
    for name, m in a.modules.items():
        w = base[name.removeprefix(prefix) + ".weight"]
        out[name] = fold_rescaled(w, a.fold_rotation(name, w), m.spec(a.side), a.rescale(name))
    return out


def test_mixed_formats_merge_with_to(tmp_path: Path) -> None:
    l1 = _renamed(_make(tmp_path, "diag-oft", 15), tmp_path / "l1.safetensors", "lora_unet_")
    l2 = _renamed(_make(tmp_path, "diag-oft", 16, constraint=2e-3), tmp_path / "l2.safetensors", "lora_unet_")
    k2 = convert_diffusion(l2, tmp_path / "k2.safetensors", to="kohya").saved_to
    assert k2 is not None
    direct = merge_diffusion([l1, l2], out=tmp_path / "direct.safetensors")
    mixed = merge_diffusion([l1, k2], to="lycoris", out=tmp_path / "mixed.safetensors")
    assert mixed.format == "lycoris" and direct.saved_to and mixed.saved_to
    x, y = _module_folds(direct.saved_to, "lora_unet_"), _module_folds(mixed.saved_to, "lora_unet_")
    assert max(float((x[n] - y[n]).abs().max()) for n in x) < 1e-6


@pytest.mark.parametrize("fmt", ["kohya", "onetrainer"])
def test_single_input_reproduces_its_function_in_other_formats(tmp_path: Path, fmt: str) -> None:
    if fmt == "kohya":
        src = convert_diffusion(_renamed(_make(tmp_path, "diag-oft", 17, constraint=1e-3), tmp_path / "u.safetensors", "lora_unet_"),
                                tmp_path / "src.safetensors", to="kohya").saved_to  # fmt: skip
    else:
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(18)
        src = tmp_path / "src.safetensors"
        save_file({"lora_unet_a.oft_R.weight": torch.randn(6, 10, generator=g) * 0.05, "lora_unet_b.oft_R.weight": torch.randn(8, 6, generator=g) * 0.05,
                   "lora_unet_b.oft_R.scaled_oft": torch.tensor(True)}, str(src))  # fmt: skip
    assert src is not None
    out = merge_diffusion([src], out=tmp_path / "alone.safetensors").saved_to
    assert out is not None and read_diffusion_adapter(out).format == fmt
    a, b = read_diffusion_adapter(src), read_diffusion_adapter(out)
    for name in a.modules:
        assert torch.allclose(a.generator(name), b.generator(name), atol=1e-7)


def test_written_alpha_is_above_every_loaders_clamp(tmp_path: Path) -> None:
    """LyCORIS / A1111 clamp ||Q|| to alpha * out, ComfyUI to alpha: the written alpha must exceed ||Q|| of the stored blocks."""
    from safetensors.torch import load_file

    out = tmp_path / "m.safetensors"
    merge_diffusion([_make(tmp_path, "diag-oft", 19, amount=0.5), _make(tmp_path, "diag-oft", 20, amount=0.5)], out=out)
    tensors = load_file(str(out))
    for key, blocks in tensors.items():
        if key.endswith(".oft_blocks"):
            q = blocks.double() - blocks.double().transpose(-1, -2)
            alpha = float(tensors[key.replace(".oft_blocks", ".alpha")])
            assert float(q.norm()) < alpha < float(q.norm()) * 1.001 + 1e-5


BUNDLED = Path(__file__).resolve().parents[2] / "adapters" / "diffusion"


@pytest.mark.skipif(not (BUNDLED / "base" / "model_index.json").is_file(), reason="bundled diffusion adapters missing")
def test_kohya_style_merge_loads_in_lycoris_kohya(tmp_path: Path) -> None:
    """A merged ``lora_unet_`` / ``lora_te_`` file (what sd-scripts saves with lycoris.kohya) loads in LyCORIS's kohya network
    on the bundled pipeline, and its weights equal oftmerge's fold of the same file into the pipeline directory."""
    from diffusers import UNet2DConditionModel
    from lycoris.kohya import PRESET, LycorisNetworkKohya, create_network_from_weights
    from transformers import CLIPTextModel

    from oftmerge.ops.diffusion_fold import fold_diffusion

    src = BUNDLED / "lycoris-kohya-diag-oft-diagonals.safetensors"
    merged = merge_diffusion([src], scale=0.5, out=tmp_path / "half.safetensors")
    assert merged.saved_to is not None
    fold_diffusion(merged.saved_to, BUNDLED / "base", tmp_path / "folded")
    unet = UNet2DConditionModel.from_pretrained(str(BUNDLED / "base" / "unet")).eval()
    te = CLIPTextModel.from_pretrained(str(BUNDLED / "base" / "text_encoder")).eval()
    LycorisNetworkKohya.apply_preset(PRESET["attn-mlp"])  # the default preset trips on diffusers' time embedding (a LyCORIS bug)
    net, weights = create_network_from_weights(1.0, str(merged.saved_to), None, te, unet)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len(merged.modules)
    net.merge_to(te, unet, weights, torch.float32, "cpu")
    ours_unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "folded" / "unet")).state_dict()
    ours_te = CLIPTextModel.from_pretrained(str(tmp_path / "folded" / "text_encoder")).state_dict()
    assert max(float((v - ours_unet[k]).abs().max()) for k, v in unet.state_dict().items()) < 1e-5
    assert max(float((v - ours_te[k]).abs().max()) for k, v in te.state_dict().items()) < 1e-5


_KILLER = r"""
import os, signal, sys
point, n = sys.argv[1], int(sys.argv[2])
count = [0]
orig = getattr(os, point)
def wrapper(*a, **k):
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
setattr(os, point, wrapper)
from oftmerge.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(("point", "n", "overwrite"), [("fsync", 1, False), ("fsync", 2, True), ("link", 1, False), ("replace", 1, True)])
def test_killed_file_output_leaves_old_or_nothing(tmp_path: Path, point: str, n: int, overwrite: bool) -> None:
    a, b = _make(tmp_path, "diag-oft", 21), _make(tmp_path, "diag-oft", 22)
    out = tmp_path / "out.safetensors"
    old = None
    if overwrite:
        assert _cli("merge", a, b, "-o", out, "--weights", "1,3", cwd=tmp_path).returncode == 0
        old = out.read_bytes()
    args = ["merge", str(a), str(b), "-o", str(out), "-q"] + (["--overwrite"] if overwrite else [])
    proc = subprocess.run([sys.executable, "-c", _KILLER, point, str(n), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)  # killed at that point
    if old is None:
        assert not out.exists()  # nothing that looks complete
    else:
        assert out.read_bytes() == old  # the old output, whole
    # the next run recovers: it writes (or refuses over the old output) and leaves nothing behind
    again = _cli("merge", a, b, "-o", out, "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert read_diffusion_adapter(out).modules
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.safetensors.")]


def test_union_merges_each_module_among_the_inputs_that_adapt_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    full, other = _make(tmp_path, "diag-oft", 23), _make(tmp_path, "diag-oft", 24)
    fewer = tmp_path / "fewer.safetensors"
    save_file({k: v for k, v in load_file(str(other)).items() if not k.startswith("lycoris_c.")}, str(fewer))
    with pytest.raises(IncompatibleAdaptersError, match="--union"):
        merge_diffusion([full, fewer])
    result = merge_diffusion([full, fewer], union=True)
    a, both = read_diffusion_adapter(full), merge_diffusion([full, other])
    by_name = {m.name: m.generator for m in result.merged}
    assert torch.equal(by_name["lycoris_c"], a.generator("lycoris_c"))  # adapted by one input: kept as it is
    for m in both.merged:
        if m.name != "lycoris_c":
            assert torch.allclose(by_name[m.name], m.generator, atol=1e-12)
