"""Merge methods for OFT generators, in so(b) per block, batched over blocks.

All functions take ``qs`` ``(N, blocks, b, b)`` (canonical sign, float64) and
``weights`` ``(N,)`` and return ``(q, stats)``.

OrthoMerge (the default, the paper's Eq. 7-8, with weights):

    S   = sum_i w_i Q_i
    m   = sum_i |w_i| ||Q_i||_F / sum_i |w_i|        (weighted mean magnitude)
    Q_m = scale * m * S / ||S||_F

With unit weights this is ``c * S / N`` with ``c = sum_i ||Q_i|| / ||S||``.
Norms are over the whole module (all blocks together) unless ``per_block``.
A negative weight negates an input (``-Q`` is the inverse rotation).

Overflow: weights that matter by their ratios are first divided by a power of two that brings the
largest to ``[1, 2)`` (exact, so results are unchanged), and norms are computed scaled where the
plain sum of squares would overflow (:mod:`oftmerge.linalg.norms`): ``weights=(1e200, 1)`` is
``(1, 1e-200)``, not an identity.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from oftmerge.linalg import cayley, inverse_cayley, karcher_mean, polar, scaled_norm, weight_unit
from oftmerge.methods.registry import MethodOption, merge_method, weighted_sum

log = logging.getLogger(__name__)

#: ||S|| below this fraction of sum |w_i| ||Q_i|| means the inputs' directions cancel.
CANCEL_TOL = 1e-4


def _module_norms(block_norms: torch.Tensor, per_block: bool) -> torch.Tensor:
    """``(N, blocks)`` block norms -> per block, or over the whole module ``(N,)`` (overflow-safe)."""
    return block_norms if per_block else scaled_norm(block_norms, -1, plain=block_norms.square().sum(-1).sqrt())


def _block_norms(qs: torch.Tensor) -> torch.Tensor:
    """``||Q||_F`` of each block ``(..., b, b)``, without overflow for entries beyond 1e154."""
    return scaled_norm(qs, (-2, -1), plain=torch.linalg.matrix_norm(qs))


def _unit_weights(weights: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``weights`` and ``tensors`` divided by :func:`~oftmerge.linalg.weight_unit` of the weights (exact: a power of two).

    Methods whose weights matter only by their ratios give the same bits with or without it;
    weights such as ``1e200`` then no longer overflow the sums and norms (``||S||`` would be inf,
    and the merged generator silently zero).
    """
    unit = weight_unit(weights)
    if unit == 1.0:
        return (weights, *tensors)
    return (weights / unit, *(t / unit for t in tensors))


def _orthomerge_from_sum(
    s: torch.Tensor, block_norms: torch.Tensor, weights: torch.Tensor, *, per_block: bool = False, cancel_tol: float = CANCEL_TOL
) -> tuple[torch.Tensor, dict[str, Any]]:
    weights, s = _unit_weights(weights, s)
    wabs = weights.to(s.dtype).abs()
    norms = _module_norms(block_norms, per_block)  # (N,) or (N, blocks)
    s_norm = _module_norms(_block_norms(s).unsqueeze(0), per_block)[0]
    wn = (wabs.view((-1,) + (1,) * (norms.dim() - 1)) * norms).sum(0)  # sum |w_i| ||Q_i||
    target = wn / wabs.sum()
    zero = wn == 0
    ratio = torch.where(zero, torch.ones_like(s_norm), s_norm / torch.where(zero, torch.ones_like(wn), wn))
    cancelled = (ratio < cancel_tol) & ~zero
    safe_s = torch.where(s_norm > 0, s_norm, torch.ones_like(s_norm))
    factor = torch.where(cancelled | zero, 1.0 / wabs.sum(), target / safe_s)
    q = s * (factor.view(-1, 1, 1) if per_block else factor)
    stats = {
        "c": 1.0 if bool(zero.all()) else float((wn / safe_s).max()),  # worst block when per_block
        "cancelled": bool(cancelled.any()),
        "ratio": float(ratio.min()),
    }
    return q, stats


@merge_method(
    "orthomerge",
    summary="Magnitude-corrected mean in so(d): direction of the weighted sum, weighted mean norm (default)",
    reference="OrthoMerge (ICML 2026), Eq. 7-8",
    options=(
        MethodOption("per_block", bool, False, "take norms per block instead of over the whole module"),
        MethodOption("cancel_tol", float, CANCEL_TOL, "||S|| / sum|w|·||Q|| below this: directions cancel", minimum=0.0, maximum=1.0),
    ),
    from_sum=_orthomerge_from_sum,
)
def orthomerge(
    qs: torch.Tensor, weights: torch.Tensor, *, per_block: bool = False, cancel_tol: float = CANCEL_TOL
) -> tuple[torch.Tensor, dict[str, Any]]:
    (weights,) = _unit_weights(weights)
    return _orthomerge_from_sum(weighted_sum(qs, weights), _block_norms(qs), weights,
                                per_block=per_block, cancel_tol=cancel_tol)  # fmt: skip


def _mean_q_from_sum(s: torch.Tensor, block_norms: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    weights, s = _unit_weights(weights, s)
    return s / weights.to(s.dtype).abs().sum(), {}


@merge_method(
    "mean_q",
    summary="Plain weighted mean of generators, no magnitude correction (paper's Table 4 ablation)",
    reference="OrthoMerge (ICML 2026), Table 4 'mean of Q'",
    from_sum=_mean_q_from_sum,
)
def mean_q(qs: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    (weights,) = _unit_weights(weights)
    return _mean_q_from_sum(weighted_sum(qs, weights), _block_norms(qs), weights)


def _signed_rotations(qs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ideal rotations, inverted (``cayley(-Q)``) where the weight is negative."""
    sign = torch.where(weights < 0, -1.0, 1.0).to(qs.dtype).view(-1, 1, 1, 1)
    return cayley(sign * qs)


@merge_method(
    "mean_r",
    summary="Weighted mean of the rotations, projected back to SO(b) by the polar factor (Table 4 ablation)",
    reference="OrthoMerge (ICML 2026), Table 4 'mean of R'",
)
def mean_r(qs: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    rs = _signed_rotations(qs, weights)
    (weights,) = _unit_weights(weights)
    w = weights.abs().to(qs.dtype).view(-1, 1, 1, 1)
    r = polar((w * rs).sum(0) / w.sum())
    return inverse_cayley(r), {}


@merge_method(
    "sequential",
    summary="Product of the rotations in input order, as folding them one after another does (Table 4 ablation)",
    reference="OrthoMerge (ICML 2026), Table 4 'sequential'; PEFT merge_and_unload of several adapters",
    normalized_weights=False,
    order_matters=True,
)
def sequential(qs: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    # PEFT folds W -> W R_1^T -> W R_1^T R_2^T = W (R_2 R_1)^T: the later adapter acts last.
    rs = cayley(weights.to(qs.dtype).view(-1, 1, 1, 1) * qs)
    r = rs[0]
    for i in range(1, rs.shape[0]):
        r = rs[i] @ r
    return inverse_cayley(r), {}


@merge_method(
    "karcher",
    summary="Weighted Riemannian (Karcher) mean of the rotations on SO(b), per block",
    reference="Karcher (1977); affordable here because OFT blocks are small",
)
def karcher(qs: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    rs = _signed_rotations(qs, weights)
    (weights,) = _unit_weights(weights)
    r = karcher_mean(rs, weights.abs().to(qs.dtype))
    return inverse_cayley(r), {}
