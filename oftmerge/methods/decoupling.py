"""Orthogonal-residual decoupling of one weight tensor: the math, no files (OrthoMerge, section 3.3).

For a 2-D weight ``W0`` ``(out, in)`` (torch layout) and the experts' versions ``W_i``::

    T_i   = W_i                                   target "global"
          = W0 + tau_i * mask_i                   target "conflict": the rows (output neurons) whose
                                                  cosine with tau_mean's row is negative
    R_i   = argmin_R ||T_i - W0 R||_F             Procrustes (oftmerge.linalg.procrustes), R in SO(in)
    Q_i   = cayley^-1(R_i);  Q_m = so(d) method(Q_1..Q_N);  R_m = cayley(Q_m)
    rho_i = W_i - W0 R_i

:func:`decompose` returns ``W0 R_m`` and the residuals ``rho_i``; the caller merges the
residuals with a Euclidean method (:mod:`oftmerge.methods.euclidean`) and adds them:
``W = W0 R_m + rho_m``. The so(d) methods are the OFT registry's
(:func:`oftmerge.methods.get_method`), applied to a stack ``(N, 1, in, in)``: one block
of the full width. Our generator is ``Q = (I - R)(I + R)^-1`` (the repository's Cayley
convention, the paper's with the opposite sign); the so(d) methods are linear or
sign-symmetric in ``Q``, so the merge is the same.

>>> import torch
>>> w0 = torch.randn(8, 8, dtype=torch.float64)
>>> ws = w0 + 0.01 * torch.randn(2, 8, 8, dtype=torch.float64)
>>> dec = decompose("w", w0, ws, torch.ones(2, dtype=torch.float64), Settings(euclidean="ta"))
>>> dec.report.path, dec.parts.shape
('decoupled', torch.Size([2, 8, 8]))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from oftmerge.errors import NumericalError
from oftmerge.linalg import log_orthogonal, orthogonality_error
from oftmerge.linalg.procrustes import ORTHO_EXACT_MAX, ORTHO_PROBES, CayleyDomainError, Rotation, procrustes_rotation
from oftmerge.methods.registry import get_method

__all__ = ["Decomposition", "LayerReport", "Settings", "conflict_mask", "decompose"]

TARGETS = ("global", "conflict")
ON_DOMAIN_ERROR = ("log", "euclidean", "error")
#: a merged rotation may move ``W0`` by at most this many times the largest task vector of the layer.
MAX_ROTATION = 3.0
#: so(d) methods that are linear in the generators: they may merge in the exponential chart too.
_CHART_FREE = ("orthomerge", "mean_q")


@dataclass(frozen=True)
class Settings:
    """Every option of one decoupling run (recorded in ``oftmerge.json``)."""

    euclidean: str = "ties"
    euclidean_options: Mapping[str, Any] = field(default_factory=dict)
    orthogonal: str | None = "orthomerge"
    orthogonal_options: Mapping[str, Any] = field(default_factory=dict)
    target: str = "global"
    procrustes: str = "robust"
    anchor: float = 1e-6
    cayley_margin: float = 1e-2
    max_rotation: float = MAX_ROTATION
    on_domain_error: str = "log"
    euclidean_only: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["euclidean_options"] = dict(self.euclidean_options)
        d["orthogonal_options"] = dict(self.orthogonal_options)
        d["euclidean_only"] = list(self.euclidean_only)
        return d


@dataclass
class LayerReport:
    """What the merge did to one tensor: which path, and the decoupling diagnostics."""

    name: str
    shape: tuple[int, ...]
    path: str  #: "decoupled", "euclidean" (by design) or "fallback: <reason>"
    experts: tuple[int, ...]  #: indices (canonical order) of the experts that change this tensor
    task_norms: tuple[float, ...]  #: ||W_i - W0||_F
    q_norms: tuple[float, ...] = ()  #: ||Q_i||_F (decoupled layers)
    fits: tuple[float | None, ...] = ()  #: ||T_i - W0 R_i|| / ||T_i - W0|| (None when T_i = W0)
    conflict_rows: tuple[int, ...] = ()  #: rows kept in each conflict target
    rotation_shift: float = 0.0  #: ||W0 R_m - W0||_F
    residual_norm: float = 0.0  #: ||rho_m||_F (or of the merged task vector)
    merged_ortho_error: float = 0.0  #: ||R_m^T R_m - I||_F (estimated above 2048 columns: apply_cayley)
    min_margin: float = 2.0  #: min_i of the smallest singular value of I + R_i
    det_flips: int = 0
    chart: str = ""  #: "cayley" or "log" (decoupled layers)
    notes: tuple[str, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"] = dict(self.stats)
        return d


@dataclass
class Decomposition:
    """A tensor split for the Euclidean method: ``W = base_part + method(parts)``."""

    base_part: torch.Tensor  #: ``W0 R_m`` (decoupled) or ``W0``
    parts: torch.Tensor  #: ``(N, *shape)``: residuals ``rho_i`` or task vectors ``tau_i``
    report: LayerReport


def conflict_mask(taus: torch.Tensor) -> torch.Tensor:
    """``(N, out)`` boolean: rows of ``tau_i`` whose cosine with ``tau_mean``'s row is negative.

    A zero row (in ``tau_i`` or in the mean) has cosine 0 and is not a conflict.
    """
    mean = taus.mean(0, keepdim=True)
    dots = (taus * mean).sum(-1)
    norms = torch.linalg.vector_norm(taus, dim=-1) * torch.linalg.vector_norm(mean, dim=-1)
    cos = torch.where(norms > 0, dots / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(dots))
    return cos < 0


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def _euclidean_only(name: str, settings: Settings, reason: str, w0: torch.Tensor, taus: torch.Tensor, experts: tuple[int, ...]) -> Decomposition:
    norms = tuple(_norm(t) for t in taus)
    return Decomposition(w0, taus, LayerReport(name, tuple(w0.shape), reason, experts, norms))




def apply_cayley(w0: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``W0 R`` for ``R = cayley(Q) = (I - Q)(I + Q)^-1``, and ``||R^T R - I||_F``, from one LU of ``I + Q``.

    ``W0 R`` is the solution of ``X (I + Q) = W0 (I - Q)``: ``out`` right-hand sides instead of the
    ``in`` of forming ``R`` (a wide layer's ``in x in`` ``R`` is never built). The orthogonality
    error is exact up to ``ORTHO_EXACT_MAX`` columns; above, it is the Hutchinson estimate
    ``sqrt(mean_j ||(R^T R - I) g_j||^2)`` over ``ORTHO_PROBES`` seeded Gaussian probes (right on
    average; within a factor of about 2), with ``R^T = (I + Q)^-T (I - Q)^T`` through the same LU.
    """
    d = q.shape[0]
    plus = q.clone()
    plus.diagonal().add_(1.0)
    lu, piv = torch.linalg.lu_factor(plus)
    rhs = torch.addmm(w0, w0, q, alpha=-1.0)  # W0 (I - Q)
    base_part = torch.linalg.lu_solve(lu, piv, rhs.transpose(0, 1), adjoint=True).transpose(0, 1)
    del rhs
    if d <= ORTHO_EXACT_MAX:  # at most four d x d matrices at once: Q, the LU, R, R^T R
        minus = plus.neg_()  # I - Q, as eye - q rounds it (a factored Q's diagonal is only nearly zero)
        minus.diagonal().copy_(q.diagonal().neg().add_(1.0))
        r = torch.linalg.lu_solve(lu, piv, minus.transpose(0, 1), adjoint=True).transpose(0, 1)
        del minus, plus, lu
        gram = r.transpose(0, 1) @ r
        del r
        gram.diagonal().sub_(1.0)
        return base_part, _norm(gram)
    g = torch.randn(d, ORTHO_PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(q.dtype)
    y = torch.linalg.lu_solve(lu, piv, g)  # (I + Q)^-1 g
    y = torch.addmm(y, q, y, alpha=-1.0)  # R g = (I - Q)(I + Q)^-1 g
    z = torch.linalg.lu_solve(lu, piv, torch.addmm(y, q.transpose(0, 1), y, alpha=-1.0), adjoint=True)  # R^T R g
    return base_part, float(torch.sqrt(((z - g) ** 2).sum() / ORTHO_PROBES))


def _merge_generators(
    rotations: list[Rotation], weights: torch.Tensor, method: Any, options: Mapping[str, Any], margin: float, where: str
) -> tuple[torch.Tensor, dict[str, Any], list[float], list[float]]:
    """The so(d) merge of the rotations' Cayley generators: ``(Q_m (1, d, d), stats, margins, ||Q_i||_F)``.

    A method linear in the generators (``from_sum``: ``orthomerge``, ``mean_q``) gets the weighted
    sum accumulated one generator at a time, each placed straight from its row-space core: one
    ``(d, d)`` accumulator instead of ``N`` generators and their weighted copies. Other methods
    get the stack ``(N, 1, d, d)``. Raises :class:`CayleyDomainError` for a rotation outside the chart.
    """
    n, d = len(rotations), rotations[0].size
    margins: list[float] = []
    norms: list[float] = []
    if method.from_sum is not None:
        acc: torch.Tensor | None = None
        for r, w in zip(rotations, weights.tolist()):
            q, got = r.generator_core(margin=margin, where=where)
            margins.append(got)
            norms.append(_norm(q))
            acc = r.embed(q, into=acc, alpha=w)
            del q
        assert acc is not None
        block_norms = torch.tensor(norms, dtype=torch.float64).view(n, 1)
        q_m, stats = method.from_sum(acc.unsqueeze(0), block_norms, weights, **options)
        return q_m, stats, margins, norms
    qs = torch.empty(n, 1, d, d, dtype=rotations[0].core.dtype)  # one block of the full width
    for i, r in enumerate(rotations):
        qs[i, 0], got = r.generator(margin=margin, where=where)
        margins.append(got)
    norms = [_norm(q) for q in qs]
    q_m, stats = method(qs, weights, **options)
    return q_m, stats, margins, norms


def _fit_rotations(
    name: str, w0: torch.Tensor, ws: torch.Tensor, settings: Settings, experts: tuple[int, ...]
) -> tuple[list[Rotation], torch.Tensor, LayerReport]:
    """Each expert's Procrustes rotation ``W0 R_i ~ T_i``, its residual ``W_i - W0 R_i``, and the tensor's report so far."""
    if settings.target == "conflict":
        taus = ws - w0
        task_norms = tuple(_norm(t) for t in taus)
        mask = conflict_mask(taus)
        targets = w0 + taus * mask.unsqueeze(-1).to(taus.dtype)
        rows = tuple(int(m.sum()) for m in mask)
        del taus
    else:  # the task vectors one at a time: no (N, out, in) copy beside the experts' stack
        task_norms = tuple(_norm(w - w0) for w in ws)
        targets, rows = ws, ()
    n = ws.shape[0]
    fits, flips, notes = [], 0, []
    rhos = torch.empty_like(ws)
    rotations: list[Rotation] = []  # factored (row space) for wide layers: no in x in matrix per expert
    for i in range(n):
        r, info = procrustes_rotation(w0, targets[i], solver=settings.procrustes, anchor=settings.anchor)  # type: ignore[arg-type]
        flips += int(info.det_flipped)
        if info.fell_back:
            notes.append(f"expert {experts[i]}: fast solver fell back ({info.reason})")
        rot = r.apply(w0, is_base=True)
        moved = _norm(targets[i] - w0)
        fits.append(_norm(targets[i] - rot) / moved if moved > 0 else None)
        torch.sub(ws[i], rot, out=rhos[i])
        rotations.append(r)
        del r, rot
    del targets
    report = LayerReport(name, tuple(w0.shape), "decoupled", experts, task_norms, fits=tuple(fits),
                         conflict_rows=rows, det_flips=flips, chart="cayley", notes=tuple(notes))
    return rotations, rhos, report


def decompose(
    name: str,
    w0: torch.Tensor,
    ws: torch.Tensor,
    weights: torch.Tensor,
    settings: Settings,
    *,
    decouple: bool = True,
    experts: tuple[int, ...] | None = None,
) -> Decomposition:
    """Split one tensor for the Euclidean merge (pure math: float64 tensors in, no files).

    ``w0`` is the base tensor, ``ws`` ``(N, *shape)`` the experts' versions, ``weights``
    ``(N,)``. With ``decouple`` (2-D weights that are not embeddings) and an orthogonal
    method set, returns ``W0 R_m`` and the residuals; otherwise ``W0`` and the task
    vectors. Safety nets (see ``docs/decoupling.md``): a rotation outside the Cayley
    chart's domain (``on_domain_error``) and a merged rotation that moves ``W0`` by more
    than ``max_rotation`` times the largest task vector fall back to the Euclidean
    method alone for this tensor, with the reason in the report.
    """
    experts = tuple(range(ws.shape[0])) if experts is None else experts
    if not decouple or settings.orthogonal is None:
        return _euclidean_only(name, settings, "euclidean", w0, ws - w0, experts)
    reference = settings.procrustes == "reference"
    rotations, rhos, report = _fit_rotations(name, w0, ws, settings, experts)
    task_norms = report.task_norms

    def fallback(reason: str) -> Decomposition:
        report.path = f"fallback: {reason}"
        return Decomposition(w0, ws - w0, report)

    where = f"tensor {name!r}"
    method = get_method(settings.orthogonal)
    options = method.resolve_options(dict(settings.orthogonal_options))
    try:
        q_m, so_stats, margins, q_norms = _merge_generators(rotations, weights, method, options,
                                                            0.0 if reference else settings.cayley_margin, where)  # fmt: skip
    except CayleyDomainError as exc:
        if settings.on_domain_error == "error":
            raise CayleyDomainError(
                f"{exc}. Options: procrustes='robust' (special-orthogonal, anchored), on_domain_error='log' or "
                "'euclidean', or target='conflict' (smaller rotations)"
            ) from None
        if settings.on_domain_error != "log" or settings.orthogonal not in _CHART_FREE:
            return fallback(str(exc))
        try:
            qs, report.chart = log_orthogonal(torch.stack([r.dense() for r in rotations])).unsqueeze(1), "log"
        except ValueError:
            return fallback(f"{exc}, and a rotation has no real logarithm")
        margins = [r.margin() for r in rotations]
        q_norms = [_norm(q) for q in qs]
        q_m, so_stats = method(qs, weights, **options)
        del qs
    report.min_margin = min(margins)
    report.q_norms = tuple(q_norms)
    del rotations
    if report.chart == "cayley":
        base_part, report.merged_ortho_error = apply_cayley(w0, q_m[0])
    else:
        r_m = torch.linalg.matrix_exp(q_m)[0]
        base_part = w0 @ r_m
        report.merged_ortho_error = float(orthogonality_error(r_m))
        del r_m
    if not bool(torch.isfinite(base_part).all()):
        raise NumericalError(f"{where}: the merged rotation is not finite (procrustes={settings.procrustes}); nothing was written")
    report.rotation_shift = _norm(base_part - w0)
    report.stats = {k: v for k, v in so_stats.items() if isinstance(v, (int, float, bool, str))}
    if report.rotation_shift > settings.max_rotation * max(task_norms):
        msg = (
            f"merged rotation moves W0 by {report.rotation_shift:.3g} = {report.rotation_shift / max(task_norms):.3g}x "
            f"the largest task vector (limit max_rotation={settings.max_rotation:g})"
        )
        if not reference:
            return fallback(msg)
        report.notes = report.notes + (msg,)  # the reference path reproduces the paper's code: report only
    return Decomposition(base_part, rhos, report)
