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

from oftmerge.formats.peft_oft import ModuleSpec, OftAdapter

__all__ = ["adapter_rotation", "all_finite", "fold_weight"]


def adapter_rotation(adapter: OftAdapter, name: str) -> torch.Tensor:
    """The blocks ``(rows, b, b)`` of the matrix PEFT applies for module ``name`` (float64)."""
    return adapter.rotation_map.rotation(adapter.generator(name))


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


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite (one min/max pass: far cheaper than ``isfinite().all()``)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
