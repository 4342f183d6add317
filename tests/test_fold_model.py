"""Folding OFT adapters into full models: the streaming shard writer, equality with PEFT's
merge_and_unload on tiny real transformers models and on golden fixtures, dtypes, tied embeddings,
and crash safety."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oftmerge.errors import OftMergeError, OutputExistsError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.io import atomic_directory
from oftmerge.formats.shards import ShardedWriter, TensorInfo, parse_size, write_model


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    out = {f"w{i}": torch.randn(10 + i, 7, generator=g).to(dtypes[i % 3]) for i in range(9)}
    out.update(ids=torch.arange(5), mask=torch.tensor([True, False]), scalar=torch.tensor(3.0), empty=torch.empty(0, 3))
    return out


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys_in_file_order()}


# -- ShardedWriter -----------------------------------------------------------------------------------


def test_sharded_writer_buffered_and_planned_write_the_same_bytes(tmp_path):
    tensors = _mixed_tensors()
    layout = [TensorInfo(k, {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL"}[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    for mode, lay in (("buffered", None), ("planned", layout)):
        (tmp_path / mode).mkdir()
        writer = ShardedWriter(tmp_path / mode, max_shard_bytes=300, layout=lay)
        for k, v in tensors.items():
            writer.add(k, v)
        index = writer.close()
    assert _digests(tmp_path / "buffered") == _digests(tmp_path / "planned")
    names = sorted(p.name for p in (tmp_path / "buffered").iterdir())
    n = len(names) - 1
    assert names[-1] == "model.safetensors.index.json" and n > 2
    assert names[:-1] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert json.loads((tmp_path / "buffered" / "model.safetensors.index.json").read_text()) == index
    got = _read_all(tmp_path / "buffered")
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    for shard in (tmp_path / "buffered").glob("*.safetensors"):  # every shard within the limit unless one tensor is larger
        sizes = [v.numel() * v.element_size() for v in load_file(shard).values()]
        assert sum(sizes) <= 300 or len(sizes) == 1


def test_sharded_writer_one_shard_is_model_safetensors_without_index(tmp_path):
    tensors = _mixed_tensors()
    with ShardedWriter(tmp_path) as writer:
        for k, v in tensors.items():
            writer.add(k, v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_writer_rejects_misuse(tmp_path):
    writer = ShardedWriter(tmp_path, layout=[TensorInfo("a", "F32", (2,))])
    with pytest.raises(OftMergeError, match=r"tensor 'b' \(F32, shape \[2\]\) does not match the layout, which expects 'a'"):
        writer.add("b", torch.zeros(2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = ShardedWriter(tmp_path)
    writer.add("a", torch.zeros(2))
    with pytest.raises(OftMergeError, match="tensor 'a' added twice"):
        writer.add("a", torch.zeros(2))
    with pytest.raises(OftMergeError, match=r"shard size '5 parsecs'"):
        parse_size("5 parsecs")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(123) == 123


def test_write_model_streams_copies_raw_and_keeps_files(tmp_path):
    base = tmp_path / "base"
    tensors = _mixed_tensors()
    with atomic_directory(base) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=400)
        for k, v in tensors.items():
            writer.add(k, v)
        writer.close()
        (tmp / "config.json").write_text('{"model_type": "toy"}')
        (tmp / "tokenizer.json").write_text("{}")
        (tmp / "pytorch_model.bin").write_bytes(b"not copied")
    seen = []

    def double(name, t):
        seen.append(name)
        return t * 2 if name == "w1" else None

    out = write_model(base, tmp_path / "out", double, shard_size=300, only={"w1", "w2"})
    assert seen == ["w1", "w2"]
    got = _read_all(out)
    assert list(got) == list(tensors)  # the base's order
    assert torch.equal(got["w1"], tensors["w1"] * 2)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors if k != "w1")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json"} <= files and "pytorch_model.bin" not in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    with pytest.raises(OutputExistsError):
        write_model(base, out, double)
    again = write_model(base, tmp_path / "again", double, shard_size=300, only={"w1", "w2"})
    assert _digests(again) == _digests(out)
    with pytest.raises(OftMergeError, match=r"tensor_fn changed 'w1' from torch.bfloat16 \[11, 7\] to torch.float32"):
        write_model(base, tmp_path / "bad", lambda n, t: t.float(), only={"w1"})
    assert not (tmp_path / "bad").exists()


def test_write_model_reports_a_truncated_base_and_writes_nothing(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    writer = ShardedWriter(base)
    for k, v in _mixed_tensors().items():
        writer.add(k, v)
    writer.close()
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-20])  # e.g. an interrupted download
    with pytest.raises(OftMergeError, match=r"model.safetensors: not a readable safetensors file .*file not fully covered"):
        write_model(base, tmp_path / "out", lambda n, t: t + 1 if t.is_floating_point() else t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# -- tiny real Llama models -----------------------------------------------------------------------

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CASES = sorted(p for p in GOLDEN.glob("peft-*/*") if (p / "adapter").is_dir())
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]
IDS = torch.tensor([[1, 5, 77, 299, 3, 150, 42, 8], [9, 0, 250, 13, 64, 199, 7, 101]])


def _llama_config(**kw):
    from transformers import LlamaConfig

    # GQA: 4 query heads, 2 key/value heads, so k_proj/v_proj are (32, 64) while q_proj is (64, 64)
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    return LlamaConfig(**{**args, **kw})


def _save_llama(path: Path, *, dtype=torch.float32, seed=0, **kw) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(**{k: v for k, v in kw.items() if k != "max_shard_size"})).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": kw["max_shard_size"]} if "max_shard_size" in kw else {}))
    return path


def _load_llama(path: Path, dtype=None):
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()


def _make_llama_adapter(path: Path, base: Path, *, seed: int, targets=LLAMA_TARGETS, std=0.05, **config) -> Path:
    """A PEFT OFT adapter with seeded random generators (no training); base weights are not saved in it."""
    import warnings

    from peft import OFTConfig, get_peft_model

    config.setdefault("oft_block_size", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_load_llama(base), OFTConfig(target_modules=list(targets), **config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "oft_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        model.save_pretrained(path, save_embedding_layers=False)
    return path


def _peft(base: Path, adapter: Path, dtype=None):
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_load_llama(base, dtype), str(adapter)).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Bases (float32 one file, float32 sharded, bf16) and adapters (Neumann default, exact), made once."""
    root = tmp_path_factory.mktemp("llama")
    bases = {
        "f32": _save_llama(root / "f32"),
        "f32-sharded": _save_llama(root / "f32-sharded", max_shard_size="50KB"),
        "bf16": _save_llama(root / "bf16", dtype=torch.bfloat16),
    }
    adapters = {
        "neumann": _make_llama_adapter(root / "neumann", bases["f32"], seed=1),
        "exact": _make_llama_adapter(root / "exact", bases["f32"], seed=2, use_cayley_neumann=False, oft_block_size=16),
        "neumann-b": _make_llama_adapter(root / "neumann-b", bases["f32"], seed=3, targets=["q_proj", "v_proj", "down_proj"]),
    }
    return {"root": root, "bases": bases, "adapters": adapters}


