"""Planning a fold: which base tensor each adapted module folds into, tied embeddings, the output's shards.

:func:`plan_fold` reads the adapter (or takes a merge's result) and the base's tensor headers and
returns a frozen :class:`FoldPlan`; nothing is folded or written. :mod:`oftmerge.ops.fold` runs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, OftMergeError
from oftmerge.formats.base import read_oft_adapter
from oftmerge.formats.checkpoint import Checkpoint, missing_config_warning, read_model_config
from oftmerge.formats.io import sha256_file
from oftmerge.formats.peft_oft import RELEASES, OftAdapter, in_saved_module
from oftmerge.formats.shards import TensorInfo, plan_model, tie_groups, tied_embeddings, tied_shapes
from oftmerge.formats.sources import ResolvedSource, configured_base, describe_source, resolve_source, source_record

__all__ = ["FoldPlan", "base_key", "describe_base", "fold_base", "plan_fold", "saved_keys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldPlan:
    """Everything a fold will do, decided from the adapter and the base's headers."""

    config: Any  #: the :class:`~oftmerge.config.FoldConfig`
    base: Path
    checkpoint: Checkpoint
    adapter: OftAdapter
    source: Mapping[str, Any]  #: the adapter (path, sha256, release) or the merge's provenance
    modules: Mapping[str, str]  #: adapted module -> base tensor it folds into
    #: saved tensor of the adapter (head, bias; a model tensor name) -> base tensor it replaces
    saved: Mapping[str, str]
    #: base tensors a saved head replaces with another shape, or adds (:func:`head_updates`)
    resized: frozenset[str]
    config_updates: Mapping[str, Any]  #: ``config.json`` changes the resized head needs (architectures, labels)
    dropped: frozenset[str]  #: base tensors the new model class (a head added to a pretraining checkpoint) does not have
    untied: tuple[str, str] | None  #: (input embedding, lm_head) stored apart in the output
    untie: tuple[str, str] | None  #: the writer's ``untie``: only when the base does not store lm_head
    shards: tuple[tuple[TensorInfo, ...], ...]
    shard_size: int | str
    base_info: Mapping[str, Any]
    warnings: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  #: what the output must not replace, besides the base


