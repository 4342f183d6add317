"""Every PEFT release is the oracle: golden fixtures made by PEFT 0.13.2, 0.15.2, 0.17.1, 0.18.1 and 0.21.2
(scripts/make_golden_fixtures.py) are read by oftmerge, folded, and compared with that release's own
merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oftmerge
from oftmerge.errors import OftMergeError
from oftmerge.kernels.fold import adapter_rotation, fold_weight
from oftmerge.ops.convert import convert_adapter

from helpers import GOLDEN, golden_model, orthomerge_generator, peft_rotation, read_full_generator, rotated_copy

CASES = sorted(p for p in GOLDEN.glob("peft-*/*") if (p / "adapter").is_dir())
FAMILY = {"0.13.2": "0.13", "0.15.2": "0.15", "0.17.1": "0.16", "0.18.1": "0.18", "0.21.2": "0.18"}


def _case_id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def _meta(case: Path) -> dict:
    return json.loads((case / "meta.json").read_text())


def test_fixtures_exist_for_every_release():
    assert {p.parent.name for p in CASES} == {f"peft-{v}" for v in FAMILY}
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reader_detects_the_release(case):
    version = _meta(case)["peft_version"]
    adapter = oftmerge.read_adapter(case / "adapter")
    assert adapter.release == FAMILY[version]
    weights = case / "adapter" / "adapter_model.safetensors"
    stored = load_file(weights) if weights.exists() else torch.load(case / "adapter" / "adapter_model.bin", weights_only=True)
    assert {s.key for s in adapter.modules.values()} | {s.scale_key for s in adapter.modules.values() if s.scale_key} == set(stored)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fold_equals_that_releases_merge_and_unload(case):
    adapter = oftmerge.read_adapter(case / "adapter")
    base = load_file(case / "base.safetensors")
    expected = {k.removeprefix("merged."): v for k, v in load_file(case / "expected.safetensors").items() if k.startswith("merged.")}
    assert set(expected) == set(base)
    for name, spec in adapter.modules.items():
        key = f"{name}.weight"
        ours = fold_weight(base[key], adapter_rotation(adapter, name), spec, scale=adapter.scale(name))
        theirs = expected[key]
        assert ours.dtype == theirs.dtype
        if theirs.dtype == torch.bfloat16:  # PEFT computes in float32 and rounds once to bf16
            torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)
        else:
            scale = float(theirs.abs().max())
            err = float((ours - theirs).abs().max()) / scale
            assert err <= 1e-5, f"{name}: relative error {err:.2e}"
    for key in set(base) - {f"{n}.weight" for n in adapter.modules}:
        assert torch.equal(base[key], expected[key]), f"{key} must not change"


@pytest.mark.parametrize(
    "case", [c for c in CASES if _meta(c)["peft_version"] in ("0.17.1", "0.18.1", "0.21.2")], ids=_case_id
)
def test_packed_layout_round_trip_is_bit_identical(case, tmp_path):
    """N = 1 keeps every stored tensor bit for bit, COFT (kept on) and PEFT 0.16-0.17's Neumann series (kept) included."""
    result = oftmerge.merge_adapters([case / "adapter"], out_dir=tmp_path / "out")
    src = case / "adapter" / "adapter_model.safetensors"
    before = load_file(src) if src.exists() else torch.load(case / "adapter" / "adapter_model.bin", weights_only=True)
    after = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    given = oftmerge.read_adapter(case / "adapter")
    written = oftmerge.read_adapter(tmp_path / "out")
    assert written.rotation_map == given.rotation_map, "the output is read with the inputs' map and series"
    assert [s.coft_radius for s in written.modules.values()] == [s.coft_radius for s in given.modules.values()]
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert ("peft_version" in cfg) == (given.rotation_map.variant != "0.16")
    assert (result.release == "0.16") == (given.rotation_map.variant == "0.16")


