"""Orthogonal Procrustes for full weight matrices, and the Cayley chart's domain.

The problem: given a base weight ``W0`` and a target ``T`` (both ``(out, in)``,
torch layout), find the rotation ``R`` ``(in, in)`` with ``W0 @ R`` closest to
``T`` in Frobenius norm. Expanding the norm, ``R`` maximises ``tr(R^T M)`` with
``M = W0^T T``, so ``R`` is the orthogonal polar factor of ``M``.

Three solvers (``solver=``):

``"reference"``
    ``U, _, Vh = svd(W0^T T); R = U @ Vh`` — the plain formula, bit for bit, kept
    to reproduce what the paper's reference code does. ``R`` may be a reflection
    (``det = -1``), and when ``out < in`` ``M`` has rank ``<= out``: ``R`` is then
    arbitrary on the null space and often has eigenvalues at -1 there, where the
    inverse Cayley map explodes (spec Trap 1).
``"robust"`` (default)
    the special-orthogonal polar factor of ``M + mu I`` with
    ``mu = anchor * ||M||_2``. The small multiple of the identity decides the
    null space in favour of "no rotation" and leaves the fit unchanged to
    ``O(anchor)``; the last singular vector is flipped when ``det < 0`` so the
    result is a rotation (``det = +1``), never a reflection (Traps 1 and 3).
``"fast"``
    the same matrix ``M + mu I`` through Newton's polar iteration with
    Frobenius-norm scaling (Higham 1986), which converges quadratically after a
    few scaled steps (about 10 for condition numbers up to 1e8). Its
    orthogonality error ``||R^T R - I||_F`` is always measured; above
    ``fast_tol`` (1e-5), or when ``det(M + mu I) < 0`` (the polar factor would be
    a reflection), the exact ``"robust"`` path is used instead and
    :attr:`ProcrustesInfo.fell_back` says so.

(The 5-step quintic "Newton–Schulz" of Muon, coefficients 3.4445, -4.7750,
2.0315, is not offered: it does not converge to the polar factor — Trap 2,
pinned by ``tests/test_procrustes.py``.)

The Cayley chart ``Q = (I - R)(I + R)^-1`` needs ``I + R`` invertible:
:func:`cayley_margin` is the smallest singular value of ``I + R`` (``2 cos(theta/2)``
for the largest rotation angle ``theta``) and :func:`cayley_generator` refuses rotations
whose margin is below a tolerance with :class:`CayleyDomainError`.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> w0 = torch.randn(6, 4, dtype=torch.float64, generator=g)
>>> a = torch.randn(4, 4, dtype=torch.float64, generator=g) * 0.1
>>> r_true = torch.linalg.matrix_exp(a - a.T)
>>> r, info = orthogonal_procrustes(w0, w0 @ r_true)
>>> bool(torch.allclose(r, r_true, atol=1e-5)), info.solver
(True, 'robust')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from oftmerge.errors import NumericalError
from oftmerge.linalg.cayley import inverse_cayley

__all__ = [
    "CayleyDomainError",
    "ProcrustesInfo",
    "cayley_generator",
    "cayley_margin",
    "orthogonal_procrustes",
    "polar_newton",
    "special_polar",
]

Solver = Literal["robust", "reference", "fast"]
SOLVERS: tuple[str, ...] = ("robust", "reference", "fast")

#: ``mu = NULLSPACE_ANCHOR * ||W0^T T||_2`` is added to the diagonal before the polar factor.
NULLSPACE_ANCHOR = 1e-6
#: the fast solver's result is accepted only if ``||R^T R - I||_F`` is below this.
FAST_ORTHO_TOL = 1e-5
#: Newton's polar iteration stops when a step changes ``X`` by less than this (Frobenius, relative).
NEWTON_STEP_TOL = 1e-13
NEWTON_MAX_ITER = 60
#: rotations whose ``I + R`` has a smallest singular value below this are outside the Cayley
#: chart for practical purposes (largest angle within ~1e-2 rad of pi, ``||Q||_2 > ~200``).
CAYLEY_MARGIN = 1e-2


class CayleyDomainError(NumericalError):
    """A rotation has an eigenvalue at (or numerically at) -1: it has no Cayley generator."""


@dataclass(frozen=True)
class ProcrustesInfo:
    """How a Procrustes solution was obtained."""

    solver: str  #: the solver that produced ``R`` (``"robust"`` when ``"fast"`` fell back)
    det_flipped: bool  #: the polar factor was a reflection and its last singular vector was flipped
    ortho_error: float  #: ``||R^T R - I||_F`` of the returned ``R``
    iterations: int = 0  #: Newton steps of the fast solver (0 for the SVD paths)
    fell_back: bool = False  #: the fast solver's result was rejected (see ``reason``)
    reason: str = ""


def _ortho_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return float(torch.linalg.matrix_norm(r.transpose(-2, -1) @ r - eye))


def special_polar(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The special-orthogonal polar factor of square ``m`` and whether a flip was needed.

    ``m = U S V^T``; the result is ``U D V^T`` with ``D = diag(1, ..., 1, det(U V^T))``:
    the rotation maximising ``tr(R^T m)`` over SO(d) (Kabsch / Umeyama).
    """
    u, _, vh = torch.linalg.svd(m)
    det = torch.linalg.det(u @ vh)
    flipped = bool(det < 0)
    if flipped:
        u = u.clone()
        u[:, -1] = -u[:, -1]
    return u @ vh, flipped


