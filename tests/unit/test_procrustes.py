"""Procrustes solvers and the Cayley chart's domain: spec Traps 1-3, measured."""

from __future__ import annotations

import math

import pytest
import torch

import oftmerge.linalg.procrustes as P
from oftmerge.errors import NumericalError
from oftmerge.linalg import cayley
from oftmerge.linalg.procrustes import CayleyDomainError, cayley_generator, cayley_margin, orthogonal_procrustes, polar_newton, special_polar
from oftmerge.methods import get_method

from helpers import F64, rand, rotation


def eye(d: int) -> torch.Tensor:
    return torch.eye(d, dtype=F64)


def exact_ortho_error(r: torch.Tensor) -> float:
    """``||R^T R - I||_F``, formed directly (the solvers estimate it above ORTHO_EXACT_MAX columns)."""
    return float(torch.linalg.matrix_norm(r.transpose(-2, -1) @ r - torch.eye(r.shape[-1], dtype=r.dtype)))


@pytest.mark.parametrize("solver", ["robust", "reference", "fast"])
@pytest.mark.parametrize("shape", [(12, 12), (20, 8)])
def test_exact_rotations_are_recovered(solver, shape):
    w0 = rand(*shape, seed=1)
    r_true = rotation(shape[1], seed=2)
    r, info = orthogonal_procrustes(w0, w0 @ r_true, solver=solver)
    # the anchor mu = 1e-6 ||M|| moves R by O(mu / sigma_min(M)) where M = W0^T T is weakly determined;
    # the fit moves by O(mu) only
    assert torch.allclose(r, r_true, atol=1e-3 if solver != "reference" else 1e-10)
    assert float((w0 @ r - w0 @ r_true).norm()) < 1e-5 * float(w0.norm())
    assert info.ortho_error < 1e-12
    if solver != "reference":  # without the anchor the exact rotation comes back to rounding
        assert torch.allclose(orthogonal_procrustes(w0, w0 @ r_true, solver=solver, anchor=0.0)[0], r_true, atol=1e-10)
    assert float(torch.linalg.det(r)) == pytest.approx(1.0)
    assert torch.allclose(cayley(cayley_generator(r)[0].unsqueeze(0))[0], r, atol=1e-12)


def test_reference_is_the_plain_svd_bit_for_bit():
    w0, t = rand(16, 40, seed=3), rand(16, 40, seed=4)
    u, _, vh = torch.linalg.svd(w0.T @ t)
    r, info = orthogonal_procrustes(w0, t, solver="reference")
    assert torch.equal(r, u @ vh)
    assert info.solver == "reference" and not info.det_flipped


def _trap1(solver: str):
    """Spec Trap 1: W0 64 x 256, 3 experts with task vectors of relative size 0.02."""
    w0 = rand(64, 256, seed=0, scale=0.036)
    ws = [w0 + rand(64, 256, seed=10 + i, scale=0.036 * 0.02) for i in range(3)]
    qs, fits = [], []
    for w in ws:
        r, _ = orthogonal_procrustes(w0, w, solver=solver)
        qs.append(cayley_generator(r, margin=0.0)[0])
        fits.append(float((w - w0 @ r).norm() / (w - w0).norm()))
    q_m, _ = get_method("orthomerge")(torch.stack(qs).unsqueeze(1), torch.ones(3, dtype=F64))
    shift = float((w0 @ cayley(q_m)[0] - w0).norm())
    tau = sum(float((w - w0).norm()) for w in ws) / 3
    return [float(q.norm()) for q in qs], shift, tau, fits


def test_wide_layer_blows_up_the_reference_but_not_the_robust_solver():
    q_ref, shift_ref, tau, fit_ref = _trap1("reference")
    q_rob, shift_rob, _, fit_rob = _trap1("robust")
    q_fast, shift_fast, _, fit_fast = _trap1("fast")
    # reference: arbitrary on the 192-dim null space, eigenvalues near -1, generators in the hundreds
    assert min(q_ref) > 50 and max(q_ref) > 500
    assert shift_ref > 5 * tau
    # robust: sane generators (spec: 0.118 / 0.116 / 0.118), a merged rotation of the task's size
    assert max(q_rob) < 0.15
    assert shift_rob < 1.5 * tau
    # the same fit: the anchor only decides the null space (spec: 0.357)
    assert fit_rob == pytest.approx(fit_ref, abs=1e-6)
    assert fit_rob[0] == pytest.approx(0.357, abs=0.01)
    assert q_fast == pytest.approx(q_rob, rel=1e-6) and shift_fast == pytest.approx(shift_rob, rel=1e-6)
    assert fit_fast == pytest.approx(fit_rob, abs=1e-9)


