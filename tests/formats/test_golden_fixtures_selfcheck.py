"""Internal consistency of the PEFT OFT golden fixtures (tests/fixtures/golden).

Needs only torch + safetensors: it replays the tiny model of ``golden_model.py`` with
the saved base / merged weights and checks what PEFT itself recorded, so that a broken
or stale fixture is caught before the reader is tested against it.  It does not
implement any OFT math beyond norms (that is the reader's job).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import GOLDEN, golden_model

RELEASES = ["0.13.2", "0.15.2", "0.17.1", "0.18.1", "0.21.2"]
gm = golden_model()


def _ver(s: str) -> tuple[int, ...]:
    return tuple(int(p) for p in s.split("."))


def _case_dirs() -> list[Path]:
    return sorted(p.parent for p in GOLDEN.glob("peft-*/*/meta.json"))


CASES = _case_dirs()


def _dtype(meta) -> torch.dtype:
    return getattr(torch, meta["model"]["dtype"])


def _tol(meta, ref: torch.Tensor, fp32_rel: float = 1e-5) -> float:
    scale = max(1.0, float(ref.float().abs().max()))
    return (2e-2 if _dtype(meta) != torch.float32 else fp32_rel) * scale


def _known_forward_mismatch(peft_version: str, case: str) -> bool:
    # PEFT >= 0.16 rotates unfolded input patches of a Conv2d and folds them back with
    # F.fold (which sums overlapping patches) before the base conv: for kernels > 1x1
    # that forward is not the merged conv.  merge_and_unload (W R^T on the flattened
    # weight) is the reference.  See README.md.
    return case == "conv" and _ver(peft_version) >= (0, 16)


def test_every_release_has_fixtures():
    found = {p.parent.name for p in CASES}
    assert found == {f"peft-{r}" for r in RELEASES}
    for rel in RELEASES:
        names = {p.name for p in CASES if p.parent.name == f"peft-{rel}"}
        assert {"block_share", "coft", "coft_loose", "bin_format", "conv"} <= names, rel
        if _ver(rel) >= (0, 16):
            assert {"exact_bs4", "neumann5_bs8", "neumann3_bs8", "r_given"} <= names, rel
    assert (GOLDEN / "peft-0.21.2" / "embedding").is_dir()
    assert (GOLDEN / "peft-0.21.2" / "bf16").is_dir()


@pytest.fixture(params=CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def case(request):
    d: Path = request.param
    meta = json.loads((d / "meta.json").read_text())
    return d, meta


def test_files_and_versions(case):
    d, meta = case
    for f in ("base.safetensors", "input.safetensors", "expected.safetensors", "adapter/adapter_config.json"):
        assert (d / f).is_file(), f
    weights = "adapter_model.safetensors" if meta["safe_serialization"] else "adapter_model.bin"
    assert (d / "adapter" / weights).is_file()
    assert sorted(p.name for p in (d / "adapter").iterdir()) == meta["adapter_files"]
    assert d.parent.name == f"peft-{meta['peft_version']}"
    assert meta["torch_version"].startswith("2.13.0")
    assert meta["model"]["MODEL_VERSION"] == gm.MODEL_VERSION
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "OFT"
    # peft_version is written into adapter_config.json from 0.18 on
    assert ("peft_version" in cfg) == (_ver(meta["peft_version"]) >= (0, 18))
    assert meta["notes"] == [] or all(not n.startswith("WARNING") for n in meta["notes"]), meta["notes"]


def _adapter_tensors(d: Path, meta) -> dict[str, torch.Tensor]:
    if meta["safe_serialization"]:
        return load_file(str(d / "adapter" / "adapter_model.safetensors"))
    return torch.load(str(d / "adapter" / "adapter_model.bin"), map_location="cpu", weights_only=True)


def test_adapter_tensors_match_reported_blocks(case):
    d, meta = case
    tensors = _adapter_tensors(d, meta)
    assert {k: list(v.shape) for k, v in tensors.items()} == {k: v["shape"] for k, v in meta["adapter_tensors"].items()}
    v = _ver(meta["peft_version"])
    for path, info in meta["modules"].items():
        b, nblocks, share = info["block_size"], info["num_blocks"], info["block_share"]
        rows = 1 if share else nblocks
        if v < (0, 16):
            t = tensors[f"base_model.model.{path}.oft_r"]
            assert list(t.shape) == [rows, b, b]
            if v >= (0, 14):
                assert list(tensors[f"base_model.model.{path}.oft_s"].shape) == [info.get("out_features", info.get("out_channels")), 1]
        else:
            name = "oft_embedding_R" if info["type"] == "Embedding" else "oft_R"
            t = tensors[f"base_model.model.{path}.{name}.weight"]
            n = t.shape[1]
            assert list(t.shape) == [rows, b * (b - 1) // 2]
            assert (1 + math.isqrt(1 + 8 * n)) // 2 == b
        assert t.abs().max() > 0.01, "generators were not randomized"
        # how many blocks cover the rotated width
        if v < (0, 14):
            width = info.get("out_features", info.get("out_channels"))
            assert nblocks * b >= width and (nblocks - 1) * b < width
        else:
            width = {"Linear": info.get("in_features"), "Conv2d": info.get("flattened_in"),
                     "Embedding": info.get("embedding_dim")}[info["type"]]
            assert nblocks * b == width
    for k in tensors:
        assert k.startswith("base_model.model.") and ".default" not in k


def test_outputs_and_merged_state(case):
    d, meta = case
    dtype = _dtype(meta)
    base = load_file(str(d / "base.safetensors"))
    inputs = load_file(str(d / "input.safetensors"))
    exp = load_file(str(d / "expected.safetensors"))
    assert sorted(inputs) == meta["input"]["keys"]

    # base.safetensors is exactly the seeded golden model
    ref = gm.make_model(meta["model"]["seed"], dtype=dtype).state_dict()
    assert sorted(ref) == sorted(base)
    for k in ref:
        assert torch.equal(ref[k], base[k]), k

    model = gm.make_model(meta["model"]["seed"], dtype=dtype)
    model.load_state_dict(base, strict=True)
    with torch.no_grad():
        out_base = model(**inputs)
    assert torch.allclose(out_base.float(), exp["out_base"].float(), atol=_tol(meta, out_base, 1e-6), rtol=0)

    merged = {k[len("merged."):]: v for k, v in exp.items() if k.startswith("merged.")}
    assert sorted(merged) == sorted(base)
    for k in base:
        assert merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype, k
    targets = set(meta["modules"])
    for k in base:
        mod = k.rsplit(".", 1)[0]
        if mod in targets and k.endswith("weight"):
            assert not torch.equal(merged[k], base[k]), f"{k} not changed by the merge"
        else:  # biases and untargeted modules are never touched
            assert torch.equal(merged[k], base[k]), f"{k} changed by the merge"

    model.load_state_dict(merged, strict=True)
    with torch.no_grad():
        out_merged = model(**inputs)
    assert torch.allclose(out_merged.float(), exp["out_merged"].float(), atol=_tol(meta, out_merged, 1e-6), rtol=0)

    out_peft = exp["out_peft"]
    assert out_peft.shape == out_merged.shape == out_base.shape
    # the adapter is not the identity
    assert (out_peft.float() - out_base.float()).abs().max() > 1e-3

    # PEFT's forward agrees with PEFT's merge (except where PEFT is known to disagree)
    diff = float((out_peft.float() - exp["out_merged"].float()).abs().max())
    assert diff == pytest.approx(meta["max_abs_diff_out_peft_vs_out_merged"], rel=1e-3, abs=1e-9)
    if _known_forward_mismatch(meta["peft_version"], meta["case"]):
        assert not meta["peft_forward_matches_merge"]
        # only the conv part of the output differs; the linear head part is untouched
        n = gm.D_OUT
        assert torch.allclose(out_peft[:, :n], exp["out_merged"][:, :n], atol=1e-6, rtol=0)
        assert diff > 1e-3
    else:
        assert meta["peft_forward_matches_merge"], diff
        assert diff <= _tol(meta, exp["out_merged"], 1e-5), diff


def test_rotation_side_and_norms(case):
    """Exact Cayley rotations preserve norms on the rotated side (documents the fold side)."""
    d, meta = case
    kw = meta["oft_config_kwargs"]
    v = _ver(meta["peft_version"])
    neumann = v >= (0, 16) and kw.get("use_cayley_neumann", True)
    if neumann or _dtype(meta) != torch.float32:
        pytest.skip("Neumann series / bf16 are not exactly orthogonal")
    base = load_file(str(d / "base.safetensors"))
    exp = load_file(str(d / "expected.safetensors"))
    tensors = _adapter_tensors(d, meta)
    for path, info in meta["modules"].items():
        w0 = base[f"{path}.weight"]
        w1 = exp[f"merged.{path}.weight"]
        if info["type"] == "Embedding":  # E' = E R: rows (one per token) keep their norm
            assert torch.allclose(w1.norm(dim=1), w0.norm(dim=1), atol=1e-5)
            continue
        w0 = w0.reshape(w0.shape[0], -1)
        w1 = w1.reshape(w1.shape[0], -1)
        if v < (0, 14):
            # output side: columns rotated; exact only when the block-diagonal is not cut
            if info["num_blocks"] * info["block_size"] == w0.shape[0]:
                assert torch.allclose(w1.norm(dim=0), w0.norm(dim=0), atol=1e-5), path
                assert not torch.allclose(w1.norm(dim=1), w0.norm(dim=1), atol=1e-4), path
        else:
            scale = torch.ones(w0.shape[0])
            if v < (0, 16):
                scale = tensors[f"base_model.model.{path}.oft_s"].reshape(-1).abs()
            assert torch.allclose(w1.norm(dim=1), w0.norm(dim=1) * scale, atol=1e-5), path


def test_coft_cases_record_projection(case):
    d, meta = case
    if meta["case"] not in ("coft", "coft_loose"):
        pytest.skip("not a COFT case")
    exp = load_file(str(d / "expected.safetensors"))
    saved = _adapter_tensors(d, meta)
    after = {k[len("adapter_after_forward."):]: t for k, t in exp.items() if k.startswith("adapter_after_forward.")}
    assert sorted(after) == sorted(saved)
    changed = {k: not torch.equal(after[k], saved[k]) for k in saved if not k.endswith("oft_s")}
    if meta["case"] == "coft":
        assert all(changed.values()), changed
    else:
        assert not any(changed.values()), changed


def test_meta_block_sizes_follow_peft_adjustment(case):
    """0.14+: a block size (or r) that does not divide the width is moved to the nearest divisor."""
    d, meta = case
    v = _ver(meta["peft_version"])
    if v < (0, 14):
        pytest.skip("0.13 has no adjustment (ceil + cut)")
    kw = meta["oft_config_kwargs"]

    def adjust(n, p):  # PEFT's adjust_oft_parameters (identical in 0.14 .. 0.21.2)
        if p >= n:
            return n
        hi = p
        while hi <= n and n % hi:
            hi += 1
        lo = p
        while lo > 1 and n % lo:
            lo -= 1
        return lo if (p - lo) <= (hi - p) else hi

    for path, info in meta["modules"].items():
        width = {"Linear": info.get("in_features"), "Conv2d": info.get("flattened_in"),
                 "Embedding": info.get("embedding_dim")}[info["type"]]
        if kw.get("oft_block_size"):
            bs = kw["oft_block_size"]
            want_b = bs if width % bs == 0 else adjust(width, bs)
        else:
            r = kw["r"]
            want_b = width // (r if width % r == 0 else adjust(width, r))
        assert info["block_size"] == want_b, (path, info, want_b)
        if width % (kw.get("oft_block_size") or kw["r"]):
            assert any(re.search(r"Invalid `(oft_block_size|r)`", w) for w in meta["warnings"]), meta["warnings"]
