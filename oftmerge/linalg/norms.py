"""Norms and weights that do not overflow: the plain float computation where it is exact, a scaled one where it is not.

``torch.linalg.vector_norm`` squares the entries: in float64 a vector with entries above about
1e154 gives ``inf``, although its norm is an ordinary number. :func:`scaled_norm` keeps the plain
result wherever it is finite (so results are bit for bit what they were) and recomputes the others
as ``m * ||x / m||`` with ``m = max |x_i|``. (Underflow, entries below 1e-162, is left alone: such
a generator is the identity rotation to every digit, and checking for it would cost a pass over
every zero block.) :func:`weight_unit` is the power of two that brings the largest of a set of
merge weights into ``[1, 2)``: dividing by it is exact, so methods whose weights only matter by
their ratios give the same bits with or without it, and ``1e200`` weights no longer overflow.

>>> import torch
>>> scaled_norm(torch.tensor([3e200, 4e200], dtype=torch.float64))
tensor(5.0000e+200, dtype=torch.float64)
>>> weight_unit(torch.tensor([1e200, 1.0], dtype=torch.float64)) == 2.0 ** 664
True
"""

from __future__ import annotations

import math

import torch

__all__ = ["scaled_norm", "weight_unit"]

Dim = int | tuple[int, ...] | None


def scaled_norm(x: torch.Tensor, dim: Dim = None, *, plain: torch.Tensor | None = None) -> torch.Tensor:
    """The 2-norm of ``x`` over ``dim`` (all entries when None; ``(-2, -1)`` for Frobenius norms of matrices).

    ``plain`` is the norm as the caller computes it (default: ``torch.linalg.vector_norm(x, dim=dim)``);
    it is returned unchanged wherever it is finite. Where it overflowed to ``inf`` the norm is
    recomputed on ``x`` scaled by its largest magnitude. A norm that does not fit the dtype at all
    stays ``inf``; NaN entries give NaN.
    """
    n = torch.linalg.vector_norm(x, dim=dim) if plain is None else plain
    bad = torch.isinf(n)
    if not bool(bad.any()):
        return n
    x = x.to(n.dtype)  # the caller's plain norm may accumulate in a wider dtype
    m = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    usable = (m > 0) & torch.isfinite(m)
    m = torch.where(usable, m, torch.ones_like(m))
    if dim is None:
        rescued = torch.linalg.vector_norm(x / m) * m
    else:
        rescued = (torch.linalg.vector_norm(x / m, dim=dim, keepdim=True) * m).squeeze(dim)
    return torch.where(bad, rescued, n)


def weight_unit(weights: torch.Tensor) -> float:
    """``2 ** floor(log2(max |w_i|))``: dividing the weights by it is exact and puts the largest in ``[1, 2)``.

    1.0 for weights whose largest magnitude is already in ``[1, 2)`` (unit weights), and when no
    weight is finite and non-zero (the caller refuses those).
    """
    m = float(weights.abs().max()) if weights.numel() else 0.0
    if m == 0.0 or not math.isfinite(m):
        return 1.0
    return math.ldexp(1.0, math.frexp(m)[1] - 1)
