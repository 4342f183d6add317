"""Diffusion OFT module names -> the weights of a diffusers model or text encoder, as the tools name them.

LyCORIS and sd-scripts name a module ``prefix + path.replace('.', '_')``; :func:`resolve_modules`
matches those stems (without the prefix) against a :class:`~oftmerge.formats.checkpoint.Checkpoint`'s
own weights, and maps LDM/SGM names (kohya's SDXL files) with diffusers' own LoRA conversion
utilities. No hand-written tables.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from oftmerge.errors import IncompatibleAdaptersError
from oftmerge.formats.checkpoint import Checkpoint

__all__ = ["resolve_modules"]

log = logging.getLogger(__name__)

#: what ``text_model.`` is in a ``CLIPTextModel`` before ``transformers`` 5 flattened it (diffusers' LoRA loader drops it)
_CLIP_PREFIX = "text_model_"


def resolve_modules(
    stems: Sequence[str], ckpt: Checkpoint, *, denoiser: bool = False, labels: Sequence[str] | None = None, where: str = "the adapter"
) -> list[str]:
    """The checkpoint key of the weight of each module ``stem`` (a module path with ``.`` as ``_``, no prefix).

    A stem matches the weights whose path, with ``.`` replaced by ``_``, is the stem (the loaded
    model's names and the checkpoint's keys); exactly one must. Else, for the text encoder's
    ``text_model.`` prefix, the stem with it dropped or added; for a ``denoiser`` U-Net, diffusers'
    own LoRA conversion of LDM/SGM names (as its SD/SDXL loaders convert them). Ambiguity and no
    match are one error naming the modules (``labels``, default the stems) and the closest weight names.
    """
    labels = list(labels or stems)
    index = _weight_index(ckpt)
    found: dict[int, str] = {}
    ambiguous: list[str] = []
    for i, stem in enumerate(stems):
        alternatives = [stem, stem[len(_CLIP_PREFIX) :] if stem.startswith(_CLIP_PREFIX) else _CLIP_PREFIX + stem]
        for s in alternatives:
            keys = index.get(s, [])
            if len(keys) > 1:
                ambiguous.append(f"{labels[i]!r} ({', '.join(keys)})")
            if keys:
                found[i] = keys[0]
                break
    if ambiguous:
        raise IncompatibleAdaptersError(
            f"{where}: module name(s) {'; '.join(ambiguous[:3])} match several weights of {ckpt.path} once '.' is read as '_'; "
            "the file's names cannot say which module was trained"
        )
    missing = [i for i in range(len(stems)) if i not in found]
    config = ckpt.config or {}
    if missing and denoiser and "layers_per_block" in config:  # a U-Net: diffusers converts kohya/LDM names for U-Nets only
        for i, path in _diffusers_unet_paths([stems[i] for i in missing], config).items():
            key = ckpt.model_key(f"{path}.weight")
            if key is not None and key in ckpt:
                found[missing[i]] = key
        missing = [i for i in missing if i not in found]
    if missing:
        close = {i: difflib.get_close_matches(stems[i], list(index), n=3, cutoff=0.5) for i in missing[:3]}
        shown = "; ".join(f"{labels[i]!r} (closest: {', '.join(c) or 'none'})" for i, c in close.items())
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise IncompatibleAdaptersError(
            f"{where}: {len(missing)} module(s) match no weight of {ckpt.path}: {shown}{more}; the file was trained on another model "
            "(or another component: give the pipeline directory, or the component's folder)"
        )
    return [found[i] for i in range(len(stems))]


def _weight_index(ckpt: Checkpoint) -> dict[str, list[str]]:
    """Module path with ``.`` as ``_`` -> the checkpoint keys of the ``.weight`` tensors of that name (model names and checkpoint keys)."""
    index: dict[str, set[str]] = {}
    for name in {*ckpt.model_shapes(), *ckpt.keys()}:
        if not name.endswith(".weight"):
            continue
        key = ckpt.model_key(name)
        if key is not None and key in ckpt:
            index.setdefault(name[: -len(".weight")].replace(".", "_"), set()).add(key)
    return {k: sorted(v) for k, v in index.items()}


def _diffusers_unet_paths(stems: Sequence[str], config: Mapping[str, Any]) -> dict[int, str]:
    """Index of each stem -> its diffusers module path, by diffusers' own conversion of kohya/LDM LoRA keys (the ones it maps).

    Each stem becomes a fake LoRA pair ``lora_unet_<stem>.lora_down.weight`` / ``.lora_up.weight``
    tagged with its index; ``_maybe_map_sgm_blocks_to_diffusers`` (with the U-Net's ``config``: its
    ``layers_per_block`` numbers the blocks), ``_convert_non_diffusers_lora_to_diffusers`` and
    ``convert_unet_state_dict_to_peft`` rename them as diffusers' ``load_lora_weights`` does; the
    module is what precedes ``.lora_A.weight``. Empty when diffusers is missing or refuses the names.
    """
    from types import SimpleNamespace

    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # pragma: no cover - diffusers is optional (oftmerge[diffusion])
        return {}
    fake: dict[str, torch.Tensor] = {}
    for i, stem in enumerate(stems):
        tag = torch.tensor([i])
        fake[f"lora_unet_{stem}.lora_down.weight"] = tag
        fake[f"lora_unet_{stem}.lora_up.weight"] = tag
    try:
        fake = _maybe_map_sgm_blocks_to_diffusers(fake, SimpleNamespace(**config))
        fake, _ = _convert_non_diffusers_lora_to_diffusers(fake)
        fake = convert_unet_state_dict_to_peft(fake)
    except Exception as exc:  # noqa: BLE001 - diffusers refuses names it cannot map: they stay unresolved
        log.debug("diffusers' LoRA key conversion refused the module names: %s", exc)
        return {}
    return {int(tag): key.removeprefix("unet.").removesuffix(".lora_A.weight") for key, tag in fake.items() if key.endswith(".lora_A.weight")}
