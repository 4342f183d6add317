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

import torch

from oftmerge.formats.peft_oft import ModuleSpec, OftAdapter

__all__ = ["adapter_rotation", "fold_weight"]


def adapter_rotation(adapter: OftAdapter, name: str) -> torch.Tensor:
    """The blocks ``(rows, b, b)`` of the matrix PEFT applies for module ``name`` (float64)."""
    return adapter.rotation_map.rotation(adapter.generator(name))


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
    contraction runs in.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    shape, dtype = weight.shape, weight.dtype
    b = rotation.shape[-1]
    r = rotation.to(compute_dtype)
    if spec.kind == "embedding":
        w = weight.to(compute_dtype)  # (num, dim): E' = E R, blocks along dim
        nb = w.shape[1] // b
        r = r.expand(nb, b, b) if spec.shared else r
        out = torch.einsum("nkj,kji->nki", w.reshape(w.shape[0], nb, b), r).reshape(shape)
        return out.to(dtype)
    w = weight.reshape(shape[0], -1).to(compute_dtype)  # (out, in*k*k)
    if spec.side == "output":  # PEFT <= 0.13: W' = D^T W, D = blockdiag(R) cut to out x out
        out_f = w.shape[0]
        nb = (out_f + b - 1) // b if spec.shared else rotation.shape[0]
        r = r.expand(nb, b, b) if spec.shared else r
        padded = torch.zeros(nb * b, w.shape[1], dtype=compute_dtype)
        padded[:out_f] = w
        folded = torch.einsum("kji,kjc->kic", r, padded.reshape(nb, b, -1)).reshape(nb * b, -1)[:out_f]
        return folded.reshape(shape).to(dtype)
    nb = w.shape[1] // b
    r = r.expand(nb, b, b) if spec.shared else r
    folded = torch.einsum("okj,kij->oki", w.reshape(w.shape[0], nb, b), r).reshape(w.shape)
    if scale is not None:
        folded = folded * scale.to(compute_dtype)
    return folded.reshape(shape).to(dtype)
