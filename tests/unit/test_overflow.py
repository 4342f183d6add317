"""Overflow-safe norms and weights, and refusal of what cannot be represented (issue 16, item 5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from oftmerge.errors import AdapterFormatError, NumericalError, OftMergeError
from oftmerge.formats.io import TensorDict
from oftmerge.formats.peft_oft import adapter_from_tensors, newer_than_known, read_adapter
from oftmerge.formats.writer import pack_module
from oftmerge.kernels.fold import cast_checked, rotation_overflows
from oftmerge.linalg import RotationMap, scaled_norm, weight_unit
from oftmerge.methods import get_method

ROOT = Path(__file__).resolve().parents[2]
UPPER = ROOT / "adapters" / "oft-upper"
LINEAR = ("orthomerge", "mean_q")
RATIO_METHODS = ("orthomerge", "mean_q", "mean_r", "karcher")


def skew_stack(n: int, blocks: int, b: int, seed: int, size: float = 0.1) -> torch.Tensor:
    a = torch.randn(n, blocks, b, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * size
    return a - a.transpose(-2, -1)


# -- scaled norms and the weight unit -----------------------------------------------------------------


def test_scaled_norm_is_the_plain_norm_bit_for_bit_where_that_is_finite():
    x = skew_stack(3, 5, 8, seed=0)
    assert torch.equal(scaled_norm(x, (-2, -1)), torch.linalg.matrix_norm(x))
    assert torch.equal(scaled_norm(x), torch.linalg.vector_norm(x))
    plain = torch.linalg.matrix_norm(x).square().sum(-1).sqrt()
    assert torch.equal(scaled_norm(torch.linalg.matrix_norm(x), -1, plain=plain), plain)


def test_scaled_norm_rescues_overflow():
    x = skew_stack(2, 3, 4, seed=1)
    big = x * 1e200
    assert torch.isinf(torch.linalg.matrix_norm(big)).all()
    got = scaled_norm(big, (-2, -1))
    assert torch.allclose(got / 1e200, torch.linalg.matrix_norm(x), rtol=1e-14)
    assert float(scaled_norm(torch.tensor([3e200, 4e200], dtype=torch.float64))) == pytest.approx(5e200, rel=1e-15)
    assert math.isinf(float(scaled_norm(torch.tensor([1e308, 1e308, 1e308], dtype=torch.float64)))) is False
    assert math.isinf(float(scaled_norm(torch.full((4,), 1.7e308, dtype=torch.float64))))  # does not fit at all
    assert math.isnan(float(scaled_norm(torch.tensor([math.nan, 1.0]))))
    assert float(scaled_norm(torch.zeros(3))) == 0.0


@pytest.mark.parametrize("weights, unit", [((1.0, 1.0), 1.0), ((2.0, 1.0), 2.0), ((-3.0, 1.0), 2.0), ((0.3,), 0.25), ((1e200, 1.0), 2.0**664)])
def test_weight_unit_is_the_power_of_two_below_the_largest_weight(weights, unit):
    w = torch.tensor(weights, dtype=torch.float64)
    assert weight_unit(w) == unit
    assert 1.0 <= float((w / unit).abs().max()) < 2.0


# -- methods: invariant under power-of-two scaling of the weights, finite for huge weights ------------


@pytest.mark.parametrize("name", RATIO_METHODS)
@pytest.mark.parametrize("factor", [2.0, 0.5, 2.0**40, 2.0**-40])
def test_power_of_two_weight_scaling_changes_no_bit(name, factor):
    m = get_method(name)
    qs = skew_stack(3, 4, 6, seed=2)
    w = torch.tensor([1.0, 0.7, -0.4], dtype=torch.float64)
    base, _ = m(qs, w, **m.option_defaults())
    scaled, _ = m(qs, w * factor, **m.option_defaults())
    assert torch.equal(base, scaled)


@pytest.mark.parametrize("name", RATIO_METHODS)
def test_huge_weights_give_the_merge_of_their_ratios(name):
    m = get_method(name)
    qs = skew_stack(2, 4, 6, seed=3)
    want, _ = m(qs, torch.tensor([1.0, 1e-200], dtype=torch.float64), **m.option_defaults())
    got, _ = m(qs, torch.tensor([1e200, 1.0], dtype=torch.float64), **m.option_defaults())
    assert torch.isfinite(got).all() and float(got.abs().max()) > 0.01  # not the identity
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    equal, _ = m(qs, torch.tensor([1e308, 1e308], dtype=torch.float64), **m.option_defaults())
    ones, _ = m(qs, torch.ones(2, dtype=torch.float64), **m.option_defaults())
    assert torch.allclose(equal, ones, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", LINEAR)
def test_from_sum_of_unnormalised_weights_equals_the_stacked_call(name):
    """Decoupling accumulates S with the weights as given: from_sum normalises S and the weights together."""
    m = get_method(name)
    qs = skew_stack(3, 1, 8, seed=4)
    for w in ([1.0, 2.0, 3.0], [1e200, 3e199, -1e199]):
        wt = torch.tensor(w, dtype=torch.float64)
        s = qs[0] * wt[0]
        for i in range(1, 3):
            s = s + qs[i] * wt[i]
        assert m.from_sum is not None
        a, _ = m.from_sum(s, torch.linalg.matrix_norm(qs), wt, **m.option_defaults())
        b, _ = m(qs, wt, **m.option_defaults())
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_orthomerge_of_generators_beyond_1e154_keeps_its_magnitude():
    m = get_method("orthomerge")
    qs = skew_stack(2, 3, 4, seed=5)
    out, stats = m(qs * 1e160, torch.ones(2, dtype=torch.float64))
    ref, ref_stats = m(qs, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(out / 1e160, ref, rtol=1e-12) and stats["c"] == pytest.approx(ref_stats["c"], rel=1e-12)


def test_merge_module_with_weights_1e200_is_not_the_identity():
    from oftmerge.ops.merge import merge_adapters

    adapters = [UPPER, ROOT / "adapters" / "oft-reverse"]
    huge = merge_adapters(adapters, weights=[1e200, 1.0])
    small = merge_adapters(adapters, weights=[1.0, 1e-200])
    for key, t in huge.tensors.items():
        assert torch.equal(t, small.tensors[key]), key
    assert any(float(t.abs().max()) > 1e-3 for t in huge.tensors.values())


# -- casts to the stored dtype and PEFT's own precision -----------------------------------------------


def test_pack_module_refuses_what_does_not_fit_the_stored_dtype():
    q = skew_stack(1, 2, 4, seed=6)[0] * 1e40
    with pytest.raises(NumericalError, match=r"module 'layer': base_model\.model\.layer\.oft_R\.weight does not fit float32.*--scale"):
        pack_module("layer", "linear", q, "0.18", is_packed=False, dtype=torch.float32)
    with pytest.raises(NumericalError, match="does not fit bfloat16"):
        pack_module("layer", "linear", q * 1e10, "0.13", is_packed=False, dtype=torch.bfloat16)
    with pytest.raises(NumericalError, match="does not fit float16"):
        pack_module("layer", "linear", q / 1e34, "0.13", is_packed=False, dtype=torch.float16)
    assert pack_module("layer", "linear", q / 1e40, "0.18", is_packed=False, dtype=torch.float16)  # fits


def test_cast_checked():
    with pytest.raises(NumericalError, match=r"saved tensor 'head': does not fit float16"):
        cast_checked(torch.tensor([1e5, 1.0]), torch.float16, "saved tensor 'head'")
    assert cast_checked(torch.tensor([3, 4]), torch.float16, "x").dtype == torch.float16


@pytest.mark.parametrize("rmap", [RotationMap("neumann", 5, "0.18"), RotationMap("exact")], ids=["neumann", "exact"])
def test_rotation_overflows_only_for_generators_too_large_for_peft(rmap):
    q = skew_stack(1, 4, 8, seed=7)[0]
    assert not rotation_overflows(rmap, q, torch.float32)
    assert not rotation_overflows(rmap, q * 1e3, torch.float32)  # large, finite in float32: not refused
    assert rotation_overflows(rmap, q.sign() * 3e38, torch.float32)
    assert rotation_overflows(rmap, q.sign() * 3e38, torch.bfloat16)  # PEFT casts 16-bit adapters to float32 on CPU


def test_rotation_overflows_in_the_adapters_own_precision():
    """PEFT computes a float64 adapter's rotation in float64: what overflows float32 is fine there."""
    neumann = RotationMap("neumann", 5, "0.18")
    q = skew_stack(1, 4, 8, seed=7)[0] * 1e10
    assert rotation_overflows(neumann, q, torch.float32)
    assert not rotation_overflows(neumann, q, torch.float64)