def plan_fold(config: Any, shard_size: int | str = "5GB", *, dry_run: bool = False) -> FoldPlan:
    """Plan the fold of ``config`` (a :class:`~oftmerge.config.FoldConfig`) into shards of ``shard_size``."""
    base_source = resolve_source(config.base, "base model")
    base = base_source.path
    ckpt = Checkpoint(base)
    tied = tied_embeddings(base, ckpt)
    groups = tie_groups(base, ckpt)
    # the adapter names modules as the loaded model does, tied weights the checkpoint leaves out included
    shapes = tied_shapes(base, ckpt, groups=groups)
    read, source, inputs = _read(config, shapes)
    _refuse_shared_ties(read, groups, base)
    modules = {name: base_key(name, ckpt) for name in read.modules}
    saved = saved_keys(read, ckpt)
    resized, head_config, unused = head_updates(read, ckpt, saved)
    warnings: list[str] = list(read.notes)  # how the adapter was read (a PEFT release newer than oftmerge knows)
    if (no_config := missing_config_warning(ckpt)) is not None:
        warnings.append(no_config)
    if resized:
        warnings.append(
            f"the adapter's head ({', '.join(sorted(resized))}) does not fit the base's ({len(head_config['id2label'])} labels "
            f"in the adapter): the folded model is a {head_config['architectures'][0]} with the adapter's head and labels "
            "LABEL_0 ..., as PEFT gives after from_pretrained(base, num_labels=N, ignore_mismatched_sizes=True) and merge_and_unload"
            + (f"; {len(unused)} base tensor(s) that class does not have are left out ({', '.join(sorted(unused)[:3])}"
               f"{', ...' if len(unused) > 3 else ''})" if unused else "")
        )  # fmt: skip
    convs = conv_modules(read, modules, ckpt)
    if convs:
        warnings.append(
            f"{len(convs)} Conv2d module(s) with kernels larger than 1x1 ({', '.join(convs[:3])}{', ...' if len(convs) > 3 else ''}): "
            "the fold is PEFT's merged weight W R^T (what merge_and_unload gives), but PEFT's unmerged forward computes "
            "another function for such convs, so the folded model does not reproduce the adapted PeftModel's outputs "
            "(docs/fold.md, \"Where PEFT disagrees with itself\")"
        )
    untied = tied if tied is not None and set(tied) & set(modules.values()) else None
    if untied is not None:
        rotated = ", ".join(sorted(set(untied) & set(modules.values())))
        warnings.append(
            f"the base ties {untied[1]} to {untied[0]} and the adapter rotates {rotated}: the folded model stores "
            f"{untied[1]} separately (tie_word_embeddings=false), so that it computes what the adapted model "
            "computes (PEFT's in-place merge_and_unload would rotate both tied matrices)"
        )
    for name, key in modules.items():
        if key not in ckpt and (untied is None or key != untied[1]):
            raise IncompatibleAdaptersError(
                f"module {name!r}: the base model {base} stores no {key!r} and does not tie it to an input "
                "embedding; the adapter was trained on another model"
            )
    untie = untied if untied is not None and untied[1] not in ckpt else None
    shards = plan_model(ckpt, shard_size, untie=untie, replace={key: _planned(read, ckpt, saved, key) for key in resized}, drop=unused)
    return FoldPlan(
        config=config,
        base=base,
        checkpoint=ckpt,
        adapter=read,
        source=source,
        modules=modules,
        saved=saved,
        resized=frozenset(resized),
        dropped=frozenset(unused),
        config_updates=head_config,
        untied=untied,
        untie=untie,
        shards=tuple(tuple(s) for s in shards),
        shard_size=shard_size,
        base_info=describe_base(base, ckpt, config.hash_base and not dry_run, source_record(base_source)),
        warnings=tuple(warnings),
        inputs=tuple(inputs),
    )


def _refuse_shared_ties(read: OftAdapter, groups: Sequence[Sequence[str]], base: Path) -> None:
    """Refuse an adapter that rotates a weight tied in a group of more than two (Bart's and T5's ``shared``).

    PEFT wraps each module on its own: in Bart and T5 the encoder and decoder call their own
    ``embed_tokens`` (tied to ``shared``, never called), and ``lm_head`` is a third name of the same
    matrix. The adapted model rotates where the adapted module is called, a fold would rotate the one
    stored matrix, every tied copy. The two-tensor tie (``lm_head`` and the input embedding) is untied
    instead (see :func:`plan_fold`); here untying ``lm_head`` would leave the ``embed_tokens`` out of the
    checkpoint (``tie_word_embeddings=false`` unties all of them), and T5 cannot be untied at all
    (``transformers`` 5's ``T5Config`` always ties).
    """
    for group in groups:
        if len(group) <= 2:
            continue
        rotated = sorted(name for name in read.modules if f"{name}.weight" in group)
        if not rotated:
            continue
        source, others = group[0], list(group[1:])
        called = ", ".join(n.removesuffix(".weight") for n in others)
        raise IncompatibleAdaptersError(
            f"cannot fold {', '.join(map(repr, rotated))} into {base}: the base ties {', '.join(others)} to {source} (one stored "
            f"matrix). The adapted PeftModel rotates only where {' and '.join(map(repr, rotated))} is called (PEFT's forward never "
            f"calls {source.removesuffix('.weight')}: the model calls {called}, modules of their own), but a fold rotates that one "
            "matrix, so every tied name, and changes the model; oftmerge unties only a pair (lm_head and one input embedding): "
            "untying lm_head here would leave the embed_tokens missing from the checkpoint, and T5 cannot be untied in "
            "transformers 5. Fold an adapter without these modules (train with other target_modules), or use the adapter "
            "unmerged with PEFT"
        )