@pytest.mark.parametrize("case", [c for c in CASES if _meta(c)["peft_version"] == "0.17.1" and "neumann" in c.name], ids=_case_id)
def test_a_merge_of_017_neumann_inputs_keeps_their_series(case, tmp_path):
    """Folding the merge of a 0.17 Neumann adapter (with itself, N = 2) gives PEFT 0.17.1's merged weights: no silent change."""
    a = case / "adapter"
    result = oftmerge.merge_adapters([a, a], out_dir=tmp_path / "merged")
    assert result.rotation_map == oftmerge.read_adapter(a).rotation_map and any("keeps it" in w for w in result.warnings)
    merged = oftmerge.read_adapter(tmp_path / "merged")
    base, expected = load_file(case / "base.safetensors"), load_file(case / "expected.safetensors")
    for name, spec in merged.modules.items():
        ours = fold_weight(base[f"{name}.weight"], adapter_rotation(merged, name), spec)
        torch.testing.assert_close(ours, expected[f"merged.{name}.weight"], rtol=1e-5, atol=1e-6)
    # asking for the current series is explicit, and said
    changed = oftmerge.merge_adapters([a, a], cayley="neumann")
    assert changed.rotation_map.variant == "0.18" and any("as after `oftmerge convert --approximate`" in w for w in changed.warnings)


@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith("coft")], ids=_case_id)
def test_coft_round_trip_keeps_the_function(case, tmp_path):
    """COFT is applied on reading: the rewritten adapter (coft off) folds to the same weights."""
    if FAMILY[_meta(case)["peft_version"]] in ("0.13",):
        pytest.skip("0.7-0.13 adapters can only be rewritten in their own layout")
    adapter = oftmerge.read_adapter(case / "adapter")
    if adapter.release == "0.15" and adapter.has_nontrivial_scale():
        out = oftmerge.merge_adapters([adapter], out_dir=tmp_path / "out")
        assert out.layout == "0.15"
    else:
        oftmerge.merge_adapters([adapter], out_dir=tmp_path / "out", cayley="auto" if adapter.release != "0.16" else "exact")
    rewritten = oftmerge.read_adapter(tmp_path / "out", peft_release=adapter.release if adapter.release == "0.15" else None)
    base = load_file(case / "base.safetensors")
    expected = load_file(case / "expected.safetensors")
    for name, spec in rewritten.modules.items():
        if adapter.rotation_map != rewritten.rotation_map:
            continue
        ours = fold_weight(base[f"{name}.weight"], adapter_rotation(rewritten, name), spec, scale=rewritten.scale(name))
        torch.testing.assert_close(ours, expected[f"merged.{name}.weight"], rtol=1e-5, atol=1e-6)