def test_reflections_are_flipped_to_rotations():
    w0 = rand(10, 10, seed=5)
    reflect = eye(10)
    reflect[-1, -1] = -1.0
    target = w0 @ rotation(10, seed=6) @ reflect  # det(W0^T T) < 0: the best orthogonal fit is a reflection
    r_ref, _ = orthogonal_procrustes(w0, target, solver="reference")
    r, info = orthogonal_procrustes(w0, target, solver="robust")
    assert float(torch.linalg.det(r_ref)) == pytest.approx(-1.0)
    assert cayley_margin(r_ref) < 1e-10  # a reflection has an eigenvalue at exactly -1
    with pytest.raises(CayleyDomainError, match=r"tensor 'x': the rotation has an eigenvalue within .* of -1"):
        cayley_generator(r_ref, where="tensor 'x'")
    assert info.det_flipped and float(torch.linalg.det(r)) == pytest.approx(1.0)
    assert info.ortho_error < 1e-12
    q, margin = cayley_generator(r)
    assert bool(torch.isfinite(q).all()) and margin > 1e-2
    # SO(d)'s optimum is never better than O(d)'s
    assert float((target - w0 @ r).norm()) >= float((target - w0 @ r_ref).norm()) - 1e-12
    # the fast solver sees det < 0 and hands over to the exact path
    r_fast, info_fast = orthogonal_procrustes(w0, target, solver="fast")
    assert info_fast.fell_back and "reflection" in info_fast.reason
    assert torch.equal(r_fast, r)


def test_fast_solver_rejects_a_result_that_is_not_orthogonal(monkeypatch):
    w0, t = rand(12, 12, seed=7), rand(12, 12, seed=8)
    exact, _ = orthogonal_procrustes(w0, t, solver="robust")
    monkeypatch.setattr(P, "polar_newton", lambda m, **_: P.NewtonPolar(m, 3, 1.0, exact_ortho_error(m)))  # a "solver" that does nothing
    r, info = orthogonal_procrustes(w0, t, solver="fast")
    assert info.fell_back and info.solver == "robust"
    assert "||R^T R - I||_F" in info.reason and "after 3 steps" in info.reason
    assert torch.equal(r, exact)


def test_newton_polar_converges_where_two_steps_do_not():
    m = rand(30, 30, seed=9) @ torch.diag(torch.logspace(0, -6, 30, dtype=F64))
    exact, _ = special_polar(m) if torch.linalg.det(m) > 0 else special_polar(-m)
    got = polar_newton(m)
    assert exact_ortho_error(got.x) < 1e-12 and got.iterations < 20 and got.low_precision_steps == 0
    assert got.ortho_error == pytest.approx(exact_ortho_error(got.x), rel=1e-9)
    u, _, vh = torch.linalg.svd(m)
    assert torch.allclose(got.x, u @ vh, atol=1e-10)  # the polar factor, a reflection here (det m < 0)
    short = polar_newton(m, max_iter=2)
    assert exact_ortho_error(short.x) > P.FAST_ORTHO_TOL and short.ortho_error == pytest.approx(exact_ortho_error(short.x))


def test_newton_polar_in_float32_after_the_first_step():
    """Mixed precision (the default from FAST_FLOAT32_MIN columns): first step float64, then float32, one
    float64 Newton-Schulz polish. Orthogonal to float64 rounding; the factor agrees with the exact one to
    about float32 precision times the second iterate's condition number."""
    d = 96
    m = rand(d, d, seed=12) @ torch.diag(torch.logspace(0, -5, d, dtype=F64)) @ rotation(d, seed=13, size=0.3)
    if torch.linalg.det(m) < 0:
        m[:, 0] = -m[:, 0]
    exact, _ = special_polar(m)
    got = polar_newton(m, low=torch.float32)
    assert got.det_sign == 1.0
    assert got.x.dtype == F64 and got.low_precision_steps == got.iterations - 1 >= 3
    assert exact_ortho_error(got.x) < 1e-10 and got.ortho_error == pytest.approx(exact_ortho_error(got.x), rel=1e-6)
    err = float((got.x - exact).norm())
    assert 1e-9 < err < 1e-3  # float32 shows, and stays small (cond of the second iterate ~ sqrt(1e5))
    both64 = polar_newton(m, low=F64)
    assert float((both64.x - exact).norm()) < 1e-9
    assert polar_newton(m).low_precision_steps == 0  # below FAST_FLOAT32_MIN: float64 throughout
    # a reflection is seen from the first LU, before any iteration
    flipped = polar_newton(m @ torch.diag(torch.tensor([-1.0] + [1.0] * (d - 1), dtype=F64)), low=torch.float32, stop_on_reflection=True)
    assert flipped.det_sign < 0 and flipped.iterations == 1


def test_ortho_error_is_exact_then_estimated():
    x = rotation(64, seed=14) + rand(64, 64, seed=15, scale=1e-4)
    exact = exact_ortho_error(x)
    assert P.ortho_error(x) == exact
    est = P.ortho_error(x, exact_max=32)
    assert exact / 3 < est < 3 * exact


