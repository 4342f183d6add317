"""Decouple one weight of several experts and merge it: the kernel of ``oftmerge decouple`` (no I/O).

:func:`decouple_weight` splits the experts' versions of one base weight into rotations and
residuals (:func:`oftmerge.methods.decoupling.decompose`: Procrustes per expert, the rotations
merged in so(d)); :func:`merge_residuals` merges the residuals (or, for a tensor not decoupled, the
task vectors) with the Euclidean method and adds the merged rotation's part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from oftmerge.errors import NumericalError
from oftmerge.methods import MergeMethod
from oftmerge.methods.decoupling import Decomposition, LayerReport, Settings, decompose
from oftmerge.methods.euclidean import TensorContext

__all__ = ["decouple_weight", "merge_residuals"]


def decouple_weight(
    name: str, w0: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, settings: Settings, *, decouple: bool, indices: Sequence[int]
) -> Decomposition:
    """The rotation/residual split of ``experts`` ``(N, out, in)`` against base weight ``w0``; ``indices`` name the experts."""
    return decompose(name, w0, experts, weights, settings, decouple=decouple, experts=tuple(indices))


def merge_residuals(
    name: str,
    dec: Decomposition,
    weights: torch.Tensor,
    method: MergeMethod,
    options: Mapping[str, Any],
    *,
    indices: Sequence[int],
    thresholds: Sequence[float] | None = None,
) -> tuple[torch.Tensor, LayerReport]:
    """``W = W0 R_m + method(residuals)``, checked finite, and the tensor's report (filled in)."""
    ctx = TensorContext(name, None if thresholds is None else tuple(thresholds), tuple(indices))
    merged, stats = method(dec.parts, weights, context=ctx, **options)
    out = dec.base_part + merged
    if not bool(torch.isfinite(out).all()):
        raise NumericalError(f"tensor {name!r}: the merged weight is not finite ({method.name}); nothing was written")
    dec.report.residual_norm = float(torch.linalg.vector_norm(merged))
    dec.report.stats = {**dec.report.stats, **{f"euclidean_{k}": v for k, v in stats.items()}}
    return out, dec.report
