"""LyCORIS diag-oft and BOFT files (``lycoris-lora`` 4.x; read in ``lycoris/modules/diag_oft.py``, ``boft.py``).

=========  =====================================  ===================================================
algo       keys per module                        what LyCORIS applies (``Q_s = A - A^T``, clamped)
=========  =====================================  ===================================================
diag-oft   ``<m>.oft_blocks`` (n, b, b),          ``W'_k = (I + Q)^-1 (I - Q) W_k`` per block of rows,
           ``<m>.alpha``, [``<m>.rescale``]       then rows times ``rescale``
boft       ``<m>.oft_blocks`` (s, n, b, b), ...   ``s`` butterfly stages, each ``R W`` after a row
                                                  shuffle in groups of ``2^i b``; then ``rescale``
=========  =====================================  ===================================================

The clamp (``alpha > 0``): ``Q`` is scaled by ``alpha * out / (||Q||_F + 1e-8)`` when
``||Q||_F + 1e-8 > alpha * out``, the norm taken over the whole module (all blocks, all stages).

In oftmerge's convention (``W' = D^T W``, ``D = cayley(Q)``, :mod:`oftmerge.formats.diffusion`)
a diag-oft module's generator is ``-clamp(A - A^T)``. A BOFT module's ``s`` stages multiply out to
a block-diagonal rotation with blocks of ``B = 2^(s-1) b`` rows; its generator is the inverse
Cayley map of those blocks, so BOFT files merge exactly in so(B). Merged files are written as
diag-oft (``A = -Q / 2``) with an ``alpha`` just above the module's ``||Q||_F``
(:func:`~oftmerge.formats.diffusion.safe_alpha`: no loader's clamp reaches it, so the merged generator
is applied as it is); LyCORIS loads a diag-oft module only when its block size is at most its block count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError
from oftmerge.formats.diffusion import (
    DiffusionAdapter,
    DiffusionModule,
    MergedModule,
    clamp_factor,
    frobenius,
    register_diffusion_format,
    safe_alpha,
    split_keys,
)
from oftmerge.formats.io import TensorDict, TensorFile
from oftmerge.linalg import RotationMap, cayley, finest_block, inverse_cayley, split_blocks

__all__ = ["LYCORIS", "boft_transform", "lycoris_rotation"]

_ROLES = {".oft_blocks": "blocks", ".alpha": "alpha", ".rescale": "rescale"}


def _skew(a: torch.Tensor) -> torch.Tensor:
    return a - a.transpose(-1, -2)


def lycoris_rotation(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
    """The blocks ``R = (I + Q)(I - Q)^-1`` LyCORIS builds (``(stages, n, b, b)`` or ``(n, b, b)``), clamp applied."""
    q = _skew(raw)
    q = q * clamp_factor(frobenius(q), mod.constraint)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def boft_transform(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Apply BOFT stages ``r`` ``(s, n, b, b)`` to ``weight`` ``(out, ...)`` as LyCORIS's ``diff_weight`` does (no rescale)."""
    stages, _, b, _ = r.shape
    x = weight
    for i in range(stages):
        k = 2**i * (b // 2)
        # rows (c, 2, k) -> (c, k, 2): the butterfly's shuffle, then one rotation per b consecutive rows
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("nij,nj...->ni...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x


def _boft_blocks(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
    """The diagonal blocks ``(n, B, B)`` of ``T`` with ``W' = T W``: a BOFT module's stages multiplied out."""
    r = lycoris_rotation(mod, raw)
    out = mod.features
    t = boft_transform(r, torch.eye(out, dtype=r.dtype))  # T is block-diagonal, blocks of B rows
    big = mod.grid_block
    n = out // big
    return t.reshape(n, big, n, big).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _rotation(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
    """The fold's ``D`` (``W' = D^T W``) straight from the stages, for any BOFT rotation (also outside the Cayley domain)."""
    if raw.dim() == 3:  # a diag-oft module in a file that also has BOFT ones
        return cayley(_effective(mod, raw))
    return _boft_blocks(mod, raw).transpose(-1, -2)


def _effective(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
    if mod.stages == 1 and raw.dim() == 3:
        q = _skew(raw)
        return -(q * clamp_factor(frobenius(q), mod.constraint))
    blocks = _boft_blocks(mod, raw)
    try:
        return -inverse_cayley(blocks)
    except ValueError as exc:
        raise NumericalError(
            f"module {mod.name!r}: its BOFT rotation is outside the Cayley map's domain ({exc}); it cannot be merged in so(d). "
            "Fold the file into the model instead (oftmerge fold)"
        ) from None


def _finest(q: torch.Tensor) -> torch.Tensor:
    """``q`` on a grid LyCORIS loads (block size <= block count), when it is exactly block-diagonal on one.

    A kohya file's coarse blocks (one block count for every module) come back to LyCORIS's grid:
    the largest block size at most the block count that the generator is block-diagonal on. A
    generator already on such a grid is kept as it is.
    """
    n, big, _ = q.shape
    if big <= n:
        return q
    fine = finest_block(q)
    width = n * big
    fits = [d for d in range(big, 0, -1) if big % d == 0 and d % fine == 0 and d * d <= width]
    return split_blocks(q, fits[0]) if fits else q


class LycorisFormat:
    """LyCORIS ``diag-oft`` / ``boft`` files, in its generic (``lycoris_``) or kohya-style (``lora_unet_``) naming."""

    name = "lycoris"
    side: Literal["input", "output"] = "output"

    def detect(self, keys: Sequence[str]) -> bool:
        return any(k.endswith(".oft_blocks") for k in keys) and not any(k.startswith("oft_unet_") for k in keys)

    def rotation_map(self) -> RotationMap:
        return RotationMap("exact")

    def read(self, path: Path, source: TensorFile | TensorDict, metadata: Mapping[str, str]) -> DiffusionAdapter:
        groups = split_keys(path, source.keys(), _ROLES)
        modules: dict[str, DiffusionModule] = {}
        algos: set[str] = set()
        missing_alpha: list[str] = []
        for stem, roles in sorted(groups.items()):
            if "blocks" not in roles:
                raise AdapterFormatError(f"{path}: {', '.join(sorted(roles.values()))} without {stem}.oft_blocks; the file is incomplete")
            shape = tuple(source.shape(roles["blocks"]))
            if len(shape) == 3:
                stages, (n, b, b2) = 1, shape
                algos.add("diag-oft")
            elif len(shape) == 4:
                stages, n, b, b2 = shape
                algos.add("boft")
            else:
                raise AdapterFormatError(f"{path}: {roles['blocks']} has shape {shape}; LyCORIS OFT blocks are (blocks, b, b) or (stages, blocks, b, b)")
            if b != b2 or b < 1:
                raise AdapterFormatError(f"{path}: {roles['blocks']} has non-square blocks {shape}; OFT blocks are square (b, b)")
            if len(shape) == 4 and (b % 2 or n & (n - 1) or stages > (n - 1).bit_count() + 1):
                raise AdapterFormatError(
                    f"{path}: {roles['blocks']} {shape} is not a BOFT layout LyCORIS makes (even block size, a power-of-two block count, "
                    "at most popcount(blocks - 1) + 1 stages)"
                )
            alpha = None
            if "alpha" in roles:
                alpha = float(source.get(roles["alpha"]).to(torch.float64).reshape(-1)[0])
            else:
                missing_alpha.append(stem)
            rescale = roles.get("rescale")
            if rescale is not None and source.shape(rescale)[0] != n * b:
                raise AdapterFormatError(f"{path}: {rescale} has {source.shape(rescale)[0]} rows for {n * b} rotated rows")
            features = n * b
            modules[stem] = DiffusionModule(
                name=stem,
                key=roles["blocks"],
                stages=stages,
                num_blocks=n,
                block_size=b,
                alpha=alpha,
                constraint=None if not alpha or alpha <= 0 else alpha * features,
                rescale_key=rescale,
                alpha_key=roles.get("alpha"),
            )
        if not modules:
            raise AdapterFormatError(f"{path}: no OFT modules (no .oft_blocks tensors)")
        notes: tuple[str, ...] = ()
        if missing_alpha:
            notes = (
                f"{path}: {len(missing_alpha)} module(s) have no .alpha (e.g. {missing_alpha[0]}); LyCORIS's loader requires it and would not load "
                "this file. Read with the constraint off; the output has an alpha for every module",
            )
        return DiffusionAdapter(
            path=path,
            format=self.name,
            algo="boft" if "boft" in algos else "diag-oft",
            side=self.side,
            rotation_map=self.rotation_map(),
            modules=modules,
            metadata=dict(metadata),
            _source=source,
            _effective=_effective,
            notes=notes,
            _rotation=_rotation if "boft" in algos else None,
        )

    def check_writable(self, modules: Sequence[MergedModule], where: str) -> None:
        for m in modules:
            blocks, b, _ = _finest(m.generator).shape
            if b > blocks:
                raise IncompatibleAdaptersError(
                    f"{where}: module {m.name!r} would need {blocks} block(s) of {b} rows, but LyCORIS loads a diag-oft module only when the block "
                    "size is at most the block count (its factorisation); the merged rotation cannot be stored as a LyCORIS file. "
                    "Fold it into the model instead (oftmerge fold ... --base MODEL), which is exact"
                )

    def write_tensors(self, modules: Sequence[MergedModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in modules:
            blocks = (-0.5 * _finest(m.generator)).to(dtype).contiguous()
            out[f"{m.name}.oft_blocks"] = blocks
            stored = blocks.to(torch.float64)
            out[f"{m.name}.alpha"] = torch.tensor(safe_alpha(frobenius(stored - stored.transpose(-1, -2))))  # no loader clamps it
            if m.rescale is not None:
                shape = m.rescale_shape or (m.rescale.numel(), 1)
                out[f"{m.name}.rescale"] = m.rescale.reshape(shape).to(dtype).contiguous()
        return out


LYCORIS = register_diffusion_format(LycorisFormat())
