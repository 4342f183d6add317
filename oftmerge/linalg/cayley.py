"""The Cayley map, its inverse, PEFT's Cayley–Neumann series and COFT's projection.

Conventions (the test suite checks them against PEFT's own ``merge_and_unload``):

* ``cayley(Q) = (I - Q)(I + Q)^-1`` is the map PEFT's exact path uses
  (``use_cayley_neumann=False``), in every release.
* PEFT's Cayley–Neumann path is a truncated series of ``(I + Q)(I - Q)^-1``,
  i.e. of ``cayley(-Q)``: the opposite sign. :class:`RotationMap` carries that
  sign, so generators read under one map can be merged with generators read
  under the other without silently inverting a rotation.

>>> import torch
>>> q = torch.tensor([[[0.0, 0.1], [-0.1, 0.0]]], dtype=torch.float64)
>>> r = cayley(q)
>>> torch.allclose(r @ r.transpose(-1, -2), torch.eye(2, dtype=torch.float64))
True
>>> torch.allclose(inverse_cayley(r), q)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["RotationMap", "cayley", "coft_project", "inverse_cayley", "neumann_series"]

#: ``I + R`` whose smallest singular value is below this is treated as singular
#: (the rotation has an eigenvalue at -1: outside the inverse Cayley map's domain).
CAYLEY_DOMAIN_TOL = 1e-8


def _eye_like(q: torch.Tensor) -> torch.Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I - Q)(I + Q)^-1`` for a batch of skew-symmetric blocks ``(..., b, b)``.

    ``I + Q`` is always invertible for skew-symmetric ``Q`` (its eigenvalues are
    ``1 + i t``), so this never fails on valid input.
    """
    eye = _eye_like(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def inverse_cayley(r: torch.Tensor, *, tol: float = CAYLEY_DOMAIN_TOL) -> torch.Tensor:
    """The skew generator ``Q = (I - R)(I + R)^-1`` of orthogonal blocks ``R``.

    Raises ``ValueError`` when some block has an eigenvalue at (or numerically
    at) ``-1``, where the Cayley map has no inverse; the message gives the
    block index and the smallest singular value of ``I + R``.
    """
    eye = _eye_like(r)
    plus = eye + r
    smin = torch.linalg.svdvals(plus)[..., -1]
    bad = smin < tol
    if bool(bad.any()):
        idx = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(
            f"rotation block {idx} has an eigenvalue at -1 (smallest singular value of I + R is "
            f"{float(smin.reshape(-1)[idx]):.3g}); the inverse Cayley map is undefined there"
        )
    q = torch.linalg.solve(plus, eye - r, left=False)
    return 0.5 * (q - q.transpose(-2, -1))


def neumann_series(q: torch.Tensor, terms: int, variant: Literal["0.16", "0.18"] = "0.18") -> torch.Tensor:
    """PEFT's truncated Cayley–Neumann series, exactly as each release computes it.

    * ``variant="0.16"`` (PEFT 0.16–0.17): ``I + 2 sum_{k=1}^{N-1} Q^k``.
    * ``variant="0.18"`` (PEFT >= 0.18): ``I + 2Q + 2Q^2 + 2 sum_{k=3}^{N-2} Q^k + Q^m``
      with ``m = max(3, N - 1)`` for ``N > 2`` (so 3 and 4 terms give the same
      series); ``I + 2Q`` for ``N = 2``; ``I`` for ``N = 1``.

    Both approximate ``(I + Q)(I - Q)^-1 = cayley(-Q)`` for small ``Q``.
    """
    if terms < 1:
        raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {terms}")
    r = _eye_like(q).clone()
    if terms == 1:
        return r
    r = r + 2.0 * q
    if terms == 2:
        return r
    q2 = q @ q
    r = r + 2.0 * q2
    power = q2
    if variant == "0.16":
        for _ in range(3, terms):
            power = power @ q
            r = r + 2.0 * power
        return r
    if variant != "0.18":
        raise ValueError(f"unknown Cayley-Neumann variant {variant!r}; expected '0.16' or '0.18'")
    for _ in range(3, terms - 1):
        power = power @ q
        r = r + 2.0 * power
    power = power @ q
    return r + power


def coft_project(x: torch.Tensor, radius: float) -> torch.Tensor:
    """COFT's constraint: scale every block whose Frobenius norm exceeds ``radius`` onto it.

    Same rule as PEFT's ``_project_batch``: a block with norm ``<= radius`` is
    kept, any other becomes ``radius * x / ||x||``. Callers pass the radius of
    their release (see ``formats``).
    """
    norm = torch.linalg.matrix_norm(x, keepdim=True)
    scaled = radius * (x / torch.where(norm == 0, torch.ones_like(norm), norm))
    return torch.where(norm <= radius, x, scaled)


@dataclass(frozen=True)
class RotationMap:
    """Which map turns a stored generator into the rotation PEFT applies.

    ``kind="exact"`` is ``cayley(Q)``; ``kind="neumann"`` is PEFT's series with
    ``terms`` terms in the given release ``variant``. ``sign`` is such that the
    ideal rotation is ``cayley(sign * Q)``: merging always happens on
    ``sign * Q`` so that maps of opposite sign never cancel each other.
    """

    kind: Literal["exact", "neumann"] = "exact"
    terms: int = 5
    variant: Literal["0.16", "0.18"] = "0.18"

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "neumann"):
            raise ValueError(f"unknown rotation map kind {self.kind!r}")
        if self.kind == "neumann" and self.terms < 1:
            raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {self.terms}")

    @property
    def sign(self) -> int:
        return 1 if self.kind == "exact" else -1

    def rotation(self, q: torch.Tensor) -> torch.Tensor:
        """The matrix PEFT builds from stored generator blocks ``q`` (not always orthogonal)."""
        if self.kind == "exact":
            return cayley(q)
        return neumann_series(q, self.terms, self.variant)

    def ideal_rotation(self, q: torch.Tensor) -> torch.Tensor:
        """The exact rotation this map approximates: ``cayley(sign * q)``."""
        return cayley(self.sign * q)

    def describe(self) -> str:
        if self.kind == "exact":
            return "exact Cayley (I-Q)(I+Q)^-1"
        return f"Cayley-Neumann, {self.terms} terms, PEFT {self.variant}{'+' if self.variant == '0.18' else '-0.17'} series"