def conv_modules(read: OftAdapter, modules: Mapping[str, str], ckpt: Checkpoint) -> list[str]:
    """Adapted modules whose base weight is a Conv2d kernel larger than 1x1, where PEFT's forward is not its merge.

    PEFT >= 0.16 rotates a Conv2d's input patches in its forward and sums the overlapping ones
    (``F.fold``), so for a kernel larger than 1x1 its unmerged model differs from its merged weight
    ``W R^T``, which the fold computes (docs/fold.md, "Where PEFT disagrees with itself"). PEFT 0.7-0.15
    merge what their forward computes.
    """
    if read.release not in ("0.16", "0.18"):
        return []
    return [name for name, key in modules.items() if key in ckpt and _is_spatial_conv(tuple(ckpt.shape(key)))]


def _is_spatial_conv(shape: tuple[int, ...]) -> bool:
    """Whether a weight of this shape is a Conv2d kernel larger than 1x1: ``(out, in, kh, kw)`` with ``kh * kw > 1``."""
    return len(shape) == 4 and shape[2] * shape[3] > 1


def _read(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[OftAdapter, dict[str, Any], list[tuple[str, str]]]:
    """The adapter to fold, its provenance, and the input paths the output must not replace."""
    adapter = config.adapter
    if hasattr(adapter, "as_oft_adapter"):  # a MergeResult: folded from memory
        read, source = adapter.as_oft_adapter(shapes)
        return read, source, [("input adapter", i["path"]) for i in source["inputs"]]
    hub = None
    if not isinstance(adapter, OftAdapter):
        src = resolve_source(adapter, "adapter")
        hub = source_record(src)
        adapter = read_oft_adapter(src.path, peft_release=config.peft_release, base_shapes=shapes)
    source = {
        "path": str(Path(adapter.path).absolute()),
        "sha256": sha256_file(adapter.weights_path),
        "release": RELEASES[adapter.release],
        "release_source": adapter.release_source,
        "rotation_map": adapter.rotation_map.describe(),
        "base_model_name_or_path": adapter.base_model,
        **({"hub": hub} if hub else {}),
    }
    return adapter, source, [("the adapter", str(adapter.path))]


def fold_base(adapter: Any) -> tuple[Any, ResolvedSource]:
    """For a fold given no base: the adapter (resolved, when a path or Hub id) and the base its config names, resolved.

    The base is the adapter's ``base_model_name_or_path`` (a merge's: its first input's), a local
    directory or a Hub id, downloaded if need be (a fold needs the base's weights). When the config
    names none, or the name does not resolve, the error says what was tried and to pass the base.
    """
    if isinstance(adapter, (str, os.PathLike)):
        adapter = resolve_source(adapter, "adapter")
    label = describe_source(adapter) if isinstance(adapter, ResolvedSource) else str(getattr(adapter, "path", "<merged adapter>"))
    name = configured_base([adapter])
    todo = "pass the base model directory or Hub id (base=... / --base)"
    if name is None:
        raise AdapterFormatError(f"{label}: no base model given, and the adapter's config names none (base_model_name_or_path); {todo}")
    try:
        base = resolve_source(name, "base model")
    except OftMergeError as exc:
        raise AdapterFormatError(f"no base model given, and the one the adapter's config names did not resolve: {exc}; {todo}") from None
    if not base.path.is_dir():
        raise AdapterFormatError(
            f"{label}: no base model given, and the one its config names ({name}, base_model_name_or_path) is not a directory "
            f"nor a Hub id; {todo}"
        )
    log.info("folding into %s, the base model the adapter's config names", describe_source(base))
    return adapter, base


def base_key(name: str, ckpt: Checkpoint) -> str:
    """The base tensor (a checkpoint key) that module ``name`` (a PEFT module path: the loaded model's names) folds into.

    The model's name is mapped to the checkpoint's with ``transformers``' conversion mapping
    (:meth:`~oftmerge.formats.checkpoint.Checkpoint.model_key`: ViT's ``vit.layers.0.attention.q_proj``
    folds into ``vit.encoder.layer.0.attention.attention.query.weight``), and the output keeps the
    checkpoint's names, as ``merge_and_unload().save_pretrained()`` writes them. A unique suffix
    match is accepted. A weight ``transformers`` builds from several tensors, and a module the
    base does not have, are refused.
    """
    key = f"{name}.weight"
    found = ckpt.model_key(key)
    if found is not None:
        return found
    if key == "lm_head.weight":  # a tied lm_head is not stored (see plan_fold)
        return key
    why = ckpt.converted(key)
    if why is not None:
        raise IncompatibleAdaptersError(
            f"module {name!r}: its weight {key} is {why}, so it cannot be folded into the base model {ckpt.path} tensor by "
            "tensor; merge without folding, or leave the module out of the adapter"
        )
    matches = [k for k in ckpt.model_shapes() if k.endswith("." + key) or key.endswith("." + k)]
    if len(matches) == 1 and (found := ckpt.model_key(matches[0])) is not None:
        return found
    hint = f"candidates: {', '.join(matches[:4])}" if matches else f"closest: {', '.join(ckpt.closest(key)) or 'none'}"
    raise IncompatibleAdaptersError(
        f"module {name!r}: the base model {ckpt.path} has no weight {key!r} ({hint}); the adapter was trained on "
        "another model, or with a different module path"
    )


def saved_keys(read: OftAdapter, ckpt: Checkpoint) -> dict[str, str]:
    """Saved tensor (model name) -> the base tensor it replaces, as PEFT's ``merge_and_unload`` does; checked.

    A saved tensor replaces the base's tensor of the same name; it must have the base's shape,
    except for a classification head (:func:`head_updates`), which the caller resizes or adds.
    """
    out = {}
    for name in read.saved:
        key = ckpt.model_key(name)
        out[name] = key if key is not None and key in ckpt else name
    return out


#: PEFT task types whose head is the model's ``num_labels`` output layer, and transformers' class for each
_HEAD_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}