# -- reading: duplicates, non-float generators, future PEFT ----------------------------------------------


def _upper_tensors() -> tuple[dict, dict[str, torch.Tensor]]:
    import json

    from safetensors.torch import load_file

    return json.loads((UPPER / "adapter_config.json").read_text()), load_file(str(UPPER / "adapter_model.safetensors"))


def test_a_module_stored_with_and_without_the_prefix_is_refused():
    config, tensors = _upper_tensors()
    key = sorted(tensors)[3]
    tensors[key.removeprefix("base_model.model.")] = tensors[key]
    with pytest.raises(AdapterFormatError, match=rf"stores '{key}' and '{key.removeprefix('base_model.model.')}'"):
        adapter_from_tensors(UPPER, config, TensorDict(tensors, "mem"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool])
def test_non_float_generators_are_refused(dtype):
    config, tensors = _upper_tensors()
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    with pytest.raises(AdapterFormatError, match=rf"{key} is stored as {str(dtype).removeprefix('torch.')}; OFT generators are floating point"):
        adapter_from_tensors(UPPER, config, TensorDict(tensors, "mem"))


@pytest.mark.parametrize("version, newer", [("0.21.2", False), ("0.21.99", False), ("0.18.0", False), ("0.13.2", False),
                                            ("0.22.0", True), ("0.22.0.dev0", True), ("1.0.0", True), ("0.30.1@abc", True)])  # fmt: skip
