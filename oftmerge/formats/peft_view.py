"""A PEFT OFT adapter seen as a diffusion OFT file: PEFT adapters of diffusers models in cross-format merges and conversions.

PEFT adapters trained on a diffusers ``UNet2DConditionModel`` (or its CLIP text encoder) name modules
by their dotted path (``down_blocks.0.attentions.0.proj_in``); the diffusion formats by the
kohya / LyCORIS stem (``lora_unet_down_blocks_0_attentions_0_proj_in``). :func:`peft_as_diffusion`
gives such an adapter the stems (``lora_unet_`` for a U-Net, ``lora_te_`` when every module is
under ``text_model.``, or the ``component`` given) and PEFT's own effective generators, rotation
map and side (:mod:`oftmerge.formats.peft_oft`), so that ``merge --to`` / ``convert --to`` treat it
like any other input: exact into LyCORIS / kohya only for PEFT 0.7-0.13 (which rotate the output
side, as they do), into OneTrainer only for PEFT >= 0.14 with the same series (the input side).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from oftmerge.errors import AdapterFormatError
from oftmerge.formats.diffusion import DiffusionAdapter, DiffusionModule
from oftmerge.formats.peft_oft import OftAdapter, read_adapter

__all__ = ["PEFT_COMPONENTS", "peft_as_diffusion"]

#: component -> the stem prefix its modules get
PEFT_COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}


def peft_as_diffusion(adapter: str | os.PathLike[str] | OftAdapter, *, component: str | None = None) -> DiffusionAdapter:
    """``adapter`` (a PEFT OFT adapter directory, or one already read) as a :class:`DiffusionAdapter` of format ``peft``."""
    read = adapter if isinstance(adapter, OftAdapter) else read_adapter(Path(adapter))
    where = read.path
    if read.saved:
        raise AdapterFormatError(f"{where}: saves non-OFT tensors ({', '.join(sorted(read.saved)[:3])}); diffusion OFT files cannot hold them")
    if component is None:
        component = "text_encoder" if all(n.startswith("text_model.") for n in read.modules) else "unet"
    if component not in PEFT_COMPONENTS:
        raise AdapterFormatError(f"component {component!r}: expected one of {', '.join(PEFT_COMPONENTS)}")
    prefix = PEFT_COMPONENTS[component]
    dotted: dict[str, str] = {}
    modules: dict[str, DiffusionModule] = {}
    for name, spec in read.modules.items():
        if spec.shared or spec.kind != "linear":
            what = "block_share" if spec.shared else "an embedding"
            raise AdapterFormatError(f"{where}: module {name!r} is {what}; diffusion OFT files hold block-diagonal Linear / Conv2d rotations only")
        if spec.scale_key is not None and read.has_nontrivial_scale():
            raise AdapterFormatError(f"{where}: module {name!r} has PEFT 0.14-0.15 oft_s scales != 1; no diffusion format holds them (fold instead)")
        stem = prefix + name.replace(".", "_")
        blocks = spec.num_blocks or 0
        if spec.features is not None and spec.features != blocks * spec.block_size:
            raise AdapterFormatError(
                f"{where}: module {name!r}: its {blocks} blocks of {spec.block_size} do not cover its width {spec.features} (PEFT 0.7-0.13 padding)"
            )
        dotted[stem] = name
        modules[stem] = DiffusionModule(name=stem, key=spec.key, stages=1, num_blocks=blocks, block_size=spec.block_size)

    def effective(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
        return read.generator(dotted[mod.name])

    return DiffusionAdapter(
        path=read.path, format="peft", algo=f"PEFT {read.release_source}", side=read.side,  # type: ignore[arg-type]
        rotation_map=read.rotation_map, modules=modules, metadata={}, _source=read._file, _effective=effective, notes=read.notes,
    )  # fmt: skip
