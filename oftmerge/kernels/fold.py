"""Apply an OFT adapter's rotation to base weights, tensor by tensor, exactly as PEFT folds it.

======================  =========================================================
layer, release          folded weight
======================  =========================================================
Linear / Conv2d, >=0.14 ``W' = W R^T`` on ``W`` viewed as ``(out, in * k * k)``
  PEFT 0.14-0.15        then every output row times ``oft_s``: ``W' = (W R^T) * s``
Embedding, >= 0.19      ``E' = E R``
Linear / Conv2d, <=0.13 ``W' = D^T W`` with ``D = blockdiag(R)[:out, :out]``
======================  =========================================================

``R`` is block-diagonal; it is never built: the blocks ``(blocks, b, b)`` are
applied with one batched contraction. The rotation is the one PEFT computes
(:meth:`RotationMap.rotation`, including a truncated Neumann series), so the
folded model equals PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import math

import torch

from oftmerge.errors import NumericalError
from oftmerge.formats.peft_oft import ModuleSpec, OftAdapter
from oftmerge.linalg import RotationMap, scaled_norm

__all__ = ["adapter_rotation", "all_finite", "cast_checked", "fold_rescaled", "fold_weight", "rotation_overflows"]


def adapter_rotation(adapter: OftAdapter, name: str) -> torch.Tensor:
    """The blocks ``(rows, b, b)`` of the matrix PEFT applies for module ``name`` (float64).

    Raises :class:`~oftmerge.errors.NumericalError` when PEFT, computing the same rotation in the
    adapter's own precision, gets NaN or inf (:func:`rotation_overflows`): its ``merge_and_unload``
    and forward pass give NaN there, and a finite float64 fold would hide a broken adapter.
    """
    q = adapter.generator(name)
    rmap = adapter.rotation_map
    if rotation_overflows(rmap, q, adapter.dtype(name)):
        raise NumericalError(
            f"{adapter.path}: module {name!r}: the rotation PEFT computes for its generator (||Q||_F = "
            f"{float(scaled_norm(q)):.3g}, {rmap.describe()}) is not finite in {str(_peft_dtype(adapter.dtype(name))).removeprefix('torch.')}, so PEFT's own "
            "forward pass and merge_and_unload give NaN; the adapter is broken (re-train or re-export it); nothing was written"
        )
    return rmap.rotation(q)


#: (b max|Q|)^k below this cannot overflow float32's 3.4e38 in a k-th power: the check is skipped
_SAFE_POWER = 1e30


def _peft_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype PEFT computes a rotation in: float64 adapters in float64, others in float32 (16-bit on CPU are cast up)."""
    return torch.float64 if stored == torch.float64 else torch.float32


def rotation_overflows(rmap: RotationMap, q: torch.Tensor, stored: torch.dtype) -> bool:
    """Whether the rotation of generator blocks ``q`` (float64) is NaN or inf when computed as PEFT does, in the adapter's precision.

    Only computed when a bound says it may overflow: the series' last power ``(b max|Q|)^(terms - 1)``
    (or a square, for the exact map's solve) below 1e30 cannot reach float32's range.
    """
    dtype = _peft_dtype(stored)
    largest = float(q.abs().max()) if q.numel() else 0.0
    power = max(2, rmap.terms - 1) if rmap.kind == "neumann" else 2
    if largest == 0.0 or power * math.log10(q.shape[-1] * largest) < math.log10(_SAFE_POWER) + (308 - 38 if dtype == torch.float64 else 0):
        return False
    return not all_finite(rmap.rotation(q.to(dtype)))


#: Rows of a weight are folded in chunks of about this many bytes (in the compute dtype): small
#: enough to stay in the CPU cache, large enough for one batched product per chunk to be cheap,
#: and the float32 temporaries of a bf16 weight stay at one chunk instead of several full copies.
CHUNK_BYTES = 1 << 18


