"""Checkpoint keys <-> model parameter names, through ``transformers``' own conversion mapping.

``transformers`` 5 loads some architectures under other names than the ones it saves: a ViT
checkpoint stores ``vit.encoder.layer.0.attention.attention.query.weight``, the loaded
``ViTForImageClassification`` calls that parameter ``vit.layers.0.attention.q_proj.weight``.
``from_pretrained`` renames every checkpoint key through the transforms registered for the
model's class and each of its sub-models (``transformers.conversion_mapping``:
``get_model_conversion_mapping``, ``WeightRenaming`` / ``WeightConverter``), and
``save_pretrained`` applies them backwards (``revert_weight_conversion``), so checkpoints keep
the old names. PEFT names modules after the loaded model; a fold reads and writes the checkpoint.

:func:`name_map` runs the loader's renaming (``core_model_loading.rename_source_key``, in the
loader's key order) on a checkpoint's keys, with the transforms of the class its
``config.json`` names (built on the ``meta`` device: no weights are read or allocated):

>>> names = name_map("vit-checkpoint", Checkpoint("vit-checkpoint").keys())    # doctest: +SKIP
>>> names.to_checkpoint["vit.layers.0.attention.q_proj.weight"]                # doctest: +SKIP
'vit.encoder.layer.0.attention.attention.query.weight'

* A ``WeightRenaming`` is one-to-one: the model's tensor *is* the checkpoint's, under another
  name, so it is folded in place and the output keeps the checkpoint's name (what
  ``merge_and_unload().save_pretrained()`` writes too).
* A ``WeightConverter`` builds a model tensor from other tensors (MoE experts stacked, ``qkv``
  split, a transpose or a RoPE permutation): its model parameters are in :attr:`NameMap.converted`
  with the reason, and are not mapped; folding them tensor by tensor is refused.
* The map is the identity when ``transformers`` is not installed or has no conversion mapping
  (before 5.0), when there is no ``config.json`` or it names no class ``transformers`` has
  (custom code), when it is a ``diffusers`` model's (``_class_name``: ``diffusers`` keeps the
  checkpoint's names), or when the model cannot be built; :attr:`NameMap.how` says which.

``transformers`` is imported only here and only when a map is asked for; maps are cached per
process by the config and the key set.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NameMap", "identity_map", "is_diffusers_config", "meta_model", "name_map"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NameMap:
    """How the keys of one checkpoint are named in the model that loads them."""

    #: checkpoint key -> model parameter name, for every key loaded one to one (renamed or not)
    to_model: Mapping[str, str]
    #: model parameter name -> checkpoint key (the inverse of :attr:`to_model`)
    to_checkpoint: Mapping[str, str]
    #: model parameter name a ``WeightConverter`` builds from other tensors -> why it has no checkpoint key of its own
    converted: Mapping[str, str] = field(default_factory=dict)
    #: shapes of the :attr:`converted` parameters in the model
    converted_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    how: str = "identity"  #: where the map comes from, or why it is the identity

    @property
    def renamed(self) -> bool:
        """Whether any name differs between the checkpoint and the model (or a converter builds one)."""
        return bool(self.converted) or any(k != v for k, v in self.to_model.items())


def is_diffusers_config(config: Any) -> bool:
    """Whether a ``config.json`` (as a dict) is a ``diffusers`` model's: it names the class in ``_class_name``, not ``architectures``.

    >>> is_diffusers_config({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"})
    True
    """
    return isinstance(config, dict) and isinstance(config.get("_class_name"), str) and not config.get("architectures")


def identity_map(keys: Iterable[str], how: str = "identity") -> NameMap:
    """Every key is its own model name."""
    names = {k: k for k in keys}
    return NameMap(names, names, how=how)


def name_map(directory: str | os.PathLike[str], keys: Iterable[str]) -> NameMap:
    """The map of checkpoint ``keys`` (a model directory's tensor names) to the names of the model its ``config.json`` describes."""
    keys = tuple(keys)
    config = Path(directory) / "config.json"
    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return identity_map(keys, f"identity ({config} not readable)")
    return _cached_map(str(Path(directory).absolute()), text, keys)


@functools.lru_cache(maxsize=16)
def _cached_map(directory: str, config_text: str, keys: tuple[str, ...]) -> NameMap:
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError:
        return identity_map(keys, "identity (config.json is not JSON)")
    if is_diffusers_config(config):
        return identity_map(keys, f"identity (a diffusers {config['_class_name']}: diffusers loads the checkpoint's names as they are)")
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not isinstance(architectures[0], str):
        return identity_map(keys, "identity (config.json names no architecture)")
    try:
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:  # not installed, or transformers < 5 (no conversion mapping: names are not changed on load)
        return identity_map(keys, "identity (no transformers conversion mapping installed)")
    try:
        cls = getattr(transformers, architectures[0], None)
    except Exception:  # noqa: BLE001 - the lazy module may fail to import the class's optional dependencies
        cls = None
    if not isinstance(cls, type) or not hasattr(cls, "base_model_prefix"):
        return identity_map(keys, f"identity (transformers has no class {architectures[0]})")
    try:
        model = meta_model(cls, directory)
        conversions = get_model_conversion_mapping(model)  # what from_pretrained uses (legacy renamings included)
        meta = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        prefix = model.base_model_prefix
        meta_sd = dict.fromkeys(meta, True)  # rename_source_key only asks whether a name is a model's
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        to_model: dict[str, str] = {}
        built: dict[str, list[str]] = {}  # converted model name -> the checkpoint keys it is built from
        how_built: dict[str, Any] = {}
        for key in sorted(keys, key=dot_natural_key):  # the loader's order (GroupWeightRename depends on it)
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
            if renamed not in meta and key in meta:  # as the loader: a key that should not have been renamed
                renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
            if pattern is not None:
                conv = by_pattern[pattern]
                first = conv.target_patterns[0]
                targets = [renamed.replace(first, t, 1) for t in conv.target_patterns] if first in renamed else [renamed]
                for t in targets:
                    if t in meta:
                        built.setdefault(t, []).append(key)
                        how_built[t] = conv
                continue
            to_model[key] = renamed if renamed in meta else key  # a key the model does not expect keeps its name
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party model build means: names unknown
        log.debug("%s: cannot build %s on the meta device (%s); the checkpoint's names are used", directory, architectures[0], exc)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return identity_map(keys, f"identity ({architectures[0]} could not be built: {reason})")
    to_checkpoint: dict[str, str] = {}
    for key, name in to_model.items():
        if name not in to_checkpoint or key == name:  # two keys for one name: the one that is the name wins
            to_checkpoint[name] = key
    version = getattr(transformers, "__version__", "?")
    converted = {name: _why(sources, how_built[name], version) for name, sources in built.items()}
    return NameMap(
        to_model,
        to_checkpoint,
        converted,
        {name: meta[name] for name in converted},
        how=f"transformers {version} conversion mapping of {architectures[0]}",
    )


def meta_model(cls: type, directory: str | os.PathLike[str]) -> Any:
    """``cls`` built from the directory's ``config.json`` on the ``meta`` device (structure and names only).

    Cached per process by class, directory and config text, so the name map and the tie groups of
    one base (:func:`oftmerge.formats.shards.tie_groups`) share one build. Raises what building raises.
    """
    directory = str(Path(directory).absolute())
    return _built(cls, directory, (Path(directory) / "config.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=8)
def _built(cls: type, directory: str, config_text: str) -> Any:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if getattr(config, "use_pretrained_backbone", False):  # never download a backbone to learn names
        config.use_pretrained_backbone = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with torch.device("meta"):
                return cls(config)
        finally:
            transformers.logging.set_verbosity(level)


def _why(sources: list[str], converter: Any, version: str) -> str:
    ops = ", ".join(type(op).__name__ for op in getattr(converter, "operations", [])) or type(converter).__name__
    shown = ", ".join(sources[:2]) + (f" and {len(sources) - 2} more" if len(sources) > 2 else "")
    return f"built on load by transformers {version} from the checkpoint's {shown} ({ops}), not renamed from one tensor"