def _planned(read: OftAdapter, ckpt: Checkpoint, saved: Mapping[str, str], key: str) -> Any:
    """An empty (meta) tensor with the shape and dtype a resized head tensor ``key`` is written with (for planning)."""
    import torch

    name = next(n for n, k in saved.items() if k == key)
    return torch.empty(read.saved_shape(name), dtype=head_dtype(read, ckpt, saved, name), device="meta")


def head_dtype(read: OftAdapter, ckpt: Checkpoint, saved: Mapping[str, str], name: str) -> Any:
    """The dtype saved tensor ``name`` is written in: the base's tensor's, else the base's floating dtype (as the loaded model has)."""
    key = saved[name]
    if key in ckpt:
        return ckpt.dtype(key)
    floats = [ckpt.dtype(k) for k in ckpt.keys() if ckpt.dtype(k).is_floating_point]
    return max(set(floats), key=floats.count) if floats else read.saved_dtype(name)


def head_updates(read: OftAdapter, ckpt: Checkpoint, saved: Mapping[str, str]) -> tuple[set[str], dict[str, Any], set[str]]:
    """The saved tensors whose base tensor is missing or of another shape, the ``config.json`` updates they need,
    and the base tensors the new model class does not have (left out, as PEFT's saved model has none of them).

    PEFT's user loads a base whose head does not match the adapter's (another number of labels,
    or no head at all) as ``AutoModelForSequenceClassification.from_pretrained(base,
    num_labels=N, ignore_mismatched_sizes=True)``; ``merge_and_unload`` then saves that model: the
    adapter's head, ``architectures`` of that class, and the labels ``LABEL_0`` ... of ``N``.
    ``transformers`` itself says which ``N`` gives the saved shapes (the class built on the meta
    device for each candidate). Anything else that does not fit the base is refused in one line.
    """
    mismatched = {name: read.saved_shape(name) for name, key in saved.items() if key not in ckpt or tuple(ckpt.shape(key)) != read.saved_shape(name)}
    if not mismatched:
        return set(), {}, set()
    task = str(read.config.get("task_type") or "")
    entries = [str(e) for e in (read.config.get("modules_to_save") or [])]
    name, shape = next(iter(mismatched.items()))
    key = saved[name]
    where = f"the base model {ckpt.path} stores " + (f"no {key!r}" if key not in ckpt else f"{key} with shape {list(ckpt.shape(key))}")
    if task not in _HEAD_CLASSES or not all(in_saved_module(n, entries) for n in mismatched):
        raise IncompatibleAdaptersError(
            f"the adapter saved {name!r} with shape {list(shape)} (a modules_to_save module or a trained bias) but {where}; "
            "the adapter was trained on another model, or fold into a base saved with that module"
        )
    updates = _labels_for(ckpt.path, task, mismatched)
    if updates is None:
        raise IncompatibleAdaptersError(
            f"the adapter's {task} head ({', '.join(f'{n} {list(s)}' for n, s in mismatched.items())}) fits no number of labels "
            f"of {ckpt.path}'s model class, and {where}; fold into a base saved with that head"
        )
    names = updates.pop("_names")
    unused: set[str] = set()
    if list((read_model_config(ckpt.path) or {}).get("architectures") or []) != updates["architectures"]:
        # the model changes class (a pretraining checkpoint becomes a classifier): as PEFT's saved model, keep
        # only the tensors the new class has (a checkpoint key transformers builds from others is always kept)
        unused = {key for key, name in ckpt.names.to_model.items() if name not in names and key not in saved.values()}
    return {saved[n] for n in mismatched}, updates, unused


