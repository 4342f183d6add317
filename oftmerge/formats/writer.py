"""Write OFT adapters that stock PEFT loads, choose a block configuration PEFT will honour; the PEFT OFT format entry.

PEFT's OFT config has one ``oft_block_size`` (or ``r``) for the whole adapter
and adjusts it per layer to a divisor of the layer's width. A merged adapter
may need different block sizes per module (inputs with different block
sizes are merged on a common, coarser grid), so :func:`choose_block_config`
searches for one config value that PEFT turns into an acceptable block size
for every module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError
from oftmerge.formats.base import register_format
from oftmerge.formats.io import read_json, write_json_atomic
from oftmerge.formats.peft_oft import KEY_PREFIX, WEIGHT_FILES, OftAdapter, read_adapter

__all__ = ["PEFT_OFT", "BlockConfig", "PeftOft", "adjust_oft_parameter", "choose_block_config", "pack_module", "peft_block_size", "write_adapter_files"]

#: Keys PEFT 0.18+ writes in an OFT adapter_config.json (checked by a test against the installed PEFT).
CURRENT_CONFIG_TEMPLATE: dict[str, Any] = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "block_share": False,
    "coft": False,
    "eps": 6e-05,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "module_dropout": 0.0,
    "modules_to_save": None,
    "num_cayley_neumann_terms": 5,
    "oft_block_size": 32,
    "peft_type": "OFT",
    "peft_version": "0.18.0",
    "r": 0,
    "revision": None,
    "target_modules": None,
    "task_type": None,
    "use_cayley_neumann": True,
}


def adjust_oft_parameter(features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest to ``value``."""
    if value < features:
        higher = value
        while higher <= features and features % higher != 0:
            higher += 1
    else:
        return features
    lower = value
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def peft_block_size(features: int, r: int, oft_block_size: int) -> int:
    """The block size PEFT (>= 0.14) uses for a layer of this width under this config."""
    if r == 0 and oft_block_size != 0:
        if features % oft_block_size != 0 or oft_block_size > features:
            oft_block_size = adjust_oft_parameter(features, oft_block_size)
        return oft_block_size
    if r != 0 and oft_block_size == 0:
        if features % r != 0 or r > features:
            r = adjust_oft_parameter(features, r)
        return features // r
    raise ValueError("exactly one of r and oft_block_size must be non-zero")


@dataclass(frozen=True)
class BlockConfig:
    r: int
    oft_block_size: int
    sizes: Mapping[str, int]  #: block size PEFT will use, per module


