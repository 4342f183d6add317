"""Merge one module's generators in so(b): the kernel of ``oftmerge merge`` (no I/O).

:func:`merge_module` takes the generators of the inputs that adapt a module, as their adapters
store them (full blocks ``(rows, b, b)`` in float64, or the packed upper triangles
``(blocks, b(b-1)/2)`` as stored), brings them to the canonical sign and the output grid, applies
the merge method, scales, checks finiteness and returns the generator in the output's sign with
the numbers the report needs. One input keeps its generator as it is (times the sign of its
weight for methods whose weights are relative). The packed path is taken for linear methods
(``from_sum``) when every input stores the output grid packed: a linear method commutes with
packing, and ``||Q||_F = sqrt(2) ||upper triangle||``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from oftmerge.errors import NumericalError
from oftmerge.formats.peft_oft import ModuleSpec
from oftmerge.linalg import scaled_norm, weight_unit
from oftmerge.methods import MergeMethod
from oftmerge.plan.merge import module_norm, to_grid

__all__ = ["ModuleMerge", "merge_module"]

_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class ModuleMerge:
    """One merged module: the generator as the output stores it, and what the report says of it."""

    stored: torch.Tensor  #: merged generator times the output map's sign; packed when the merge was
    input_norms: tuple[float, ...]  #: ||Q_i||_F over the whole module (canonical, effective)
    merged_norm: float
    stats: Mapping[str, Any]


def merge_module(
    name: str,
    generators: Sequence[torch.Tensor],
    specs: Sequence[ModuleSpec],
    signs: Sequence[int],
    weights: Sequence[float],
    method: MergeMethod,
    options: Mapping[str, Any],
    *,
    block: int,
    shared: bool,
    features: int | None,
    packed: bool,
    out_sign: int,
    scale: float = 1.0,
) -> ModuleMerge:
    """Merge module ``name`` (see the module docstring); ``signs`` are the inputs' map signs, ``out_sign`` the output's."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    if method.normalized_weights:  # only ratios matter: a power of two keeps 1e200 weights from overflowing the sum (exact)
        w = w / weight_unit(w)
    if packed:
        q, stats, norms = _merge_packed(generators, signs, w, method, options)
    else:
        qs: torch.Tensor | None = None  # (inputs, blocks, b, b), canonical sign
        norms = []
        for k, (spec, loaded, sign) in enumerate(zip(specs, generators, signs)):
            norms.append(module_norm(loaded, spec, features))
            loaded = to_grid(loaded, spec, shared, features, block)
            if qs is None:
                qs = torch.empty((len(generators), *loaded.shape), dtype=torch.float64)
            torch.mul(loaded, sign, out=qs[k])
        assert qs is not None
        if len(generators) == 1:  # one adapter adapts this module: keep its generator as it is
            q, stats = (torch.sign(w[0]) if method.normalized_weights else w[0]) * qs[0], {}
        else:
            q, stats = method(qs, w, **options)
    if not bool(torch.isfinite(q).all()):
        raise NumericalError(
            f"module {name!r}: the merged generator is not finite (method {method.name}): the inputs' generators or "
            "weights are too large to merge in float64; nothing was written"
        )
    if scale != 1.0:
        q = q * scale
        if not bool(torch.isfinite(q).all()):
            raise NumericalError(f"module {name!r}: the merged generator times scale {scale:g} is not finite; use a smaller --scale; nothing was written")
    if packed:
        merged_norm = _SQRT2 * float(scaled_norm(q))
    else:
        block_norms = scaled_norm(q, (-2, -1), plain=torch.linalg.matrix_norm(q))
        merged_norm = float(scaled_norm(block_norms, plain=block_norms.square().sum().sqrt())) * (math.sqrt((features or block) // block) if shared else 1.0)
    return ModuleMerge(q * out_sign, tuple(norms), merged_norm, stats)


def _merge_packed(
    stored: Sequence[torch.Tensor], signs: Sequence[int], w: torch.Tensor, meth: MergeMethod, options: Mapping[str, Any]
) -> tuple[torch.Tensor, dict[str, Any], list[float]]:
    """A linear method on packed generators ``(blocks, b(b-1)/2)`` as stored: ``(merged, stats, ||Q_i||_F)``.

    The weighted sum is accumulated in float64 straight from the stored (float32) vectors, the
    canonical sign folded into each weight; block norms are taken in float64 too. The norms are
    of the triangles, ``||Q||_F / sqrt(2)``: a common factor every linear method cancels.
    """
    row_norms = torch.stack([scaled_norm(v, -1, plain=torch.linalg.vector_norm(v, dim=-1, dtype=torch.float64)) for v in stored])  # (inputs, blocks)
    norms = [_SQRT2 * float(n) for n in scaled_norm(row_norms, -1)]
    if len(stored) == 1:  # one adapter adapts this module: keep its generator as it is
        factor = float(torch.sign(w[0])) if meth.normalized_weights else float(w[0])
        return stored[0].to(torch.float64) * (factor * signs[0]), {}, norms
    s = stored[0].to(torch.float64).mul_(float(w[0]) * signs[0])
    for v, wi, sign in zip(stored[1:], w[1:].tolist(), signs[1:]):
        s.add_(v, alpha=wi * sign)  # float64 += float32 * alpha, upcast elementwise: no float64 copy of v
    assert meth.from_sum is not None
    q, stats = meth.from_sum(s.unsqueeze(1), row_norms, w, **options)
    return q.squeeze(1), stats, norms
