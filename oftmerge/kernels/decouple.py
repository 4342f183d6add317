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
from oftmerge.linalg import scaled_norm
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
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, LayerReport]:
    """``W = W0 R_m + method(residuals)``, checked finite, and the tensor's report (filled in).

    ``dtype``: the dtype the output stores; the result is returned cast to it and checked finite
    after the cast too (a float64 weight may not fit a bfloat16 or float16 checkpoint).
    """
    ctx = TensorContext(name, None if thresholds is None else tuple(thresholds), tuple(indices))
    merged, stats = method(dec.parts, weights, context=ctx, **options)
    out = dec.base_part + merged
    if not bool(torch.isfinite(out).all()):
        raise NumericalError(
            f"tensor {name!r}: the merged weight is not finite ({method.name}): the experts' weights or scale are too large; "
            "nothing was written"
        )
    if dtype is not None and dtype != out.dtype:
        cast = out.to(dtype)
        if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
            raise NumericalError(
                f"tensor {name!r}: the merged weight does not fit {str(dtype).removeprefix('torch.')}, the checkpoint's dtype "
                f"(largest entry {float(out.abs().max()):.3g}); use smaller weights or scale; nothing was written"
            )
        out = cast
    dec.report.residual_norm = float(scaled_norm(merged))
    dec.report.stats = {**dec.report.stats, **{f"euclidean_{k}": v for k, v in stats.items()}}
    return out, dec.report
