"""Merge OFT adapters held by a live ``peft.PeftModel`` into a new adapter of that model.

Importing this module adds :func:`merge_oft_adapters` to ``peft.PeftModel`` as a method, in the
spirit of PEFT's ``add_weighted_adapter`` (which PEFT offers for LoRA and IA3 only):

>>> import oftmerge.peft  # enables model.merge_oft_adapters  # doctest: +SKIP
>>> model = PeftModel.from_pretrained(base, "adapters/oft-upper", adapter_name="upper")  # doctest: +SKIP
>>> model.load_adapter("adapters/oft-reverse", adapter_name="reverse")  # doctest: +SKIP
>>> report = model.merge_oft_adapters(["upper", "reverse"], adapter_name="both")  # doctest: +SKIP
>>> model.set_adapter("both")  # doctest: +SKIP

The result equals merging the same adapters from disk with :func:`oftmerge.merge_adapters`
(the same tensors, bit for bit), because both paths read the same tensors and sort the inputs
the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oftmerge.errors import AdapterFormatError, OftMergeError
from oftmerge.formats.io import TensorDict
from oftmerge.formats.peft_oft import OftAdapter, adapter_from_tensors
from oftmerge.ops.merge import merge_adapters
from oftmerge.ops.merge_result import MergeResult

__all__ = ["live_adapter", "merge_oft_adapters"]


def _config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    for key, value in list(d.items()):
        if isinstance(value, set):
            d[key] = sorted(value)
        elif hasattr(value, "value") and key in ("peft_type", "task_type"):
            d[key] = value.value
    return d


def live_adapter(model: Any, name: str) -> OftAdapter:
    """Describe adapter ``name`` of a live PeftModel as an :class:`OftAdapter` (tensors copied to CPU)."""
    from peft.utils import get_peft_model_state_dict

    if name not in model.peft_config:
        raise OftMergeError(
            f"the model has no adapter named {name!r}; its adapters are: {', '.join(sorted(model.peft_config))}"
        )
    config = _config_dict(model.peft_config[name])
    if str(config.get("peft_type", "")).upper() != "OFT":
        raise AdapterFormatError(
            f"adapter {name!r} of the live model is a {config.get('peft_type')} adapter, not OFT; "
            "merge_oft_adapters merges OFT adapters only (for LoRA use PEFT's add_weighted_adapter or "
            "oftmerge's decoupling path)"
        )
    # no copies of base embeddings (PEFT's save_embedding_layers="auto" adds a vocab x hidden copy of every embedding
    # a tuner wraps): they are not the adapter, and the merge of adapters saved without them must be the same
    state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    return adapter_from_tensors(Path(f"<live adapter {name}>"), config, TensorDict(state, f"<live adapter {name}>"))


def merge_oft_adapters(
    model: Any,
    adapters: Sequence[str],
    weights: Sequence[float] | None = None,
    adapter_name: str = "merged",
    method: str = "orthomerge",
    *,
    scale: float = 1.0,
    cayley: str = "auto",
    method_options: Mapping[str, Any] | None = None,
    allow_base_mismatch: bool = False,
    saved_modules: str = "identical",
) -> MergeResult:
    """Merge OFT adapters ``adapters`` of ``model`` into a new adapter ``adapter_name`` of the same model.

    Arguments are those of :func:`oftmerge.merge_adapters`. The new adapter is added but not
    activated (as with PEFT's ``add_weighted_adapter``): call ``model.set_adapter(adapter_name)``.
    Returns the :class:`~oftmerge.MergeResult` (its ``summary()`` says what the merge did).

    ``saved_modules`` is what the new adapter keeps of the inputs' ``modules_to_save`` heads
    (one copy per adapter in PEFT) and trained biases (``identical``, ``mean``, ``first``,
    ``drop``; see :func:`oftmerge.merge_adapters`). PEFT keeps no per-adapter copy of a trained
    bias: the model holds the biases of the adapter loaded last, every adapter reports those, and
    loading the merged adapter writes the merged biases into the model for all its adapters.
    """
    from peft import OFTConfig
    from peft.utils import set_peft_model_state_dict

    if not adapters:
        raise OftMergeError("no adapters given: pass the names of at least one OFT adapter of the model")
    if adapter_name in model.peft_config:
        raise OftMergeError(
            f"the model already has an adapter named {adapter_name!r}; choose another adapter_name "
            "or delete it first with model.delete_adapter"
        )
    inputs = [live_adapter(model, name) for name in adapters]
    result = merge_adapters(
        inputs,
        method=method,
        weights=weights,
        scale=scale,
        cayley=cayley,
        method_options=method_options,
        allow_base_mismatch=allow_base_mismatch,
        saved_modules=saved_modules,
    )
    if result.layout != "0.18":  # pragma: no cover - live adapters are always of the installed release
        raise OftMergeError(f"cannot add a PEFT {result.layout} layout adapter to a live model")
    fields = {f.name for f in dataclasses.fields(OFTConfig)}
    config = OFTConfig(**{k: v for k, v in result.config.items() if k in fields and k != "peft_type"})
    model.add_adapter(adapter_name, config)
    device = next(p.device for p in model.parameters())
    tensors = {**_base_heads(model, adapter_name), **result.tensors}
    outcome = set_peft_model_state_dict(model, {k: v.to(device) for k, v in tensors.items()}, adapter_name=adapter_name)
    missing = [k for k in getattr(outcome, "missing_keys", []) if f".{adapter_name}." in k and "oft_" in k]
    unexpected = list(getattr(outcome, "unexpected_keys", []))
    if missing or unexpected:  # pragma: no cover - would be a bug in key naming
        model.delete_adapter(adapter_name)
        raise OftMergeError(f"could not load the merged tensors into {adapter_name!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return result


def _base_heads(model: Any, adapter_name: str) -> dict[str, Any]:
    """The base model's tensors of every module PEFT wraps for ``modules_to_save``, keyed as an adapter stores them.

    PEFT gives each adapter its own copy of such a module and loads it from the adapter's
    tensors; where the merge keeps none (``saved_modules="drop"``, or no input saved it), the
    new adapter's copy is the base's, as it is in a merged adapter loaded from disk.
    """
    from peft.utils.other import ModulesToSaveWrapper

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            for key, value in module.original_module.state_dict().items():
                out[f"{name}.{key}"] = value.detach()
    return out


def _install() -> None:
    from peft import PeftModel

    if not hasattr(PeftModel, "merge_oft_adapters"):
        PeftModel.merge_oft_adapters = merge_oft_adapters  # type: ignore[attr-defined]


_install()
