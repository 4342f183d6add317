"""Skew-symmetric blocks and the packed forms PEFT stores them in.

PEFT >= 0.16 stores each ``b x b`` block's strict upper triangle as a row of
length ``b (b - 1) / 2`` in row-major order (``torch.triu_indices(b, b, 1)``)
and rebuilds ``Q = U - U^T``. PEFT <= 0.15 stored a full matrix ``A`` per block
and used ``Q = 0.5 (A - A^T)``.

>>> import torch
>>> q = unpack_skew(torch.tensor([[1.0, 2.0, 3.0]]))
>>> q[0]
tensor([[ 0.,  1.,  2.],
        [-1.,  0.,  3.],
        [-2., -3.,  0.]])
>>> pack_skew(q)
tensor([[1., 2., 3.]])
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["block_size_from_packed", "pack_skew", "skew_from_full", "unpack_skew"]


def block_size_from_packed(n: int) -> int:
    """Block size ``b`` whose strict upper triangle has ``n`` entries.

    Raises ``ValueError`` when ``n`` is not a triangular number ``b (b - 1) / 2``.

    >>> block_size_from_packed(28)
    8
    """
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b * (b - 1) // 2 != n or b < 2:
        raise ValueError(f"{n} is not b*(b-1)/2 for any block size b >= 2")
    return b


@functools.lru_cache(maxsize=64)
def _triu(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(b, b, 1)
    return rows, cols


def unpack_skew(packed: torch.Tensor) -> torch.Tensor:
    """``(blocks, b(b-1)/2)`` packed upper triangles -> ``(blocks, b, b)`` skew blocks."""
    if packed.dim() != 2:
        raise ValueError(f"expected a 2-D tensor (blocks, b*(b-1)/2), got shape {tuple(packed.shape)}")
    b = block_size_from_packed(packed.shape[1])
    rows, cols = _triu(b)
    out = torch.zeros(packed.shape[0], b, b, dtype=packed.dtype, device=packed.device)
    out[:, rows, cols] = packed
    return out - out.transpose(-2, -1)


def pack_skew(q: torch.Tensor) -> torch.Tensor:
    """``(blocks, b, b)`` skew blocks -> ``(blocks, b(b-1)/2)`` strict upper triangles."""
    if q.dim() != 3 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"expected (blocks, b, b), got shape {tuple(q.shape)}")
    b = q.shape[-1]
    rows, cols = _triu(b)
    return q[:, rows, cols].contiguous()


def skew_from_full(a: torch.Tensor) -> torch.Tensor:
    """PEFT <= 0.15's generator of a stored full block: ``0.5 (A - A^T)``."""
    return 0.5 * (a - a.transpose(-2, -1))