def polar_newton(
    m: torch.Tensor, *, step_tol: float = NEWTON_STEP_TOL, max_iter: int = NEWTON_MAX_ITER
) -> tuple[torch.Tensor, int]:
    """Orthogonal polar factor of a nonsingular square ``m`` by scaled Newton iteration.

    ``X <- (z X + (z X)^-T) / 2`` with ``z = (||X^-1||_F / ||X||_F)^(1/2)`` while far from
    convergence, unscaled near it. Returns ``(X, iterations)``; the caller checks
    orthogonality (a singular ``m`` gives a non-orthogonal or non-finite ``X``).
    """
    x = m
    for k in range(1, max_iter + 1):
        try:
            xinv_t = torch.linalg.inv(x).transpose(-2, -1)
        except RuntimeError:  # singular to working precision
            return x, k
        xn, xin = torch.linalg.matrix_norm(x), torch.linalg.matrix_norm(xinv_t)
        z = torch.sqrt(xin / xn)
        step_size = float((z - 1).abs())
        new = 0.5 * (z * x + xinv_t / z) if step_size > 1e-2 else 0.5 * (x + xinv_t)
        change = float(torch.linalg.matrix_norm(new - x) / torch.linalg.matrix_norm(new))
        x = new
        if not math.isfinite(change) or change < step_tol:
            return x, k
    return x, max_iter


def orthogonal_procrustes(
    w0: torch.Tensor,
    target: torch.Tensor,
    *,
    solver: Solver = "robust",
    anchor: float = NULLSPACE_ANCHOR,
    fast_tol: float = FAST_ORTHO_TOL,
    cross: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ProcrustesInfo]:
    """Rotation ``R`` ``(in, in)`` minimising ``||target - w0 @ R||_F`` (see the module docstring).

    Args:
        w0, target: ``(out, in)`` matrices of the same dtype; use float64 for
            anything larger than a toy (the polar factor of an ill-conditioned
            ``M`` is sensitive).
        solver: ``"robust"`` (default), ``"reference"`` or ``"fast"``.
        anchor: relative size of the identity added for ``"robust"``/``"fast"``
            (0 disables the null-space anchoring, keeping the det = +1 correction).
        fast_tol: largest ``||R^T R - I||_F`` the fast solver may return.
        cross: ``w0.T @ target`` when the caller already has it.

    Returns:
        ``(R, info)`` with :class:`ProcrustesInfo`.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown Procrustes solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if w0.shape != target.shape or w0.dim() != 2:
        raise ValueError(f"procrustes needs two (out, in) matrices of one shape, got {tuple(w0.shape)} and {tuple(target.shape)}")
    m = w0.transpose(0, 1) @ target if cross is None else cross
    if solver == "reference":
        u, _, vh = torch.linalg.svd(m)
        r = u @ vh
        return r, ProcrustesInfo("reference", False, _ortho_error(r))
    if anchor > 0:
        mu = anchor * float(torch.linalg.matrix_norm(m, ord=2))
        m = m + mu * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    reason = ""
    if solver == "fast":
        sign, _ = torch.linalg.slogdet(m)
        if float(sign) > 0:
            r, its = polar_newton(m)
            err = _ortho_error(r)
            if err <= fast_tol and bool(torch.isfinite(r).all()):
                return r, ProcrustesInfo("fast", False, err, iterations=its)
            reason = f"Newton polar iteration reached ||R^T R - I||_F = {err:.3g} > {fast_tol:g} after {its} steps"
        else:
            reason = "det(W0^T T + mu I) <= 0: the polar factor is a reflection (or singular); exact SVD path used"
    r, flipped = special_polar(m)
    return r, ProcrustesInfo("robust", flipped, _ortho_error(r), fell_back=solver == "fast", reason=reason)


def cayley_margin(r: torch.Tensor) -> float:
    """Smallest singular value of ``I + R`` for an orthogonal ``R`` (0 at an eigenvalue -1; 2 for ``R = I``).

    For orthogonal ``R``, ``(I + R)^T (I + R) = 2I + R + R^T``, so the margin is
    ``sqrt(2 + lambda_min(R + R^T)) = 2 cos(theta_max / 2)``: one symmetric eigenvalue
    problem instead of an SVD.
    """
    lam = torch.linalg.eigvalsh(r + r.transpose(-2, -1))[..., 0].min()
    return float(torch.sqrt(torch.clamp(2.0 + lam, min=0.0)))


def cayley_generator(r: torch.Tensor, *, margin: float = CAYLEY_MARGIN, where: str = "") -> tuple[torch.Tensor, float]:
    """The Cayley generator ``Q = (I - R)(I + R)^-1`` of rotation ``R`` and the margin it had.

    Same convention as :func:`oftmerge.linalg.cayley`: ``cayley(cayley_generator(R)[0]) == R``.
    The margin is :func:`cayley_margin` of ``R``. Raises :class:`CayleyDomainError`
    (naming ``where``) when it is below ``margin``, or when ``Q`` is not finite.
    """
    at = f"{where}: " if where else ""
    got = cayley_margin(r)
    if got < margin:
        raise CayleyDomainError(
            f"{at}the rotation has an eigenvalue within {got:.3g} of -1 (smallest singular value of I + R, "
            f"limit {margin:g}); the inverse Cayley map is undefined or explodes there"
        )
    try:
        q = inverse_cayley(r, tol=0.0)
    except (ValueError, RuntimeError) as exc:  # LAPACK reports an exactly singular I + R
        raise CayleyDomainError(f"{at}the inverse Cayley map failed ({exc})") from None
    if not bool(torch.isfinite(q).all()):
        raise CayleyDomainError(f"{at}the inverse Cayley map gave non-finite values")
    return q, got