def test_newer_than_known(version, newer):
    assert newer_than_known(version) is newer


def test_a_future_peft_version_is_read_as_018_with_a_warning_in_every_report(tmp_path):
    import json
    import shutil

    from oftmerge.ops.inspect import inspect_adapters
    from oftmerge.ops.merge import merge_adapters
    from oftmerge.plan.fold import plan_fold

    future = tmp_path / "future"
    shutil.copytree(UPPER, future)
    config = json.loads((future / "adapter_config.json").read_text())
    (future / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.25.1"}))
    read = read_adapter(future)
    assert read.release == "0.18" and len(read.notes) == 1
    assert "PEFT 0.25.1, newer than the newest release oftmerge knows (0.21.x)" in read.notes[0] and "please report it" in read.notes[0]
    assert read_adapter(UPPER).notes == ()
    assert read.notes[0] in merge_adapters([future], dry_run=True).warnings
    assert read.notes[0] in inspect_adapters([future])["adapters"][0]["warnings"]
    from oftmerge.config import FoldConfig

    assert read.notes[0] in plan_fold(FoldConfig(future, str(ROOT / "adapters" / "base")), dry_run=True).warnings


def test_decouple_config_without_a_base_is_one_line():
    from oftmerge.config import DecoupleConfig
    from oftmerge.ops.decouple import decouple_merge

    for build in (lambda: DecoupleConfig(None, ["x"]), lambda: decouple_merge(None, ["x"]),  # type: ignore[arg-type]
                  lambda: DecoupleConfig("b", None), lambda: DecoupleConfig("b", 5), lambda: DecoupleConfig("b", [None])):  # type: ignore[arg-type]  # fmt: skip
        with pytest.raises(OftMergeError) as info:
            build()
        assert "\n" not in str(info.value) and ("base" in str(info.value) or "experts" in str(info.value))
