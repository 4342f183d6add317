"""Planning a fold: which base tensor each adapted module folds into, tied embeddings, the output's shards.

:func:`plan_fold` reads the adapter (or takes a merge's result) and the base's tensor headers and
returns a frozen :class:`FoldPlan`; nothing is folded or written. :mod:`oftmerge.ops.fold` runs it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oftmerge.errors import IncompatibleAdaptersError
from oftmerge.formats.base import read_oft_adapter
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.io import sha256_file
from oftmerge.formats.peft_oft import RELEASES, OftAdapter
from oftmerge.formats.shards import TensorInfo, plan_model, tied_embeddings

__all__ = ["FoldPlan", "base_key", "plan_fold", "saved_keys"]


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
    untied: tuple[str, str] | None  #: (input embedding, lm_head) stored apart in the output
    untie: tuple[str, str] | None  #: the writer's ``untie``: only when the base does not store lm_head
    shards: tuple[tuple[TensorInfo, ...], ...]
    shard_size: int | str
    base_info: Mapping[str, Any]
    warnings: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  #: what the output must not replace, besides the base


def plan_fold(config: Any, shard_size: int | str = "5GB", *, dry_run: bool = False) -> FoldPlan:
    """Plan the fold of ``config`` (a :class:`~oftmerge.config.FoldConfig`) into shards of ``shard_size``."""
    base = Path(config.base)
    ckpt = Checkpoint(base)
    shapes = ckpt.shapes()
    tied = tied_embeddings(base, ckpt)
    if tied is not None and tied[1] not in shapes:  # a tied lm_head is the input embedding
        shapes[tied[1]] = shapes[tied[0]]
    read, source, inputs = _read(config, shapes)
    modules = {name: base_key(name, ckpt) for name in read.modules}
    saved = saved_keys(read, ckpt)
    warnings: list[str] = []
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
    shards = plan_model(ckpt, shard_size, untie=untie)
    return FoldPlan(
        config=config,
        base=base,
        checkpoint=ckpt,
        adapter=read,
        source=source,
        modules=modules,
        saved=saved,
        untied=untied,
        untie=untie,
        shards=tuple(tuple(s) for s in shards),
        shard_size=shard_size,
        base_info=_describe_base(base, ckpt, config.hash_base and not dry_run),
        warnings=tuple(warnings),
        inputs=tuple(inputs),
    )


def _read(config: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[OftAdapter, dict[str, Any], list[tuple[str, str]]]:
    """The adapter to fold, its provenance, and the input paths the output must not replace."""
    adapter = config.adapter
    if hasattr(adapter, "as_oft_adapter"):  # a MergeResult: folded from memory
        read, source = adapter.as_oft_adapter(shapes)
        return read, source, [("input adapter", i["path"]) for i in source["inputs"]]
    if not isinstance(adapter, OftAdapter):
        adapter = read_oft_adapter(adapter, peft_release=config.peft_release, base_shapes=shapes)
    source = {
        "path": str(Path(adapter.path).absolute()),
        "sha256": sha256_file(adapter.weights_path),
        "release": RELEASES[adapter.release],
        "release_source": adapter.release_source,
        "rotation_map": adapter.rotation_map.describe(),
        "base_model_name_or_path": adapter.base_model,
    }
    return adapter, source, [("the adapter", str(adapter.path))]


def base_key(name: str, ckpt: Checkpoint) -> str:
    """The base tensor that module ``name`` (a PEFT module path) folds into."""
    key = f"{name}.weight"
    if key in ckpt or key == "lm_head.weight":  # a tied lm_head is not stored (see plan_fold)
        return key
    matches = [k for k in ckpt.keys() if k.endswith("." + key) or key.endswith("." + k)]
    if len(matches) == 1:
        return matches[0]
    hint = f" (candidates: {', '.join(matches[:4])})" if matches else ""
    raise IncompatibleAdaptersError(
        f"module {name!r}: the base model {ckpt.path} has no weight {key!r}{hint}; the adapter was trained on "
        "another model, or with a different module path"
    )


def saved_keys(read: OftAdapter, ckpt: Checkpoint) -> dict[str, str]:
    """Saved tensor (model name) -> the base tensor it replaces, as PEFT's ``merge_and_unload`` does; checked.

    A saved tensor replaces a tensor of the same name and shape; a head saved for another number
    of labels, or a head the base does not have, is refused: PEFT's user loads the base with that
    head first (``AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)``), and
    the fold must be given a base saved that way.
    """
    out = {}
    for name in read.saved:
        key = ckpt.model_key(name) if hasattr(ckpt, "model_key") else (name if name in ckpt else None)
        shape = read.saved_shape(name)
        if key is None or key not in ckpt:
            raise IncompatibleAdaptersError(
                f"the adapter saved {name!r} {list(shape)} (a modules_to_save head or a trained bias) but the base model "
                f"{ckpt.path} has no such tensor; fold into a base that has this module (for a classification head: "
                "save AutoModelForSequenceClassification.from_pretrained(base, num_labels=N) and fold into that)"
            )
        if tuple(ckpt.shape(key)) != shape:
            raise IncompatibleAdaptersError(
                f"the adapter saved {name!r} with shape {list(shape)} but the base model {ckpt.path} stores {key} with shape "
                f"{list(ckpt.shape(key))} (a head for another number of labels?); fold into a base saved with that head "
                f"(e.g. AutoModelForSequenceClassification.from_pretrained(base, num_labels={shape[0] if shape else 'N'}, "
                "ignore_mismatched_sizes=True).save_pretrained(dir))"
            )
        out[name] = key
    return out


def _describe_base(base: Path, ckpt: Checkpoint, hash_base: bool) -> dict[str, Any]:
    """Name and identity of the base: a fingerprint of its tensor headers, and with ``hash_base`` the files' SHA-256."""
    config = {}
    if (base / "config.json").is_file():
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    fp = hashlib.sha256()
    for key in ckpt.keys_in_file_order():
        fp.update(f"{key}|{ckpt.dtype(key)}|{list(ckpt.shape(key))}\n".encode())
    info: dict[str, Any] = {
        "path": str(base.absolute()),
        "name_or_path": config.get("_name_or_path") or None,
        "architectures": config.get("architectures"),
        "tensors_fingerprint": fp.hexdigest(),
    }
    if hash_base:
        info["sha256"] = {shard: sha256_file(base / shard) for shard in ckpt.shards}
    return info
