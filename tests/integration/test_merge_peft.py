"""Behaviour against the installed PEFT release: round trips, folds, merges PEFT loads and runs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oftmerge
from oftmerge.kernels.fold import adapter_rotation, fold_weight

from helpers import (
    TinyNet,
    load_peft,
    make_oft_adapter,
    orthomerge_generator,
    peft_neumann,
    peft_rotation,
    read_full_generator,
    rotated_copy,
)

CASES = {
    "neumann5": dict(oft_block_size=4),
    "neumann3": dict(oft_block_size=4, num_cayley_neumann_terms=3),
    "exact": dict(oft_block_size=8, use_cayley_neumann=False),
    "r_given": dict(oft_block_size=0, r=2, use_cayley_neumann=False),
    "block_share": dict(oft_block_size=4, block_share=True),
    "coft": dict(oft_block_size=4, coft=True, eps=1e-2, use_cayley_neumann=False),
    "adjusted": dict(oft_block_size=5, use_cayley_neumann=False),  # PEFT adjusts 5 per layer
    "embedding_conv": dict(oft_block_size=2, use_cayley_neumann=False),
}
TARGETS = {"embedding_conv": ("emb", "conv", "lin_tall")}


def _make(tmp_path, case, seed=1, name=None):
    path = tmp_path / (name or case)
    model = make_oft_adapter(path, seed=seed, targets=TARGETS.get(case, ("lin_sq", "lin_wide", "lin_tall")), **CASES[case])
    return path, model


def _loads_cleanly(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_peft(path)
    relevant = [str(w.message) for w in caught if "oft" in str(w.message).lower() or "peft" in str(w.message).lower()]
    assert relevant == [], relevant
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_single_adapter_round_trip_is_exact(tmp_path, case, ids, img):
    path, model = _make(tmp_path, case)
    result = oftmerge.merge_adapters([path], out_dir=tmp_path / "out")
    reloaded = _loads_cleanly(tmp_path / "out")
    with torch.no_grad():
        if case == "coft":  # projected in float64 here, in float32 by PEFT
            assert torch.allclose(reloaded(ids, img), model(ids, img), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(reloaded(ids, img), model(ids, img))
    if case != "coft":  # COFT's projection is applied on reading: the stored tensor is the projected one
        before = load_file(path / "adapter_model.safetensors")
        after = load_file(tmp_path / "out" / "adapter_model.safetensors")
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), "N = 1 must be bit-identical"
    assert set(result.modules) == {n for n in TARGETS.get(case, ("lin_sq", "lin_wide", "lin_tall"))}


@pytest.mark.parametrize("case", list(CASES))
def test_fold_equals_peft_merge_and_unload(tmp_path, case):
    path, model = _make(tmp_path, case)
    adapter = oftmerge.read_adapter(path)
    base = TinyNet(0).state_dict()
    merged = model.merge_and_unload().state_dict()
    for name, spec in adapter.modules.items():
        ours = fold_weight(base[f"{name}.weight"], adapter_rotation(adapter, name), spec)
        theirs = merged[f"{name}.weight"]
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name


def test_merged_adapter_matches_independent_full_matrix_merge(tmp_path, ids):
    """Block sizes 4 (Neumann) and 8 (exact), three inputs with weights: PEFT runs our output and agrees with
    a from-scratch full-matrix implementation of the formula."""
    a, _ = _make(tmp_path, "neumann5", seed=1, name="a")
    b, _ = _make(tmp_path, "exact", seed=2, name="b")
    c, _ = _make(tmp_path, "neumann5", seed=3, name="c")
    weights = [1.0, 0.5, 2.0]
    result = oftmerge.merge_adapters([a, b, c], weights=weights, out_dir=tmp_path / "m")
    assert result.rotation_map.kind == "exact" and any("different rotation maps" in w for w in result.warnings)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["oft_block_size"] == 8 and cfg["use_cayley_neumann"] is False
    model = _loads_cleanly(tmp_path / "m")
    base = TinyNet(0).state_dict()
    rotations = {}
    for name in ("lin_sq", "lin_wide", "lin_tall"):
        width = base[f"{name}.weight"].shape[1]
        qs = [read_full_generator(p, name, width) for p in (a, b, c)]
        rotations[name] = peft_rotation(orthomerge_generator(qs, weights))
    expected_model = rotated_copy(TinyNet(0), rotations)
    with torch.no_grad():
        assert torch.allclose(model(ids), expected_model(ids), rtol=1e-5, atol=1e-5)


def test_sign_conventions_do_not_flip_rotations(tmp_path):
    """An exact-Cayley adapter and a Neumann adapter that store opposite generators describe the same
    rotation; merging them must give that rotation back, not cancel to the identity."""
    a, _ = _make(tmp_path, "exact", seed=4, name="a")
    b = tmp_path / "b"
    make_oft_adapter(b, seed=0, std=0.0, oft_block_size=8)  # Neumann, zeros for now
    tensors = {k: -v for k, v in load_file(a / "adapter_model.safetensors").items()}
    from safetensors.torch import save_file

    save_file(tensors, str(b / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = oftmerge.merge_adapters([a, b], cayley="exact")
    original = load_file(a / "adapter_model.safetensors")
    for key, value in original.items():
        assert torch.allclose(result.tensors[key], value, atol=1e-7)


def test_union_of_targets_keeps_single_adapter_modules(tmp_path, ids):
    a = tmp_path / "a"
    b = tmp_path / "b"
    make_oft_adapter(a, seed=1, targets=("lin_sq",), oft_block_size=4)
    make_oft_adapter(b, seed=2, targets=("lin_sq", "lin_tall"), oft_block_size=4)
    result = oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m")
    assert set(result.modules) == {"lin_sq", "lin_tall"}
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["lin_sq", "lin_tall"]
    key = "base_model.model.lin_tall.oft_R.weight"
    assert torch.equal(result.tensors[key], load_file(b / "adapter_model.safetensors")[key])
    assert result.modules["lin_sq"].inputs == (0, 1)
    (only,) = result.modules["lin_tall"].inputs
    assert result.inputs[only].path == str(b)
    assert cfg["use_cayley_neumann"] is True and cfg["num_cayley_neumann_terms"] == 5
    # independent reference: lin_sq merged by Eq. 7-8 over the full generators, lin_tall b's own, lin_wide untouched
    q_sq = orthomerge_generator([read_full_generator(p, "lin_sq", 16) for p in (a, b)], [1.0, 1.0])
    expected = rotated_copy(TinyNet(0).eval(), {
        "lin_sq": peft_rotation(q_sq, neumann_terms=5),
        "lin_tall": peft_rotation(read_full_generator(b, "lin_tall", 24), neumann_terms=5),
    })
    with torch.no_grad():
        torch.testing.assert_close(_loads_cleanly(tmp_path / "m")(ids), expected(ids), rtol=1e-5, atol=1e-5)


def test_permuting_inputs_gives_identical_bytes(tmp_path):
    paths = [_make(tmp_path, "neumann5", seed=s, name=f"a{s}")[0] for s in (1, 2, 3)]
    oftmerge.merge_adapters(paths, weights=[1, 2, 3], out_dir=tmp_path / "x")
    oftmerge.merge_adapters(paths[::-1], weights=[3, 2, 1], out_dir=tmp_path / "y")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes()


def test_sequential_equals_peft_folding_adapters_one_after_another(tmp_path):
    a, _ = _make(tmp_path, "exact", seed=5, name="a")
    b, _ = _make(tmp_path, "exact", seed=6, name="b")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(TinyNet(0), str(a), adapter_name="a")
    peft_model.load_adapter(str(b), adapter_name="b")
    folded_by_peft = peft_model.merge_and_unload(adapter_names=["a", "b"]).state_dict()
    result = oftmerge.merge_adapters([a, b], method="sequential", out_dir=tmp_path / "seq")
    merged = oftmerge.read_adapter(tmp_path / "seq")
    base = TinyNet(0).state_dict()
    for name, spec in merged.modules.items():
        ours = fold_weight(base[f"{name}.weight"], adapter_rotation(merged, name), spec)
        assert torch.allclose(ours, folded_by_peft[f"{name}.weight"], rtol=1e-5, atol=1e-6), name
    assert result.method == "sequential"


def test_negative_weight_is_the_inverse_rotation(tmp_path):
    a, _ = _make(tmp_path, "exact", seed=7, name="a")
    oftmerge.merge_adapters([a], weights=[-1.0], out_dir=tmp_path / "neg")
    pos, neg = oftmerge.read_adapter(a), oftmerge.read_adapter(tmp_path / "neg")
    for name in pos.modules:
        r, r_inv = adapter_rotation(pos, name), adapter_rotation(neg, name)
        assert torch.allclose(r @ r_inv, torch.eye(r.shape[-1], dtype=torch.float64).expand_as(r), atol=1e-12)


def test_neumann_output_keeps_the_inputs_series(tmp_path):
    a, _ = _make(tmp_path, "neumann3", seed=1, name="a")
    b, _ = _make(tmp_path, "neumann3", seed=2, name="b")
    result = oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["use_cayley_neumann"] is True and cfg["num_cayley_neumann_terms"] == 3
    assert result.rotation_map.terms == 3
    merged = oftmerge.read_adapter(tmp_path / "m")
    q = merged.generator("lin_sq")
    assert torch.allclose(adapter_rotation(merged, "lin_sq"), peft_neumann(q, 3))


def test_block_share_merge_stays_shared(tmp_path, ids):
    a, _ = _make(tmp_path, "block_share", seed=1, name="a")
    b, _ = _make(tmp_path, "block_share", seed=2, name="b")
    result = oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["block_share"] is True
    assert all(t.shape[0] == 1 for t in result.tensors.values())
    _loads_cleanly(tmp_path / "m")(ids)


def test_block_share_with_unshared_expands(tmp_path, ids):
    a, _ = _make(tmp_path, "block_share", seed=1, name="a")
    b, _ = _make(tmp_path, "neumann5", seed=2, name="b")
    oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["block_share"] is False
    model = _loads_cleanly(tmp_path / "m")
    # the shared adapter's generator, expanded, merged with b's: compare with the independent formula
    base = TinyNet(0).state_dict()
    rotations = {}
    for name in ("lin_sq", "lin_wide", "lin_tall"):
        width = base[f"{name}.weight"].shape[1]
        qs = [read_full_generator(p, name, width) for p in (a, b)]
        rotations[name] = peft_rotation(orthomerge_generator(qs, [1.0, 1.0]), neumann_terms=5)
    expected = rotated_copy(TinyNet(0), rotations)
    with torch.no_grad():
        assert torch.allclose(model(ids), expected(ids), rtol=1e-5, atol=1e-5)


def test_saved_base_embedding_copies_are_carried_through(tmp_path, ids):
    """PEFT saves a copy of a targeted embedding's base weight with the adapter; merging keeps it."""
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    for path, seed in ((a, 1), (b, 2)):
        make_oft_adapter(path, seed=seed, targets=("emb", "lin_sq"), oft_block_size=4, use_cayley_neumann=False)
        tensors = load_file(path / "adapter_model.safetensors")
        tensors["base_model.model.emb.base_layer.weight"] = TinyNet(0).emb.weight.detach().clone()
        save_file(tensors, str(path / "adapter_model.safetensors"))
    result = oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m")
    assert torch.equal(result.tensors["base_model.model.emb.base_layer.weight"], TinyNet(0).emb.weight)
    _loads_cleanly(tmp_path / "m")(ids)
    tensors = load_file(b / "adapter_model.safetensors")
    tensors["base_model.model.emb.base_layer.weight"] += 1.0
    save_file(tensors, str(b / "adapter_model.safetensors"))
    with pytest.raises(oftmerge.IncompatibleAdaptersError, match=r"module 'emb': the adapters saved different copies of its base weight"):
        oftmerge.merge_adapters([a, b])


