"""kohya sd-scripts OFT files (``networks/oft.py`` of kohya-ss/sd-scripts, read at commit 077f6a4).

Keys: ``oft_unet_<module path, '.' -> '_'>.oft_blocks`` ``(dim, out/dim, out/dim)`` and
``.alpha``, U-Net modules only. ``dim`` is the **number of blocks** (LyCORIS's ``lora_dim`` is the
block size). What sd-scripts applies at multiplier 1:

* ``Q = A - A^T``; ``Q <- Q (min(||Q||_F, c) + 1e-8) / (||Q||_F + 1e-8)`` with ``c = alpha * out``,
  always (``alpha = 0`` means no rotation at all);
* ``R = (I + Q)(I - Q)^-1`` and ``W'_k = R_k^T W_k`` per block of output rows (bias untouched).

Its loader builds every module with **one** ``dim`` and **one** ``alpha``, both taken from the
first tensors it meets (the file's sorted key order): a file whose modules differ in block count
does not load, and the constraint of every module is the first ``alpha`` times its ``out``. The
reader applies exactly that; the writer stores one block count (the finest grid all modules'
rotations fit exactly, :func:`oftmerge.linalg.regrid_blocks`) and one ``alpha`` at least the largest
``||Q||_F`` (:func:`~oftmerge.formats.diffusion.safe_alpha`), so the clamp leaves every merged
generator unchanged (the factor is then exactly 1), in every loader.

In oftmerge's convention (``W' = D^T W``, ``D = cayley(Q)``) the generator is ``-clamp(A - A^T)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch

from oftmerge.errors import AdapterFormatError
from oftmerge.formats.diffusion import (
    DiffusionAdapter,
    DiffusionModule,
    MergedModule,
    frobenius,
    refuse_unheld,
    register_diffusion_format,
    safe_alpha,
    split_keys,
)
from oftmerge.formats.io import TensorDict, TensorFile
from oftmerge.linalg import RotationMap, regrid_blocks

__all__ = ["KOHYA", "kohya_alpha"]

PREFIX = "oft_unet_"
CANONICAL = "lora_unet_"
_ROLES = {".oft_blocks": "blocks", ".alpha": "alpha"}


def _effective(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
    q = raw - raw.transpose(-1, -2)
    norm = frobenius(q)
    c = mod.constraint or 0.0
    return -q * ((min(norm, c) + 1e-8) / (norm + 1e-8))


def kohya_alpha(stored: Sequence[torch.Tensor]) -> float:
    """One ``alpha`` for every module (sd-scripts reads one): :func:`~oftmerge.formats.diffusion.safe_alpha` of the largest ``||Q||_F``."""
    return safe_alpha(max((frobenius(a.double() - a.double().transpose(-1, -2)) for a in stored), default=0.0))


class KohyaFormat:
    """sd-scripts' own OFT network (``--network_module networks.oft``)."""

    name = "kohya"
    side: Literal["input", "output"] = "output"

    def detect(self, keys: Sequence[str]) -> bool:
        return any(k.endswith(".oft_blocks") for k in keys) and all(k.startswith(PREFIX) for k in keys)

    def rotation_map(self) -> RotationMap:
        return RotationMap("exact")

    def read(self, path: Path, source: TensorFile | TensorDict, metadata: Mapping[str, str]) -> DiffusionAdapter:
        keys = sorted(source.keys())
        bad = [k for k in keys if not k.startswith(PREFIX)]
        if bad:
            raise AdapterFormatError(f"{path}: key {bad[0]!r} does not start with {PREFIX!r}; sd-scripts' OFT files adapt only U-Net modules named {PREFIX}...")
        groups = split_keys(path, keys, _ROLES)
        alphas = [k for k in keys if k.endswith(".alpha")]
        if not alphas:
            raise AdapterFormatError(f"{path}: no .alpha tensor; sd-scripts' OFT loader needs one (it is the constraint)")
        first_alpha = float(source.get(alphas[0]).to(torch.float64).reshape(-1)[0])
        first_blocks = next((k for k in keys if not k.endswith(".alpha")), None)
        if first_blocks is None:
            raise AdapterFormatError(f"{path}: no OFT modules (no .oft_blocks tensors)")
        dim = source.shape(first_blocks)[0]
        notes: list[str] = []
        if len({float(source.get(k).to(torch.float64).reshape(-1)[0]) for k in alphas}) > 1:
            notes.append(
                f"{path}: modules store different alphas; sd-scripts uses the first one ({first_alpha:g}, from {alphas[0]}) for every module, "
                "and so does oftmerge"
            )
        modules: dict[str, DiffusionModule] = {}
        for stem, roles in groups.items():
            if "blocks" not in roles:
                raise AdapterFormatError(f"{path}: {stem}.alpha without {stem}.oft_blocks; the file is incomplete")
            shape = tuple(source.shape(roles["blocks"]))
            if len(shape) != 3 or shape[1] != shape[2]:
                raise AdapterFormatError(f"{path}: {roles['blocks']} has shape {shape}; sd-scripts' OFT blocks are (blocks, b, b), square")
            n, b, _ = shape
            if n != dim:
                raise AdapterFormatError(
                    f"{path}: {roles['blocks']} has {n} blocks but {first_blocks} has {dim}; sd-scripts builds every module with the first one's "
                    "block count, so this file does not load there"
                )
            name = CANONICAL + stem[len(PREFIX) :]
            modules[name] = DiffusionModule(
                name=name, key=roles["blocks"], stages=1, num_blocks=n, block_size=b, alpha=first_alpha, constraint=first_alpha * n * b,
                alpha_key=roles.get("alpha"),
            )  # fmt: skip
        return DiffusionAdapter(
            path=path, format=self.name, algo="oft", side=self.side, rotation_map=self.rotation_map(), modules=modules,
            metadata=dict(metadata), _source=source, _effective=_effective, notes=tuple(notes),
        )  # fmt: skip

    def check_writable(self, modules: Sequence[MergedModule], where: str) -> None:
        refuse_unheld(
            modules, where, prefixes=(CANONICAL,), names="is not a U-Net module (sd-scripts' OFT files hold U-Net modules only)",
            tool="sd-scripts' OFT", instead="write --to lycoris instead",
        )  # fmt: skip

    def write_tensors(self, modules: Sequence[MergedModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        dim = math.gcd(*(m.generator.shape[0] for m in modules)) if modules else 1
        out: dict[str, torch.Tensor] = {}
        for m in modules:
            n, b, _ = m.generator.shape
            q = regrid_blocks(m.generator, n * b // dim)
            out[f"{PREFIX}{m.name[len(CANONICAL) :]}.oft_blocks"] = (-0.5 * q).to(dtype).contiguous()
        alpha = kohya_alpha(list(out.values()))
        for m in modules:
            out[f"{PREFIX}{m.name[len(CANONICAL) :]}.alpha"] = torch.tensor(alpha)
        return out


KOHYA = register_diffusion_format(KohyaFormat())
