"""Orthogonal-residual decoupling, one tensor at a time: pure math on matrices, no model and no file.

The streaming run over checkpoints, LoRA experts against PEFT and bad inputs: integration/test_decouple.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oftmerge.linalg import cayley
from oftmerge.linalg.procrustes import CayleyDomainError, cayley_generator
from oftmerge.methods import get_method
from oftmerge.methods.decoupling import Settings, conflict_mask, decompose
from oftmerge.methods.euclidean import TensorContext, get_euclidean_method

from helpers import F64, rand, rotation

# ----------------------------------------------------------------------------------- per-tensor math


@pytest.mark.parametrize("shape", [(12, 8), (8, 8)])
def test_experts_that_are_rotations_of_the_base_are_recovered(shape):
    w0 = rand(*shape, seed=0)
    rs = [rotation(shape[1], seed=i) for i in range(3)]
    ws = torch.stack([w0 @ r for r in rs])
    dec = decompose("w", w0, ws, torch.ones(3, dtype=F64), Settings(euclidean="ta", anchor=0.0))
    assert dec.report.path == "decoupled"
    assert float(dec.parts.abs().max()) < 1e-10  # residuals are zero
    assert all(f < 1e-10 for f in dec.report.fits)
    qs = torch.stack([cayley_generator(r)[0] for r in rs])
    assert dec.report.q_norms == pytest.approx([float(q.norm()) for q in qs], rel=1e-8)
    q_m, _ = get_method("orthomerge")(qs.unsqueeze(1), torch.ones(3, dtype=F64))
    assert torch.allclose(dec.base_part, w0 @ cayley(q_m)[0], atol=1e-10)  # R recovered, merged in so(d)
    assert dec.report.merged_ortho_error < 1e-12 and dec.report.det_flips == 0


def test_wide_rotated_experts_have_zero_residual():
    w0 = rand(6, 16, seed=1)  # out < in: R is not unique, the fit is exact anyway
    ws = torch.stack([w0 @ rotation(16, seed=10 + i) for i in range(2)])
    dec = decompose("k_proj", w0, ws, torch.ones(2, dtype=F64), Settings())
    assert float(dec.parts.abs().max()) < 1e-5 * float(w0.abs().max())
    assert max(dec.report.q_norms) < 2.0 and dec.report.rotation_shift < 2 * max(dec.report.task_norms)


@pytest.mark.parametrize("exact_max", [2048, 4])
def test_merged_rotation_is_applied_without_forming_it(monkeypatch, exact_max):
    """apply_cayley: W0 cayley(Q) from one LU; the orthogonality error exact, or estimated from probes."""
    import oftmerge.methods.decoupling as D

    monkeypatch.setattr(D, "ORTHO_EXACT_MAX", exact_max)
    w0, a = rand(5, 12, seed=4), rand(12, 12, seed=5, scale=0.3)
    q = a - a.T
    base_part, err = D.apply_cayley(w0, q)
    r = cayley(q.unsqueeze(0))[0]
    assert torch.allclose(base_part, w0 @ r, atol=1e-13)
    assert err < 1e-12  # a rotation to rounding, by either measure
    # the estimate tracks a real error: a matrix that is not skew gives a non-orthogonal "R"
    bad = q + rand(12, 12, seed=6, scale=0.05)
    _, err_bad = D.apply_cayley(w0, bad)
    r_bad = torch.linalg.solve(torch.eye(12, dtype=F64) + bad, torch.eye(12, dtype=F64) - bad, left=False)
    exact = float((r_bad.T @ r_bad - torch.eye(12, dtype=F64)).norm())
    assert err_bad == pytest.approx(exact, rel=1e-10 if exact_max >= 12 else 0.8) and exact > 0.01


def test_wide_layers_decouple_in_the_row_space():
    """A down_proj-like layer (2 out < in): the rotations stay factored; same result as the dense solve."""
    import oftmerge.methods.decoupling as D
    from oftmerge.linalg.procrustes import procrustes_rotation

    w0 = rand(6, 20, seed=7)
    ws = torch.stack([w0 @ rotation(20, seed=20 + i, size=0.02) + rand(6, 20, seed=30 + i, scale=0.01) for i in range(3)])
    dec = decompose("down_proj", w0, ws, torch.ones(3, dtype=F64), Settings(euclidean="ta"))
    rs = [procrustes_rotation(w0, w, row_space=False)[0].dense() for w in ws]  # the in x in anchored solves
    qs = torch.stack([cayley_generator(r)[0] for r in rs]).unsqueeze(1)
    q_m, _ = get_method("orthomerge")(qs, torch.ones(3, dtype=F64))
    assert torch.allclose(dec.base_part, w0 @ cayley(q_m)[0], atol=1e-8)
    assert torch.allclose(dec.parts, ws - torch.stack([w0 @ r for r in rs]), atol=1e-8)
    assert dec.report.path == "decoupled" and dec.report.merged_ortho_error < 1e-12
    assert D.ORTHO_EXACT_MAX >= 20


@pytest.mark.parametrize("shape", [(8, 8), (3, 12)])
def test_linear_so_d_methods_are_streamed_into_one_accumulator(monkeypatch, shape):
    """orthomerge/mean_q get the weighted sum built one generator at a time (placed from the row-space core for
    wide layers); the same merge as stacking the N dense generators: bit for bit when dense, to rounding when factored."""
    import oftmerge.methods.decoupling as D

    w0 = rand(*shape, seed=11)
    ws = torch.stack([w0 @ rotation(shape[1], seed=50 + i, size=0.05) + rand(*shape, seed=60 + i, scale=0.01) for i in range(3)])
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    for name in ("orthomerge", "mean_q"):
        method, calls = get_method(name), []
        # the closures below use this iteration's method and calls, within the iteration (B023 is moot)

        def spy(s, norms, w, **opts):
            calls.append(tuple(s.shape))  # noqa: B023
            return method.from_sum(s, norms, w, **opts)  # noqa: B023

        monkeypatch.setattr(D, "get_method", lambda _n: dataclasses.replace(method, from_sum=spy))  # noqa: B023
        streamed = decompose("w", w0, ws, weights, Settings(euclidean="ta", orthogonal=name))
        assert calls == [(1, shape[1], shape[1])]  # one accumulated sum, not a stack of N
        monkeypatch.setattr(D, "get_method", lambda _n: dataclasses.replace(method, from_sum=None))  # noqa: B023
        stacked = decompose("w", w0, ws, weights, Settings(euclidean="ta", orthogonal=name))
        monkeypatch.undo()
        assert streamed.report.q_norms == pytest.approx(stacked.report.q_norms, rel=1e-12)
        if shape[0] * 2 >= shape[1]:  # dense rotations
            assert torch.equal(streamed.base_part, stacked.base_part)
        else:
            assert torch.allclose(streamed.base_part, stacked.base_part, rtol=0, atol=1e-13)
        assert streamed.report.stats == pytest.approx(stacked.report.stats)


@pytest.mark.parametrize("procrustes", ["robust", "reference", "fast"])
@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_one_expert_with_task_arithmetic_gives_it_back(procrustes, shape):
    w0 = rand(*shape, seed=2)
    w1 = w0 + rand(*shape, seed=3, scale=0.1)
    dec = decompose("w", w0, w1.unsqueeze(0), torch.ones(1, dtype=F64), Settings(euclidean="ta", procrustes=procrustes))
    merged, _ = get_euclidean_method("ta")(dec.parts, torch.ones(1, dtype=F64), context=TensorContext("w"))
    assert torch.allclose(dec.base_part + merged, w1, atol=1e-12)


def test_conflict_mask_keeps_rows_that_oppose_the_mean():
    taus = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
                         [[1.0, 0.1], [-3.0, -3.0], [1.0, 0.0]]], dtype=F64)
    # mean rows: (1, .05), (-1, -1), (.5, 0): expert 0 opposes row 1, expert 1 opposes nothing
    assert conflict_mask(taus).tolist() == [[False, True, False], [False, False, False]]
    w0 = rand(3, 2, seed=4)
    dec = decompose("w", w0, w0 + taus, torch.ones(2, dtype=F64), Settings(target="conflict"))
    assert dec.report.conflict_rows == (1, 0)
    assert dec.report.fits[1] is None  # target = W0 for expert 1: nothing to fit


def _far_experts(angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    w0 = torch.eye(6, dtype=F64) + rand(6, 6, seed=5, scale=0.01)
    c, s = torch.cos(torch.tensor(angle, dtype=F64)), torch.sin(torch.tensor(angle, dtype=F64))
    r = torch.eye(6, dtype=F64)
    r[:2, :2] = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    return w0, torch.stack([w0 @ r, w0 @ rotation(6, seed=6)])


def test_rotations_outside_the_cayley_chart():
    w0, ws = _far_experts(torch.pi - 2e-3)
    w = torch.ones(2, dtype=F64)
    dec = decompose("layer.7", w0, ws, w, Settings(euclidean="ta"))  # default: the exponential chart
    assert dec.report.path == "decoupled" and dec.report.chart == "log"
    assert dec.report.min_margin < 1e-2 and max(dec.report.q_norms) == pytest.approx((torch.pi - 2e-3) * 2 ** 0.5, rel=1e-3)  # log: +-theta
    dec = decompose("layer.7", w0, ws, w, Settings(euclidean="ta", on_domain_error="euclidean"))
    assert dec.report.path.startswith("fallback: tensor 'layer.7': the rotation has an eigenvalue within")
    assert torch.equal(dec.base_part, w0) and torch.allclose(dec.parts, ws - w0)
    dec = decompose("layer.7", w0, ws, w, Settings(euclidean="ta", orthogonal="karcher"))  # not linear in the chart
    assert dec.report.path.startswith("fallback:")
    with pytest.raises(CayleyDomainError, match=r"tensor 'layer.7': the rotation has an eigenvalue .* on_domain_error='log'"):
        decompose("layer.7", w0, ws, w, Settings(on_domain_error="error"))
    # the reference path reproduces the huge generator instead (no margin), but stays finite
    dec = decompose("layer.7", w0, ws, w, Settings(procrustes="reference", euclidean="ta"))
    assert dec.report.chart == "cayley" and max(dec.report.q_norms) > 500
    assert bool(torch.isfinite(dec.base_part).all())


def test_a_merged_rotation_is_bounded():
    w0 = rand(8, 8, seed=7)
    ws = w0 + rand(2, 8, 8, seed=8, scale=0.1)
    w = torch.ones(2, dtype=F64)
    dec = decompose("w", w0, ws, w, Settings(max_rotation=1e-3))
    assert dec.report.path.startswith("fallback: merged rotation moves W0 by")
    assert torch.equal(dec.base_part, w0)
    ref = decompose("w", w0, ws, w, Settings(max_rotation=1e-3, procrustes="reference"))
    assert ref.report.path == "decoupled" and "limit max_rotation=0.001" in ref.report.notes[-1]


# ----------------------------------------------------------------------------------- model-wide TIES trim


def test_model_wide_thresholds_from_the_histogram():
    from oftmerge.ops.decouple import _HIST_BINS, _LOG_HI, _LOG_LO, _thresholds

    values = torch.arange(1, 1001, dtype=F64)
    hist = torch.histc(torch.log10(values), bins=_HIST_BINS, min=_LOG_LO, max=_LOG_HI).unsqueeze(0)
    (t,) = _thresholds(hist, [1000], 0.1)
    assert 0.998 * 901 <= t <= 901  # keeps the top 100 values, up to one histogram bin (0.18%)
    assert _thresholds(hist, [1000], 0.0001) == [float("inf")]