def _converted_forward_matches(case: Path, out: Path) -> None:
    """Load the converted adapter with the installed PEFT and compare with the old release's merged output."""
    from peft import PeftModel

    gm = golden_model()
    meta = _meta(case)
    model = gm.make_model(meta["model"]["seed"])
    model.load_state_dict(load_file(case / "base.safetensors"))
    peft_model = PeftModel.from_pretrained(model, str(out)).eval()
    inputs = load_file(case / "input.safetensors")
    merged = peft_model.merge_and_unload()
    expected = load_file(case / "expected.safetensors")
    for name in oftmerge.read_adapter(out).modules:
        torch.testing.assert_close(merged.state_dict()[f"{name}.weight"], expected[f"merged.{name}.weight"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs), expected["out_merged"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [GOLDEN / "peft-0.17.1" / "exact_bs4", GOLDEN / "peft-0.21.2" / "exact_bs4"], ids=_case_id)
def test_convert_017_exact_is_exact_under_current_peft(case, tmp_path):
    convert_adapter(case / "adapter", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_version"] and cfg["use_cayley_neumann"] is False
    _converted_forward_matches(case, tmp_path / "out")


def test_convert_017_neumann_refuses_unless_approximate(tmp_path):
    case = GOLDEN / "peft-0.17.1" / "neumann5_bs8"
    with pytest.raises(OftMergeError, match=r"PEFT 0.16-0.17's Cayley-Neumann series \(5 terms\).*--approximate"):
        convert_adapter(case / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = convert_adapter(case / "adapter", tmp_path / "out", approximate=True)
    assert any("approximate conversion" in w for w in result.warnings)


def test_convert_015_with_trained_scale_refuses(tmp_path):
    case = GOLDEN / "peft-0.15.2" / "exact_bs4"
    with pytest.raises(OftMergeError, match=r"oft_s scales are not all 1.*oftmerge fold"):
        convert_adapter(case / "adapter", tmp_path / "out")


def test_convert_015_with_unit_scale_is_exact(tmp_path):
    """Reset oft_s to 1 in a copy (and in the expectation, by folding without it): then conversion is exact."""
    import shutil

    from safetensors.torch import save_file

    case = GOLDEN / "peft-0.15.2" / "exact_bs8"
    src = tmp_path / "src"
    shutil.copytree(case / "adapter", src)
    tensors = load_file(src / "adapter_model.safetensors")
    tensors = {k: (torch.ones_like(v) if k.endswith("oft_s") else v) for k, v in tensors.items()}
    save_file(tensors, str(src / "adapter_model.safetensors"))
    old = oftmerge.read_adapter(src)
    convert_adapter(src, tmp_path / "out")
    new = oftmerge.read_adapter(tmp_path / "out")
    assert new.release == "0.18"
    base = load_file(case / "base.safetensors")
    for name, spec in new.modules.items():
        a = fold_weight(base[f"{name}.weight"], adapter_rotation(old, name), old.modules[name], scale=old.scale(name))
        b = fold_weight(base[f"{name}.weight"], adapter_rotation(new, name), spec)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_convert_013_refuses_with_the_reason(tmp_path):
    with pytest.raises(OftMergeError, match=r"rotates the output side.*oftmerge fold"):
        convert_adapter(GOLDEN / "peft-0.13.2" / "exact_r4" / "adapter", tmp_path / "out")


def test_merging_013_adapters_keeps_their_layout(tmp_path):
    a = GOLDEN / "peft-0.13.2" / "exact_r4" / "adapter"
    result = oftmerge.merge_adapters([a, a], out_dir=tmp_path / "m")
    assert result.layout == "0.13"
    assert all(k.endswith(".oft_r") for k in result.tensors)
    again = oftmerge.read_adapter(tmp_path / "m")
    assert again.release == "0.13"
    src = oftmerge.read_adapter(a)
    for name in src.modules:
        torch.testing.assert_close(again.generator(name), src.generator(name), rtol=1e-6, atol=1e-7)


def test_old_and_new_sides_cannot_be_merged():
    with pytest.raises(OftMergeError, match=r"rotate the output side of each layer, newer ones the input side"):
        oftmerge.merge_adapters([GOLDEN / "peft-0.13.2" / "exact_r4" / "adapter", GOLDEN / "peft-0.21.2" / "exact_bs4" / "adapter"], allow_base_mismatch=True)


def test_cross_release_merge_equals_the_independent_formula(tmp_path):
    """A 0.17.1 exact adapter (block size 4) and a 0.21.2 Neumann adapter (block size 8) of the same model merge
    into one current adapter; the installed PEFT runs it and agrees with a from-scratch full-matrix OrthoMerge
    (Eq. 7-8 over each module's whole block-diagonal generator, in canonical sign, then PEFT's exact Cayley map)."""
    from peft import PeftModel

    a = GOLDEN / "peft-0.17.1" / "exact_bs4" / "adapter"
    b = GOLDEN / "peft-0.21.2" / "neumann5_bs8" / "adapter"
    case = GOLDEN / "peft-0.21.2" / "neumann5_bs8"
    weights = [1.0, 0.5]
    result = oftmerge.merge_adapters([a, b], weights=weights, out_dir=tmp_path / "m", allow_base_mismatch=True)
    assert result.rotation_map.kind == "exact"
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["use_cayley_neumann"] is False and sorted(cfg["target_modules"]) == ["head", "sq", "tall", "wide"]

    gm = golden_model()
    base = load_file(case / "base.safetensors")
    assert all(torch.equal(base[k], v) for k, v in load_file(GOLDEN / "peft-0.17.1" / "exact_bs4" / "base.safetensors").items())
    rotations = {}
    for name in ("sq", "tall", "wide", "head"):
        width = base[f"{name}.weight"].shape[1]
        qs = [read_full_generator(p, name, width) for p in (a, b)]
        assert min(float(q.norm()) for q in qs) > 0.1  # non-trivial inputs
        rotations[name] = peft_rotation(orthomerge_generator(qs, weights))
    def model():
        m = gm.make_model(1234)
        m.load_state_dict(base)
        return m.eval()

    expected = rotated_copy(model(), rotations)
    peft_model = PeftModel.from_pretrained(model(), str(tmp_path / "m")).eval()
    inputs = load_file(case / "input.safetensors")
    with torch.no_grad():
        want = expected(**inputs)
        assert float((want - model()(**inputs)).abs().max()) > 1e-3  # the merge is not the identity
        torch.testing.assert_close(peft_model(**inputs), want, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload().state_dict()
    for name, r in rotations.items():
        torch.testing.assert_close(merged[f"{name}.weight"].double(), base[f"{name}.weight"].double() @ r.T, rtol=1e-5, atol=1e-6)