def _labels_for(base: Path, task: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """``architectures``, ``id2label`` and ``label2id`` of the base's model with the head of these shapes, or None."""
    import warnings

    import torch

    try:
        import transformers

        auto = getattr(transformers, _HEAD_CLASSES[task])
        config = transformers.AutoConfig.from_pretrained(base)
    except Exception:  # noqa: BLE001 - no transformers, or a config it cannot read: the head cannot be checked
        return None
    for n in sorted({s[0] for s in shapes.values() if s}):
        config.num_labels = n
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = auto.from_config(config)
        except Exception:  # noqa: BLE001 - a model type without such a head
            return None
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if all(state.get(name) == shape for name, shape in shapes.items()):
            labels = config.to_dict()
            return {
                "architectures": [type(model).__name__],
                "id2label": {str(k): v for k, v in labels["id2label"].items()},
                "label2id": dict(labels["label2id"]),
                "_names": frozenset(state),  # the task class's tensor names (not a config key)
            }
    return None


def describe_base(base: Path, ckpt: Checkpoint, hash_base: bool, hub: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Name and identity of the base: a fingerprint of its tensor headers, and with ``hash_base`` the files' SHA-256."""
    config = ckpt.config or {}
    fp = hashlib.sha256()
    for key in ckpt.keys_in_file_order():
        fp.update(f"{key}|{ckpt.dtype(key)}|{list(ckpt.shape(key))}\n".encode())
    info: dict[str, Any] = {
        "path": str(base.absolute()),
        "name_or_path": config.get("_name_or_path") or None,
        "architectures": config.get("architectures"),
        "tensors_fingerprint": fp.hexdigest(),
    }
    if ckpt.is_diffusers:  # a diffusers model (a U-Net, a transformer): its class, as its config names it
        info.update(library="diffusers", class_name=config.get("_class_name"))
    if hash_base:
        info["sha256"] = {shard: sha256_file(base / shard) for shard in ckpt.shards}
    if hub:  # a Hub base: the repository and the commit of the snapshot read
        info["hub"] = dict(hub)
    return info