def muon_quintic(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The 5-step 'Newton-Schulz' of Muon (README of the reference code), in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m / m.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def test_muon_quintic_is_not_a_polar_solver():
    """Spec Trap 2: on a 256 x 256 W0^T W1 with condition number ~1e5 the quintic leaves
    singular values in a band around 1, far from the polar factor; the fast solver converges."""
    n = 256
    u, _ = torch.linalg.qr(rand(n, n, seed=0))
    v, _ = torch.linalg.qr(rand(n, n, seed=1))
    w0 = u @ torch.diag(torch.logspace(0, -2.5, n, dtype=F64)) @ v.T
    w1 = w0 + rand(n, n, seed=2, scale=1e-4)
    m = w0.T @ w1
    assert 3e4 < float(torch.linalg.cond(m)) < 3e5
    exact, _ = special_polar(m)
    assert float((exact - eye(n)).norm()) < 1.0  # the true rotation is small
    x = muon_quintic(m)
    assert exact_ortho_error(x) > 5.0  # spec measured 7.2
    assert float((x - exact).norm()) > 5.0  # spec measured 5.3
    r, info = orthogonal_procrustes(w0, w1, solver="fast", anchor=0.0)
    assert info.solver == "fast" and info.ortho_error < P.FAST_ORTHO_TOL
    assert float((r - exact).norm()) < 1e-9


def test_cayley_domain_is_checked_with_a_margin():
    theta = math.pi - 1e-4  # a plane rotated by almost pi: Q = tan(theta / 2) ~ 2e4
    r = eye(4)
    r[:2, :2] = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
    assert cayley_margin(r) == pytest.approx(2 * math.cos(theta / 2), rel=1e-6)
    assert cayley_margin(eye(4)) == 2.0
    with pytest.raises(CayleyDomainError, match=r"layer 3: .*limit 0.01") as exc:
        cayley_generator(r, where="layer 3")
    assert isinstance(exc.value, NumericalError)
    q, _ = cayley_generator(r, margin=0.0)  # without the margin: finite, but huge
    assert 1e3 < float(q.norm()) < 1e5
    assert torch.allclose(cayley(q.unsqueeze(0))[0], r, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown Procrustes solver 'svd'"):
        orthogonal_procrustes(eye(3), eye(3), solver="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"two \(out, in\) matrices of one shape, got \(3, 3\) and \(3, 4\)"):
        orthogonal_procrustes(eye(3), torch.zeros(3, 4, dtype=F64))


@pytest.mark.parametrize("solver", ["robust", "fast"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_wide_layers_are_solved_in_the_row_space(solver, kind):
    """2 out < in: the k x k problem in the span of the rows gives the in x in anchored answer."""
    w0 = rand(16, 64, seed=30)
    if kind == "full":
        t = w0 + rand(16, 64, seed=31, scale=0.05)
    else:  # a LoRA target: T's rows add only r = 2 directions, the basis still has 2 out orthonormal columns
        t = w0 + rand(16, 2, seed=32, scale=0.3) @ rand(2, 64, seed=33, scale=0.3)
    factored, info = P.procrustes_rotation(w0, t, solver=solver)
    assert factored.basis is not None and tuple(factored.basis.shape) == (64, 32) and info.solver == solver
    assert torch.allclose(factored.basis.T @ factored.basis, eye(32), atol=1e-13)
    dense, _ = P.procrustes_rotation(w0, t, solver=solver, row_space=False)
    assert dense.basis is None
    r, d = factored.dense(), dense.dense()
    assert torch.allclose(r, d, atol=1e-8)  # the same anchored problem; the anchor decides the rest alike
    assert float((r.T @ r - eye(64)).norm()) < 1e-12 and float(torch.linalg.det(r)) == pytest.approx(1.0)
    # outside the span R is the identity exactly, and every derived quantity matches the dense one
    outside = eye(64) - factored.basis @ factored.basis.T
    assert torch.allclose((r - eye(64)) @ outside, torch.zeros(64, 64, dtype=F64), atol=1e-13)
    assert torch.allclose(factored.apply(w0), w0 @ r, atol=1e-13)
    assert torch.allclose(factored.generator()[0], cayley_generator(r)[0], atol=1e-12)
    assert factored.margin() == pytest.approx(cayley_margin(r), abs=1e-10)
    assert torch.equal(orthogonal_procrustes(w0, t, solver=solver)[0], r)  # the dense entry point uses it too


def test_row_space_is_not_used_for_the_reference_or_square_layers():
    w0, t = rand(16, 64, seed=34), rand(16, 64, seed=35)
    assert P.procrustes_rotation(w0, t, solver="reference")[0].basis is None
    assert P.procrustes_rotation(rand(32, 64, seed=36), rand(32, 64, seed=37))[0].basis is None  # 2 out = in
    with pytest.raises(ValueError, match="reference"):
        P.procrustes_rotation(w0, t, solver="reference", row_space=True)


def test_spectral_norm_estimate():
    m = rand(50, 30, seed=40)
    exact = float(torch.linalg.matrix_norm(m, ord=2))
    est = P.spectral_norm(m)
    assert est <= exact * (1 + 1e-12) and est == pytest.approx(exact, rel=5e-3)  # sigma_2 / sigma_1 = 0.98 here
    assert P.spectral_norm(torch.zeros(5, 5, dtype=F64)) == 0.0