def choose_block_config(grids: Mapping[str, tuple[int, int]], prefer: tuple[int, int] | None = None) -> BlockConfig:
    """One ``(r, oft_block_size)`` whose per-layer adjustment gives, for every module, a multiple of its grid.

    ``grids`` maps module -> ``(features, grid)``; the block size chosen for a
    module must be a multiple of ``grid`` (a generator on a grid of small blocks
    is exactly a generator on any coarser grid) and divide ``features``. Among
    valid configs the one with the fewest parameters wins, then the one PEFT
    adjusts on fewest layers (each adjustment is a warning at load time), then
    ``prefer`` (the inputs' own config).
    """

    pairs: dict[tuple[int, int], int] = {}
    for pair in grids.values():  # many modules share a (width, grid): evaluate each pair once
        pairs[pair] = pairs.get(pair, 0) + 1

    def sizes_for(r: int, bs: int) -> dict[tuple[int, int], int] | None:
        out = {}
        for features, grid in pairs:
            b = peft_block_size(features, r, bs)
            if b % grid:
                return None
            out[(features, grid)] = b
        return out

    candidates: list[tuple[int, int]] = []
    if prefer is not None:
        candidates.append(prefer)
    for features, grid in pairs:
        for d in range(grid, features + 1, grid):
            if features % d == 0:
                candidates.append((0, d))
                candidates.append((features // d, 0))
    def adjusted(r: int, bs: int) -> int:  # layers where PEFT would adjust the value (and warn)
        v = r or bs
        return sum(1 for features, _ in pairs if features % v or v > features)

    best: tuple[tuple[int, int, bool], tuple[int, int], dict[tuple[int, int], int]] | None = None
    for cand in dict.fromkeys(candidates):
        sizes = sizes_for(*cand)
        if sizes is None:
            continue
        cost = sum(count * pair[0] * (sizes[pair] - 1) for pair, count in pairs.items())
        key = (cost, adjusted(*cand), cand != prefer)
        if best is None or key < best[0]:
            best = (key, cand, sizes)
    if best is None:
        detail = ", ".join(f"{n} (width {f}, needs a multiple of {g})" for n, (f, g) in list(grids.items())[:6])
        raise IncompatibleAdaptersError(
            "no single OFT block size that PEFT would apply to every module fits the merged block grids: "
            f"{detail}. Merge fewer adapters at once, or fold into the base model instead (--fold-into), "
            "which has no such constraint."
        )
    module_sizes = {name: best[2][pair] for name, pair in grids.items()}
    return BlockConfig(r=best[1][0], oft_block_size=best[1][1], sizes=module_sizes)


def write_adapter_files(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (+ extras) into ``directory``.

    ``directory`` is a temporary one that the caller commits atomically
    (:func:`oftmerge.engine.commit.output_directory`).
    """
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(directory / "adapter_config.json", dict(config))
    for name, data in (extra_files or {}).items():
        (directory / name).write_bytes(data)


def pack_module(
    name: str, kind: str, stored: torch.Tensor, layout: str, *, is_packed: bool, dtype: torch.dtype, scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The tensors PEFT's ``layout`` stores for one module's merged generator ``stored`` (in the stored sign).

    ``stored`` is ``(blocks, b, b)``, or already the packed upper triangles when ``is_packed``;
    ``scale`` is the 0.14-0.15 layout's ``oft_s``.
    """
    from oftmerge.linalg import pack_skew

    prefix = KEY_PREFIX + name
    if layout == "0.18":
        suffix = ".oft_embedding_R.weight" if kind == "embedding" else ".oft_R.weight"
        out = {prefix + suffix: (stored if is_packed else pack_skew(stored)).to(dtype)}
    else:
        out = {prefix + ".oft_r": stored.to(dtype).contiguous()}
        if layout == "0.15":
            assert scale is not None
            out[prefix + ".oft_s"] = scale.to(dtype)
    for key, tensor in out.items():  # after the cast: a float64 result may not fit the stored dtype
        if not bool(torch.isfinite(tensor).all()):
            source = scale if key.endswith(".oft_s") and scale is not None else stored
            largest = float(source.abs().max())
            raise NumericalError(
                f"module {name!r}: {key} does not fit {str(dtype).removeprefix('torch.')}, the dtype the adapter stores "
                f"(largest entry {largest:.3g}, the dtype's largest {torch.finfo(dtype).max:.3g}); use a smaller --scale "
                "(or other weights); nothing was written"
            )
    return out


class PeftOft:
    """The PEFT OFT adapter directory, every release (the format of :mod:`oftmerge.formats.base`)."""

    name = "peft-oft"

    def detect(self, path: Path) -> bool:
        directory = path.parent if path.name in (*WEIGHT_FILES, "adapter_config.json") else path
        config = directory / "adapter_config.json"
        if not config.is_file():
            return False
        try:
            return str(read_json(config).get("peft_type", "")).upper() == "OFT"
        except AdapterFormatError:
            return False

    def read(self, path: Path, **options: Any) -> OftAdapter:
        return read_adapter(path, **options)

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], extra_files: Mapping[str, bytes]
    ) -> None:
        write_adapter_files(directory, tensors, config, extra_files)


#: the PEFT OFT format, registered first
PEFT_OFT = register_format(PeftOft())