@pytest.mark.parametrize("method", ["orthomerge", "mean_q", "karcher"])
def test_packed_generators_merge_without_unpacking(tmp_path, monkeypatch, method):
    """PEFT >= 0.16 inputs on one grid merge as stored (upper triangles): same result as through the blocks."""
    from oftmerge.formats.peft_oft import OftAdapter

    paths = [_make(tmp_path, "neumann5", seed=s, name=f"a{s}")[0] for s in (1, 2, 3)]
    calls = []
    real = OftAdapter.packed_generator
    monkeypatch.setattr(OftAdapter, "packed_generator", lambda self, name: calls.append(name) or real(self, name))
    fast = oftmerge.merge_adapters(paths, method=method, weights=[1.0, 0.5, -2.0])
    linear = oftmerge.available_methods()[method].from_sum is not None
    assert bool(calls) == linear  # karcher needs the blocks
    monkeypatch.setattr(OftAdapter, "is_packed", lambda self, name: False)
    slow = oftmerge.merge_adapters(paths, method=method, weights=[1.0, 0.5, -2.0])
    assert fast.tensors.keys() == slow.tensors.keys()
    for k in fast.tensors:
        assert torch.allclose(fast.tensors[k], slow.tensors[k], rtol=1e-6, atol=1e-9), k
    for name, r in fast.modules.items():
        s = slow.modules[name]
        assert r.input_norms == pytest.approx(s.input_norms, rel=1e-12) and r.merged_norm == pytest.approx(s.merged_norm, rel=1e-12)
        assert r.ortho_error == pytest.approx(s.ortho_error, rel=1e-3, abs=1e-7)
        assert r.stats == pytest.approx(s.stats)


def test_each_input_is_recorded_with_its_own_file_hash(tmp_path):
    """The files are hashed while the modules merge; each hash must still land on its own input after reordering."""
    import hashlib

    paths = [_make(tmp_path, "exact", seed=s, name=f"h{s}")[0] for s in (5, 6, 7)]
    for given in (paths, paths[::-1]):
        result = oftmerge.merge_adapters(given, weights=[1.0, 2.0, 3.0])
        for info in result.inputs:
            assert info.sha256 == hashlib.sha256((Path(info.path) / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert {i.path: i.weight for i in result.inputs} == {str(p): float(j + 1) for j, p in enumerate(given)}
    dry = oftmerge.merge_adapters(paths, dry_run=True)
    assert [i.sha256 for i in dry.inputs] == [i.sha256 for i in oftmerge.merge_adapters(paths).inputs]
