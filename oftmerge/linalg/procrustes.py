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
    ``mu = anchor * ||M||_2`` (estimated by :func:`spectral_norm`). The small
    multiple of the identity decides the null space in favour of "no rotation"
    and leaves the fit unchanged to ``O(anchor)``; the last singular vector is
    flipped when ``det < 0`` so the result is a rotation (``det = +1``), never a
    reflection (Traps 1 and 3).
``"fast"``
    the same matrix ``M + mu I`` through Newton's polar iteration (Higham 1986)
    with Byers–Xu scaling, which converges quadratically after a few scaled
    steps (about 7 for condition numbers near 1e6). Its
    orthogonality error ``||R^T R - I||_F`` is always measured; above
    ``fast_tol`` (1e-5), or when ``det(M + mu I) < 0`` (the polar factor would be
    a reflection), the exact ``"robust"`` path is used instead and
    :attr:`ProcrustesInfo.fell_back` says so.

Wide layers (``2 out < in``: ``down_proj``, GQA ``k_proj``/``v_proj``) are solved in the row
space, for the ``"robust"`` and ``"fast"`` solvers: ``M`` only acts within the span of the rows of
``W0`` and ``T``. With ``P`` ``(in, k)`` an orthonormal basis of that span (``k = 2 out``, one QR),
``M = P A P^T`` with ``A = (W0 P)^T (T P)``, and the polar factor of ``M + mu I`` is
``I + P (C - I) P^T`` with ``C`` the polar factor of ``A + mu I``: a ``k x k`` problem instead of an
``in x in`` one, and the identity, exactly, on the rest (the null-space anchoring, without the
anchor's rounding). :class:`Rotation` keeps ``R`` in that factored form; the det = +1 correction
flips ``C``'s smallest singular direction.

(The 5-step quintic "Newton–Schulz" of Muon, coefficients 3.4445, -4.7750,
2.0315, is not offered: it does not converge to the polar factor — Trap 2.)

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
from oftmerge.linalg.groups import orthogonality_error

__all__ = [
    "CayleyDomainError",
    "ProcrustesInfo",
    "Rotation",
    "cayley_generator",
    "cayley_margin",
    "NewtonPolar",
    "ortho_error",
    "orthogonal_procrustes",
    "polar_newton",
    "procrustes_rotation",
    "special_polar",
    "spectral_norm",
]

Solver = Literal["robust", "reference", "fast"]
SOLVERS: tuple[str, ...] = ("robust", "reference", "fast")

#: ``mu = NULLSPACE_ANCHOR * ||W0^T T||_2`` is added to the diagonal before the polar factor.
NULLSPACE_ANCHOR = 1e-6
#: the fast solver's result is accepted only if ``||R^T R - I||_F`` is below this.
FAST_ORTHO_TOL = 1e-5
#: Newton's polar iteration stops when a step changes ``X`` by less than this (Frobenius, relative);
#: convergence is quadratic, so what is left after it is about its square.
NEWTON_STEP_TOL = 1e-6
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
    ortho_error: float  #: ``||R^T R - I||_F`` of the returned ``R`` (:func:`ortho_error`: estimated above 2048 columns)
    iterations: int = 0  #: Newton steps of the fast solver (0 for the SVD paths)
    fell_back: bool = False  #: the fast solver's result was rejected (see ``reason``)
    reason: str = ""


#: power iterations for the anchor's ``||M||_2`` (an estimate from below; the anchor only needs its size).
POWER_ITERATIONS = 30


def spectral_norm(m: torch.Tensor, iterations: int = POWER_ITERATIONS) -> float:
    """``||m||_2`` estimated by power iteration on ``m^T m`` from a fixed start (deterministic).

    Never above the true value; within a few parts in a thousand after 30 iterations unless the
    two largest singular values are nearly equal, where any vector of their span gives about
    the same value. Costs ``2 * iterations`` matrix-vector products instead of an SVD.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(m.shape[-1], 1, generator=g, dtype=torch.float64).to(dtype=m.dtype, device=m.device)
    est = 0.0
    for _ in range(iterations):
        u = m @ v
        est = float(torch.linalg.vector_norm(u))
        if est == 0.0 or not math.isfinite(est):
            return est
        v = m.transpose(-2, -1) @ (u / est)
        v = v / torch.linalg.vector_norm(v)
    return float(torch.linalg.vector_norm(m @ v))


def special_polar(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The special-orthogonal polar factor of square ``m`` and whether a flip was needed.

    ``m = U S V^T``; the result is ``U D V^T`` with ``D = diag(1, ..., 1, det(U V^T))``:
    the rotation maximising ``tr(R^T m)`` over SO(d) (Kabsch / Umeyama). The flip is the
    rank-one update ``U V^T - 2 u_d v_d^T``: one product of the factors, not two.
    """
    u, _, vh = torch.linalg.svd(m)
    r = u @ vh
    flipped = bool(torch.linalg.det(r) < 0)
    if flipped:
        r.addmm_(u[:, -1:], vh[-1:, :], alpha=-2.0)
    return r, flipped


#: the fast solver runs Newton's steps after the first in float32 from this width on (below it a float64
#: step costs next to nothing and float32 would only lose digits).
FAST_FLOAT32_MIN = 512


@dataclass(frozen=True)
class NewtonPolar:
    """What :func:`polar_newton` returns."""

    x: torch.Tensor  #: the polar factor (float64 when ``m`` is), or the last iterate if it did not converge
    iterations: int  #: Newton steps taken
    det_sign: float  #: sign of ``det(m)`` from the first step's LU (the polar factor is a reflection if < 0)
    ortho_error: float  #: ``||X^T X - I||_F`` of ``x``: exact up to ``ORTHO_EXACT_MAX`` columns, else estimated
    low_precision_steps: int = 0  #: steps taken in float32


#: above this width an orthogonality error is estimated from random probes (see :func:`ortho_error`).
ORTHO_EXACT_MAX = 2048
ORTHO_PROBES = 8


def ortho_error(x: torch.Tensor, *, exact_max: int = ORTHO_EXACT_MAX) -> float:
    """``||X^T X - I||_F`` in float64: exact up to ``exact_max`` columns, above it a Hutchinson estimate.

    The estimate is ``sqrt(mean_j ||(X^T X - I) g_j||^2)`` over ``ORTHO_PROBES`` seeded Gaussian
    probes (right on average, within a factor of about 2): ``2 * ORTHO_PROBES`` matrix-vector
    products instead of a ``d x d`` product.
    """
    d = x.shape[-1]
    x = x.to(torch.float64)
    if d <= exact_max:
        return float(orthogonality_error(x))
    g = torch.randn(d, ORTHO_PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    e = x.transpose(0, 1) @ (x @ g) - g
    return float(torch.sqrt((e * e).sum() / ORTHO_PROBES))


def _det_sign(lu: torch.Tensor, pivots: torch.Tensor) -> float:
    """Sign of the determinant from an LU factorisation (``torch.linalg.lu_factor``'s 1-based pivots)."""
    diag = lu.diagonal()
    if bool((diag == 0).any()):
        return 0.0
    negative = int((diag < 0).sum()) + int((pivots != torch.arange(1, pivots.numel() + 1, device=pivots.device)).sum())
    return -1.0 if negative % 2 else 1.0


def polar_newton(
    m: torch.Tensor,
    *,
    step_tol: float = NEWTON_STEP_TOL,
    max_iter: int = NEWTON_MAX_ITER,
    low: torch.dtype | None = None,
    stop_on_reflection: bool = False,
) -> NewtonPolar:
    """Orthogonal polar factor of a nonsingular square ``m`` by scaled Newton iteration.

    ``X <- (z X + (z X)^-T) / 2`` with the suboptimal scalars of Byers & Xu (SIAM J. Matrix
    Anal. Appl. 30, 2008): ``z_0 = (a b)^(-1/2)`` from estimates of ``a = ||m||_2`` and
    ``b = 1 / ||m^-1||_2`` (power iteration on ``m`` and on the first inverse), then
    ``z_1 = (2 sqrt(a b) / (a + b))^(1/2)`` and ``z_(k+1) = (2 / (z_k + 1 / z_k))^(1/2)``: about 6
    inverses for condition numbers near 1e6, where Frobenius-norm scaling took 11. Each inverse
    is one LU and a solve. Stops when a step changes ``X`` by less than ``step_tol`` (relative,
    Frobenius): Newton converges quadratically, so the error left is about its square.

    ``low`` (``torch.float32``; default: float32 from ``FAST_FLOAT32_MIN`` columns on, else none):
    the first step, where ``m`` is worst conditioned (condition number up to ``1 / anchor``), stays
    in ``m``'s dtype, the later ones (condition numbers ~sqrt of that and falling) run in ``low``
    at roughly half the cost, stopping at ``max(step_tol, 1e-3)``; then one Newton–Schulz step in
    float64, ``X (I - E / 2)`` with ``E = X^T X - I``, brings ``||X^T X - I||`` from float32's
    ~1e-5 to ~``||E||^2``. The result agrees with the float64 polar factor to about float32's
    precision times the condition number of the second iterate. The caller checks ``ortho_error``
    (a singular ``m`` does not converge).
    ``stop_on_reflection``: return after the first LU when ``det(m) <= 0`` (the polar factor is then
    not a rotation; the Procrustes solver hands such a matrix to the SVD path).
    """
    d = m.shape[-1]
    if low is None:
        low = torch.float32 if d >= FAST_FLOAT32_MIN and m.dtype == torch.float64 else m.dtype
    x = m
    z, a, b = 1.0, 0.0, 0.0
    det_sign, low_steps, k = 1.0, 0, 0
    tol = step_tol if low == m.dtype else max(step_tol, 1e-3)
    for k in range(1, max_iter + 1):
        work = x if k == 1 else x.to(low)
        lu, piv, info = torch.linalg.lu_factor_ex(work)
        if k == 1:
            det_sign = _det_sign(lu, piv)
            if det_sign <= 0 and stop_on_reflection:
                return NewtonPolar(x, k, det_sign, math.inf)
        if int(info) != 0:  # singular to working precision
            return NewtonPolar(x, k, det_sign, math.inf, low_steps)
        eye = torch.eye(d, dtype=work.dtype, device=work.device)
        xinv_t = torch.linalg.lu_solve(lu, piv, eye, adjoint=True)
        del lu, eye
        if k == 1:
            a, b_inv = spectral_norm(work), spectral_norm(xinv_t)
            if not (a > 0 and b_inv > 0 and math.isfinite(a * b_inv)):
                return NewtonPolar(x, k, det_sign, math.inf)
            b = 1.0 / b_inv
            z = 1.0 / math.sqrt(a * b)
        elif k == 2:
            z = math.sqrt(2.0 * math.sqrt(a * b) / (a + b))
        else:
            z = math.sqrt(2.0 / (z + 1.0 / z))
        new = xinv_t.mul_(0.5 / z).add_(work, alpha=0.5 * z).to(low)
        del xinv_t
        change = float(torch.linalg.matrix_norm(new - work.to(low)) / torch.linalg.matrix_norm(new))
        low_steps += int(k > 1 and low != m.dtype)
        x = new
        if not math.isfinite(change) or change < tol:
            break
    if x.dtype == m.dtype:
        return NewtonPolar(x, k, det_sign, ortho_error(x), low_steps)
    x64 = x.to(m.dtype)
    e = x64.transpose(0, 1) @ x64  # X^T X - I, in float64: float32 cannot resolve it
    e.diagonal().sub_(1.0)
    if not bool(torch.isfinite(e).all()) or float(torch.linalg.matrix_norm(e)) > 0.5:
        return NewtonPolar(x64, k, det_sign, _norm_or_inf(e), low_steps)
    x64.sub_((x @ e.to(low)).to(m.dtype), alpha=0.5)  # X E is ~||E|| small: float32 is exact enough
    del e
    return NewtonPolar(x64, k, det_sign, ortho_error(x64), low_steps)


def _norm_or_inf(e: torch.Tensor) -> float:
    v = float(torch.linalg.matrix_norm(e))
    return v if math.isfinite(v) else math.inf


@dataclass(frozen=True)
class Rotation:
    """An orthogonal ``(d, d)`` matrix ``R``, factored for wide layers as ``I + P (C - I) P^T``.

    ``basis`` ``P`` ``(d, k)`` has orthonormal columns and ``core`` ``C`` ``(k, k)`` is
    orthogonal; without a basis, ``core`` is ``R`` itself. Everything the decoupling needs
    (``W0 R``, the Cayley generator, the chart's margin) is computed from the factors.
    """

    core: torch.Tensor
    basis: torch.Tensor | None = None
    #: ``W0 P``, kept from the solve so that :meth:`apply` to ``W0`` does not recompute it
    base_product: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int((self.core if self.basis is None else self.basis).shape[0])

    def dense(self) -> torch.Tensor:
        """``R`` as a ``(d, d)`` matrix."""
        if self.basis is None:
            return self.core
        p = self.basis
        eye_k = torch.eye(self.core.shape[0], dtype=p.dtype, device=p.device)
        r = (p @ (self.core - eye_k)) @ p.transpose(0, 1)
        r.diagonal().add_(1.0)
        return r

    def apply(self, w: torch.Tensor, *, is_base: bool = False) -> torch.Tensor:
        """``w @ R`` for ``w`` ``(out, d)``; ``is_base``: ``w`` is the ``W0`` of the solve (reuses ``W0 P``)."""
        if self.basis is None:
            return w @ self.core
        p = self.basis
        wp = self.base_product if is_base and self.base_product is not None else w @ p
        eye_k = torch.eye(self.core.shape[0], dtype=p.dtype, device=p.device)
        return torch.addmm(w, wp @ (self.core - eye_k), p.transpose(0, 1))

    def margin(self) -> float:
        """:func:`cayley_margin` of ``R`` (the identity part contributes 2)."""
        return cayley_margin(self.core)

    def generator_core(self, *, margin: float = 0.0, where: str = "") -> tuple[torch.Tensor, float]:
        """:func:`cayley_generator` of the core: ``Q_C`` with ``Q = P Q_C P^T`` (``Q`` itself when dense).

        ``||Q||_F = ||Q_C||_F`` (``P`` has orthonormal columns); :meth:`embed` places ``Q_C``.
        """
        return cayley_generator(self.core, margin=margin, where=where)

    def embed(self, q_core: torch.Tensor, *, into: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
        """``alpha P Q_C P^T``, or ``into + alpha P Q_C P^T`` computed in place (no ``(d, d)`` temporary).

        Dense: ``into + q_core * alpha``, rounded as :func:`oftmerge.methods.weighted_sum` rounds.
        """
        if self.basis is None:
            if into is None:
                return q_core * alpha
            return into.add_(q_core * alpha)
        p = self.basis
        if into is None:
            return torch.mm(p @ q_core, p.transpose(0, 1)).mul_(alpha)
        return into.addmm_(p @ q_core, p.transpose(0, 1), alpha=alpha)

    def generator(self, *, margin: float = 0.0, where: str = "") -> tuple[torch.Tensor, float]:
        """:func:`cayley_generator` of ``R``: ``P Q_C P^T`` for a factored ``R`` (Cayley maps ``I`` to 0)."""
        q, got = self.generator_core(margin=margin, where=where)
        return (q if self.basis is None else self.embed(q)), got


def _row_space(w0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Orthonormal ``(in, 2 out)`` basis whose span holds the rows of ``w0`` and ``target``.

    Householder QR: the columns are orthonormal even when the rows are dependent (a LoRA
    target adds only ``r`` directions); the span then also holds harmless extra directions.
    """
    q, _ = torch.linalg.qr(torch.cat([w0, target]).transpose(0, 1))
    return q


def procrustes_rotation(
    w0: torch.Tensor,
    target: torch.Tensor,
    *,
    solver: Solver = "robust",
    anchor: float = NULLSPACE_ANCHOR,
    fast_tol: float = FAST_ORTHO_TOL,
    row_space: bool | None = None,
) -> tuple[Rotation, ProcrustesInfo]:
    """:func:`orthogonal_procrustes`, with ``R`` as a :class:`Rotation` (factored for wide layers).

    ``row_space``: solve in the span of the rows (the module docstring); default: when
    ``2 out < in`` and the solver is not ``"reference"`` (which stays the plain formula).
    """
    _check(w0, target, solver)
    out, n = w0.shape
    if row_space is None:
        row_space = solver != "reference" and 2 * out < n
    if not row_space:
        r, info = _polar_of_cross(w0.transpose(0, 1) @ target, solver, anchor, fast_tol)
        return Rotation(r), info
    if solver == "reference":
        raise ValueError("the reference solver is the plain in x in formula; it has no row-space form")
    p = _row_space(w0, target)
    w0p = w0 @ p
    core, info = _polar_of_cross(w0p.transpose(0, 1) @ (target @ p), solver, anchor, fast_tol)
    return Rotation(core, p, w0p), info


def _check(w0: torch.Tensor, target: torch.Tensor, solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown Procrustes solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if w0.shape != target.shape or w0.dim() != 2:
        raise ValueError(f"procrustes needs two (out, in) matrices of one shape, got {tuple(w0.shape)} and {tuple(target.shape)}")


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
        cross: ``w0.T @ target`` when the caller already has it (the ``in x in``
            problem is then solved as given, never in the row space).

    Returns:
        ``(R, info)`` with :class:`ProcrustesInfo`. Wide layers are solved in the row space
        (:func:`procrustes_rotation`) and returned dense.
    """
    if cross is None:
        rotation, info = procrustes_rotation(w0, target, solver=solver, anchor=anchor, fast_tol=fast_tol)
        return rotation.dense(), info
    _check(w0, target, solver)
    return _polar_of_cross(cross, solver, anchor, fast_tol)


def _polar_of_cross(m: torch.Tensor, solver: str, anchor: float, fast_tol: float) -> tuple[torch.Tensor, ProcrustesInfo]:
    """The rotation maximising ``tr(R^T m)`` by ``solver`` (anchored unless ``"reference"``)."""
    if solver == "reference":
        u, _, vh = torch.linalg.svd(m)
        r = u @ vh
        return r, ProcrustesInfo("reference", False, ortho_error(r))
    if anchor > 0:
        mu = anchor * spectral_norm(m)
        m = m + mu * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    reason = ""
    if solver == "fast":
        got = polar_newton(m, stop_on_reflection=True)
        if got.det_sign <= 0:
            reason = "det(W0^T T + mu I) <= 0: the polar factor is a reflection (or singular); exact SVD path used"
        elif got.ortho_error <= fast_tol and bool(torch.isfinite(got.x).all()):
            return got.x, ProcrustesInfo("fast", False, got.ortho_error, iterations=got.iterations)
        else:
            reason = (f"Newton polar iteration reached ||R^T R - I||_F = {got.ortho_error:.3g} > {fast_tol:g} "
                      f"after {got.iterations} steps")  # fmt: skip
        del got
    r, flipped = special_polar(m)
    return r, ProcrustesInfo("robust", flipped, ortho_error(r), fell_back=solver == "fast", reason=reason)


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
    The margin is ``2 / sqrt(1 + ||Q||_2^2)``, which for an orthogonal ``R`` is
    :func:`cayley_margin` (``||Q||_2 = tan(theta_max / 2)``), here from :func:`spectral_norm`
    of ``Q``: no eigenvalue problem beside the solve. Raises :class:`CayleyDomainError`
    (naming ``where``) when it is below ``margin``, or when ``Q`` is not finite.
    """
    at = f"{where}: " if where else ""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    try:
        raw = torch.linalg.solve(eye + r, eye - r, left=False)
    except RuntimeError as exc:  # LAPACK reports an exactly singular I + R
        raise CayleyDomainError(f"{at}the inverse Cayley map failed ({exc})") from None
    if not bool(torch.isfinite(raw).all()):
        raise CayleyDomainError(f"{at}the inverse Cayley map gave non-finite values")
    # the norm of the solve as it came out: near a reflection's -1 eigenvalue its huge part is
    # symmetric, which the skew projection below would hide
    norm = spectral_norm(raw)
    q = 0.5 * (raw - raw.transpose(-2, -1))
    del raw
    got = 2.0 / math.sqrt(1.0 + norm * norm) if math.isfinite(norm) and norm < 1e150 else 0.0
    if got < margin:
        raise CayleyDomainError(
            f"{at}the rotation has an eigenvalue within {got:.3g} of -1 (smallest singular value of I + R, "
            f"limit {margin:g}); the inverse Cayley map is undefined or explodes there"
        )
    return q, got