def fold_weight(
    weight: torch.Tensor,
    rotation: torch.Tensor,
    spec: ModuleSpec,
    *,
    scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fold rotation blocks ``(rows, b, b)`` of module ``spec`` into its base ``weight``.

    Returns a new tensor of ``weight``'s shape and dtype. ``compute_dtype``
    (default: float64 for float64 weights, else float32) is what the
    contraction runs in; a 16-bit weight is therefore rounded once, at the
    end, as PEFT does.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    shape, dtype = weight.shape, weight.dtype
    b = rotation.shape[-1]
    r = rotation.to(compute_dtype)
    if spec.side == "output" and spec.kind != "embedding":
        return _fold_output_side(weight, r, spec, compute_dtype)
    w = weight.reshape(shape[0], -1)  # (out, in*k*k), or (num, dim) for an embedding
    width = w.shape[1]
    nb = width // b
    r = r.expand(nb, b, b) if spec.shared else r
    # Linear / Conv2d: W' = W R^T, each block of columns x_k -> x_k R_k^T. Embedding: E' = E R, x_k -> x_k R_k.
    m = (r if spec.kind == "embedding" else r.transpose(1, 2)).contiguous()
    s = None if scale is None else scale.to(compute_dtype)
    out = torch.empty(w.shape, dtype=dtype)
    step = max(1, CHUNK_BYTES // (width * torch.finfo(compute_dtype).bits // 8))
    for start in range(0, w.shape[0], step):  # chunks of rows; the blocks of a chunk are one batched product
        x = w[start : start + step].to(compute_dtype).reshape(-1, nb, b).transpose(0, 1)
        y = torch.bmm(x, m).transpose(0, 1).reshape(-1, width)
        out[start : start + step] = y if s is None else y * s[start : start + step]
    return out.reshape(shape)


def _fold_output_side(weight: torch.Tensor, r: torch.Tensor, spec: ModuleSpec, compute_dtype: torch.dtype) -> torch.Tensor:
    """PEFT <= 0.13: ``W' = D^T W`` with ``D = blockdiag(R)`` cut to ``out x out``."""
    shape, dtype = weight.shape, weight.dtype
    b = r.shape[-1]
    w = weight.reshape(shape[0], -1).to(compute_dtype)
    out_f = w.shape[0]
    nb = (out_f + b - 1) // b if spec.shared else r.shape[0]
    r = r.expand(nb, b, b) if spec.shared else r
    padded = torch.zeros(nb * b, w.shape[1], dtype=compute_dtype)
    padded[:out_f] = w
    folded = torch.einsum("kji,kjc->kic", r, padded.reshape(nb, b, -1)).reshape(nb * b, -1)[:out_f]
    return folded.reshape(shape).to(dtype)


def fold_rescaled(
    weight: torch.Tensor, rotation: torch.Tensor, spec: ModuleSpec, rescale: torch.Tensor | None = None, *, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`fold_weight`, then every output row times ``rescale`` ``(out,)`` (LyCORIS's ``rescale``), in the compute dtype.

    The rescale multiplies the rotated weight before it is rounded to ``weight``'s dtype, as LyCORIS does.
    """
    if rescale is None:
        return fold_weight(weight, rotation, spec, compute_dtype=compute_dtype)
    if compute_dtype is None:
        compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if spec.side == "output":
        folded = fold_weight(weight.to(compute_dtype), rotation, spec, compute_dtype=compute_dtype)
        s = rescale.to(compute_dtype).reshape(-1, *([1] * (weight.dim() - 1)))
        return (folded * s).to(weight.dtype)
    return fold_weight(weight, rotation, spec, scale=rescale.reshape(-1, 1), compute_dtype=compute_dtype)


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``tensor.to(dtype)``, refused (:class:`~oftmerge.errors.NumericalError`) when the cast makes a float entry inf or NaN.

    ``what`` names the tensor in the message (``"saved tensor 'classifier.weight'"``).
    """
    out = tensor.to(dtype)
    if out.is_floating_point() and not all_finite(out):
        raise NumericalError(
            f"{what}: does not fit {str(dtype).removeprefix('torch.')}, the dtype of the base weight it replaces "
            f"(largest entry {float(tensor.abs().max()):.3g}); nothing was written"
        )
    return out


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite (one min/max pass: far cheaper than ``isfinite().all()``)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