def _assert_within_one_ulp(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    """16-bit results: both sides round a float32 result once, so they may differ by one unit in the last place.

    (Plus float32 accumulation noise, 1e-6 of the largest entry, for entries that nearly cancel.)
    """
    a, b = ours.float(), theirs.float()
    _, exp = torch.frexp(b)
    ulp = torch.ldexp(torch.full_like(b, torch.finfo(theirs.dtype).eps), exp - 1)  # spacing at |b|
    bad = (a - b).abs() > ulp + 1e-6 * b.abs().max()
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} entries more than one {theirs.dtype} ulp apart, e.g. {a[bad][:3].tolist()} vs {b[bad][:3].tolist()}"


def _assert_weights_equal(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    assert ours.dtype == theirs.dtype, name
    if theirs.dtype in (torch.bfloat16, torch.float16):
        _assert_within_one_ulp(ours, theirs, name)
    else:
        err = float((ours - theirs).abs().max()) / max(float(theirs.abs().max()), 1e-30)
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("variant", ["f32", "f32-sharded", "bf16"])
@pytest.mark.parametrize("kind", ["neumann", "exact"])
def test_folded_llama_equals_peft_merge_and_unload(llama, variant, kind, tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base, adapter = llama["bases"][variant], llama["adapters"][kind]
    result = fold_adapter(adapter, base, tmp_path / "out", shard_size="60KB")
    assert len(result.modules) == 2 * 7 + 2 and not result.warnings
    dtype = torch.bfloat16 if variant == "bf16" else None
    folded = _load_llama(tmp_path / "out")
    assert folded.dtype == (dtype or torch.float32)
    peft_model = _peft(base, adapter, dtype)
    with torch.no_grad():
        unmerged = peft_model(IDS).logits.float()
        merged_model = peft_model.merge_and_unload()
        merged_logits = merged_model(IDS).logits.float()
        ours = folded(IDS).logits.float()
    theirs = merged_model.state_dict()
    mine = folded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in theirs:
        _assert_weights_equal(mine[key], theirs[key], key)
    scale = float(unmerged.abs().max())
    if dtype is None:
        assert float((ours - unmerged).abs().max()) <= 1e-5 * scale
    else:  # bf16: the same weights as PEFT's merge up to one rounding; the unmerged bf16 forward rounds elsewhere
        assert float((ours - merged_logits).abs().max()) <= 2e-2 * scale
        assert float((ours - unmerged).abs().max()) <= 5e-2 * scale
    ckpt_in, ckpt_out = Checkpoint(base), Checkpoint(tmp_path / "out")
    for key in set(ckpt_in.keys()) - set(result.modules.values()):  # untouched tensors: the same bytes
        a, b = ckpt_in.raw(key), ckpt_out.raw(key)
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.read().view(torch.uint8).equal(b.read().view(torch.uint8)), key
    assert len(ckpt_out.shards) > 1 and json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert (tmp_path / "out" / "generation_config.json").is_file()


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fold_golden_fixture_equals_that_releases_merge(case, tmp_path):
    """Every layout and Cayley variant of PEFT 0.13.2-0.21.2, Linear, Embedding and Conv2d, against that release."""
    import shutil

    from oftmerge.ops.fold import fold_adapter

    (tmp_path / "base").mkdir()
    shutil.copyfile(case / "base.safetensors", tmp_path / "base" / "model.safetensors")
    result = fold_adapter(case / "adapter", tmp_path / "base", tmp_path / "out")
    expected = {k.removeprefix("merged."): v for k, v in load_file(case / "expected.safetensors").items() if k.startswith("merged.")}
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, theirs in expected.items():
        if key in result.modules.values():
            _assert_weights_equal(got[key], theirs, key)
        else:
            assert torch.equal(got[key], theirs), f"{key} must not change"


def test_merged_adapters_fold_equals_peft_on_the_merged_adapter(llama, tmp_path):
    import oftmerge

    base = llama["bases"]["f32-sharded"]
    inputs = [llama["adapters"]["neumann"], llama["adapters"]["neumann-b"]]
    result = oftmerge.merge_adapters(inputs, out_dir=tmp_path / "model", base=base, output="model", shard_size="100KB")
    assert result.saved_to == (tmp_path / "model").absolute()
    oftmerge.merge_adapters(inputs, out_dir=tmp_path / "adapter")
    with torch.no_grad():
        peft_model = _peft(base, tmp_path / "adapter")
        unmerged = peft_model(IDS).logits
        theirs = peft_model.merge_and_unload().state_dict()
        folded = _load_llama(tmp_path / "model")
        ours = folded(IDS).logits
    for key, value in folded.state_dict().items():
        _assert_weights_equal(value, theirs[key], key)
    assert float((ours - unmerged).abs().max()) <= 1e-5 * float(unmerged.abs().max())
    prov = json.loads((tmp_path / "model" / "oftmerge.json").read_text())
    assert prov["source"]["method"] == "orthomerge" and len(prov["source"]["inputs"]) == 2


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "q_proj"]])
def test_tied_embedding_rotated_is_untied_and_keeps_the_adapted_function(targets, tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base = _save_llama(tmp_path / "base", tie_word_embeddings=True)
    assert "lm_head.weight" not in Checkpoint(base)
    adapter = _make_llama_adapter(tmp_path / "a", base, seed=4, targets=targets, use_cayley_neumann=False)
    result = fold_adapter(adapter, base, tmp_path / "out")
    assert result.untied == ("model.embed_tokens.weight", "lm_head.weight")
    assert any("stores lm_head.weight separately (tie_word_embeddings=false)" in w for w in result.warnings)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    out = Checkpoint(tmp_path / "out")
    rotated = "model.embed_tokens.weight" if "embed_tokens" in targets else "lm_head.weight"
    kept = ({"model.embed_tokens.weight", "lm_head.weight"} - {rotated}).pop()
    assert torch.equal(out.get(kept), Checkpoint(base).get("model.embed_tokens.weight"))
    peft_model = _peft(base, adapter)
    with torch.no_grad():
        unmerged = peft_model(IDS).logits
        ours = _load_llama(tmp_path / "out")(IDS).logits
        peft_merged = peft_model.merge_and_unload()(IDS).logits
    scale = float(unmerged.abs().max())
    assert float((ours - unmerged).abs().max()) <= 1e-5 * scale
    # PEFT's in-place merge rotates the one tied matrix, i.e. both ends: a different model
    assert float((peft_merged - unmerged).abs().max()) > 1e-2 * scale


def test_tied_embedding_not_rotated_stays_tied(tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base = _save_llama(tmp_path / "base", tie_word_embeddings=True)
    adapter = _make_llama_adapter(tmp_path / "a", base, seed=5, targets=["q_proj", "down_proj"])
    result = fold_adapter(adapter, base, tmp_path / "out")
    assert result.untied is None and not result.warnings
    assert Checkpoint(tmp_path / "out").keys() == Checkpoint(base).keys()  # no lm_head.weight invented
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    peft_model = _peft(base, adapter)
    with torch.no_grad():
        torch.testing.assert_close(_load_llama(tmp_path / "out")(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_fold_refuses_an_adapter_of_another_model(llama, tmp_path):
    from oftmerge.errors import IncompatibleAdaptersError
    from oftmerge.ops.fold import fold_adapter

    with pytest.raises(IncompatibleAdaptersError, match=r"module 'head' .*the base model has no weight 'head.weight'; this adapter was trained on another base model"):
        fold_adapter(GOLDEN / "peft-0.21.2" / "exact_bs4" / "adapter", llama["bases"]["f32"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- command line ---------------------------------------------------------------------------------


def test_cli_fold_dry_run_and_write(llama, tmp_path, capsys):
    from oftmerge.cli import main
    from oftmerge.ops.fold import fold_adapter

    adapter, base = str(llama["adapters"]["exact"]), str(llama["bases"]["f32"])
    assert main(["fold", adapter, "--base", base, "--dry-run", "--shard-size", "100KB"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written (would write" in out and "model.layers.0.self_attn.k_proj" in out
    assert main(["fold", adapter, "--base", base, "-o", str(tmp_path / "cli"), "--shard-size", "100KB", "-q"]) == 0
    fold_adapter(adapter, base, tmp_path / "api", shard_size="100KB")
    assert _digests(tmp_path / "cli") == _digests(tmp_path / "api")
    assert main(["fold", adapter, "--base", base, "-o", str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_merge_fold_into(llama, tmp_path, capsys):
    from oftmerge.cli import main

    a, b, base = llama["adapters"]["neumann"], llama["adapters"]["neumann-b"], llama["bases"]["f32"]
    assert main(["merge", str(a), str(b), "--fold-into", str(base), "-o", str(tmp_path / "m")]) == 0
    assert f"wrote {(tmp_path / 'm').absolute()}" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    _load_llama(tmp_path / "m")
    # --shard-size reaches the folded model's writer
    assert main(["merge", str(a), str(b), "--fold-into", str(base), "-o", str(tmp_path / "s"), "--shard-size", "100KB", "-q"]) == 0
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file() and not (tmp_path / "s" / "model.safetensors").exists()
    _load_llama(tmp_path / "s")


# -- crash safety ---------------------------------------------------------------------------------

_CRASH_CHILD = r"""
import os, signal, sys
from oftmerge.formats import io, shards

point, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def kill_after(obj, attr):
    orig = getattr(obj, attr)
    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(obj, attr, wrapper)

if point == "tensor":      # after n tensors reached the shard files
    kill_after(shards.ShardedWriter, "_write_planned")
elif point == "close":     # shards renamed and index written, small files not yet copied
    kill_after(shards.ShardedWriter, "close")
elif point == "finalize":  # everything written and fsynced, just before the rename into place
    kill_after(io, "_fsync_dir")
from oftmerge.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize(("point", "n"), [("tensor", 1), ("tensor", 3), ("close", 1), ("finalize", 1)])
def test_killed_fold_leaves_nothing_that_looks_complete(llama, tmp_path, point, n):
    import subprocess
    import sys

    from oftmerge.ops.fold import fold_adapter

    adapter, base = llama["adapters"]["neumann"], llama["bases"]["f32-sharded"]
    reference = fold_adapter(adapter, base, tmp_path / "reference", shard_size="60KB").out_dir
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD)
    cmd = [sys.executable, str(script), point, str(n), "fold", str(adapter), "--base", str(base), "-o", str(out), "--shard-size", "60KB", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -9, stderr[-2000:]
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.is_dir()]
    assert len(partial) == 1 and partial[0].name.startswith(".out.partial-")  # clearly partial: hidden, named so
    assert (tmp_path / (partial[0].name + ".pid")).read_text() == str(proc.pid)  # the dead writer's pid
    assert not (partial[0] / "README.md").exists() or point == "finalize"
    fold_adapter(adapter, base, out, shard_size="60KB")  # the re-run removes the dead run's directory
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert _digests(out) == _digests(reference)
