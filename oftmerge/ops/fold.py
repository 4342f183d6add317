"""Fold an OFT adapter (or a merge of several) into its base model: a full ``transformers`` model directory.

>>> from oftmerge.ops.fold import fold_adapter
>>> fold_adapter("adapters/oft-upper", "base-model", "folded", shard_size="2GB")  # doctest: +SKIP
>>> merged = oftmerge.merge_adapters(["a", "b"])                                   # doctest: +SKIP
>>> fold_adapter(merged, "base-model", "folded-merge")                             # doctest: +SKIP

The result is what PEFT's ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``
followed by ``save_pretrained`` gives, computed one tensor at a time:

* every adapted weight is folded with :func:`oftmerge.kernels.fold.fold_weight` (the
  rotation PEFT builds, for every release, layout, Cayley variant, Linear,
  Embedding and square-kernel Conv2d), in float32 for 16-bit weights and
  rounded once to the weight's dtype, as PEFT does;
* every other tensor is copied byte for byte (never decoded);
* config, generation config and tokenizer files are copied; ``README.md`` is
  a model card and ``oftmerge.json`` records the provenance;
* memory holds one tensor (and its float32 copies) at a time.

Tied embeddings. When the base ties ``lm_head`` to the input embedding and the
adapter rotates either of them, PEFT's in-place merge writes the rotated
matrix into the one shared tensor, so the merged model rotates *both* (which
the adapter never did). oftmerge keeps the function of the adapted model
instead: it stores ``lm_head.weight`` separately and sets
``tie_word_embeddings: false`` (the output is larger by ``vocab x hidden``),
and says so in a warning and in the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine import distributed
from oftmerge.errors import IncompatibleAdaptersError, NumericalError, OftMergeError
from oftmerge.kernels.fold import adapter_rotation, all_finite, fold_weight
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.peft_oft import RELEASES, OftAdapter, read_adapter
from oftmerge.formats.shards import plan_model, tied_embeddings, write_model
from oftmerge.formats.writer import write_adapter_dir
from oftmerge.integrations.hub import folded_model_card, library_versions, push_folder
from oftmerge.formats.io import sha256_file
from oftmerge.ops.merge import MergeResult, torch_threads

__all__ = ["FoldResult", "fold_adapter"]

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """What a fold wrote (or, in a dry run, would write)."""

    base: Path
    source: dict[str, Any]  #: the adapter (path, sha256, release) or the merge's provenance
    modules: dict[str, str]  #: adapted module -> base tensor it folds into
    base_info: dict[str, Any]
    untied: tuple[str, str] | None
    shards: list[list[str]]  #: tensor names per output shard
    total_bytes: int
    shard_size: int | str
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    out_dir: Path | None = None
    pushed: Any = None  #: what :func:`oftmerge.integrations.hub.push_folder` returned, when pushed

    def provenance(self) -> dict[str, Any]:
        """Everything needed to know how the model was made (no timestamps: re-runs give the same bytes)."""
        return {
            "tool": "oftmerge",
            "kind": "folded model",
            "versions": library_versions(),
            "base": self.base_info,
            "source": self.source,
            "modules": dict(self.modules),
            "untied_embeddings": list(self.untied) if self.untied else None,
            "warnings": list(self.warnings),
        }

    def summary(self, max_modules: int = 12) -> str:
        src = self.source
        what = src.get("path") or f"merge of {len(src.get('inputs', []))} adapters ({src.get('method')})"
        lines = [f"fold: {what} into {self.base}"]
        lines.append(
            f"output: {len(self.modules)} weights folded, {sum(len(s) for s in self.shards) - len(self.modules)} tensors "
            f"copied as they are, {len(self.shards)} shard(s), {self.total_bytes / 1e6:.2f} MB"
        )
        for name, key in list(self.modules.items())[:max_modules]:
            lines.append(f"  {name[-56:]:<56} -> {key}")
        if len(self.modules) > max_modules:
            lines.append(f"  ... {len(self.modules) - max_modules} more modules")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _base_key(name: str, ckpt: Checkpoint) -> str:
    """The base tensor that module ``name`` (a PEFT module path) folds into."""
    key = f"{name}.weight"
    if key in ckpt or key == "lm_head.weight":  # a tied lm_head is not stored (see _plan)
        return key
    matches = [k for k in ckpt.keys() if k.endswith("." + key) or key.endswith("." + k)]
    if len(matches) == 1:
        return matches[0]
    hint = f" (candidates: {', '.join(matches[:4])})" if matches else ""
    raise IncompatibleAdaptersError(
        f"module {name!r}: the base model {ckpt.path} has no weight {key!r}{hint}; the adapter was trained on "
        "another model, or with a different module path"
    )


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


def _as_adapter(adapter: Any, shapes: Mapping[str, tuple[int, ...]], peft_release: str | None, tmp: Path) -> tuple[OftAdapter, dict[str, Any]]:
    if isinstance(adapter, MergeResult):
        if adapter.dry_run:
            raise OftMergeError("this is a dry-run merge result: nothing was merged, nothing can be folded")
        write_adapter_dir(tmp / "merged", adapter.tensors, adapter.config)
        read = read_adapter(tmp / "merged", peft_release=adapter.layout, base_shapes=shapes)
        return read, adapter.provenance()
    if not isinstance(adapter, OftAdapter):
        adapter = read_adapter(adapter, peft_release=peft_release, base_shapes=shapes)
    source = {
        "path": str(Path(adapter.path).absolute()),
        "sha256": sha256_file(adapter.weights_path),
        "release": RELEASES[adapter.release],
        "release_source": adapter.release_source,
        "rotation_map": adapter.rotation_map.describe(),
        "base_model_name_or_path": adapter.base_model,
    }
    return adapter, source


def fold_adapter(
    adapter: str | os.PathLike[str] | OftAdapter | MergeResult,
    base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    *,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    peft_release: str | None = None,
    dry_run: bool = False,
    hash_base: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    threads: int | None = 1,
    progress: Callable[[int, int, str], None] | None = None,
) -> FoldResult:
    """Fold ``adapter`` into the model in directory ``base`` and write a full model to ``out_dir``.

    Args:
        adapter: an adapter directory (any PEFT release), an
            :class:`~oftmerge.formats.OftAdapter`, or a
            :class:`~oftmerge.ops.merge.MergeResult` (its ``saved_to`` is set to ``out_dir``).
        base: a ``transformers`` model directory (safetensors, sharded or not, or ``.bin``).
        out_dir: the output directory, written atomically; may be None in a dry run.
        shard_size: largest shard, ``"5GB"`` style or bytes (``transformers``' default 5GB).
            Weights keep their dtype whatever the shard size.
        overwrite: replace an existing ``out_dir`` (never the base).
        peft_release: override the detected PEFT release of the adapter.
        dry_run: read shapes only; report what would be written; write nothing.
        hash_base: record the SHA-256 of the base's weight files in the
            provenance (reads the base once more); by default a fingerprint of
            its tensor names, dtypes and shapes is recorded.
        push_to_hub: a Hub repo id: upload the folded directory there afterwards
            (:func:`oftmerge.integrations.hub.push_folder`; needs ``huggingface_hub`` and a login).
        private: create the Hub repository as private.
        threads: torch threads for the fold (restored afterwards; None leaves torch's setting).
            The fold is many small batched products while a reader and a writer
            thread keep the disk busy; one torch thread was fastest on a 2-core
            machine, and several times faster than two when the machine is busy.
            Raise it on many-core machines.
        progress: called as ``progress(done, total, module)`` after each folded module.
    """
    base = Path(base)
    ckpt = Checkpoint(base)
    shapes = ckpt.shapes()
    tied = tied_embeddings(base, ckpt)
    if tied is not None and tied[1] not in shapes:  # a tied lm_head is the input embedding
        shapes[tied[1]] = shapes[tied[0]]
    with tempfile.TemporaryDirectory(prefix="oftmerge-fold-") as tmp:
        read, source = _as_adapter(adapter, shapes, peft_release, Path(tmp))
        modules = {name: _base_key(name, ckpt) for name in read.modules}
        result = _plan(read, ckpt, base, modules, source, shard_size, hash_base, dry_run)
        if dry_run:
            return result
        if out_dir is None:
            raise OftMergeError("give an output directory (out_dir / -o) or use dry_run=True")
        by_key = {key: name for name, key in modules.items()}
        done: list[str] = []

        def fold_one(key: str, weight: torch.Tensor) -> torch.Tensor:
            name = by_key[key]
            spec = read.modules[name]
            folded = fold_weight(weight, adapter_rotation(read, name), spec, scale=read.scale(name))
            if not all_finite(folded):
                raise NumericalError(f"module {name!r}: the folded weight {key} is not finite; nothing was written")
            if progress is not None:
                progress(len(done) + 1, len(modules), name)
                done.append(name)
            return folded

        config_updates = {"tie_word_embeddings": False} if result.untied else None
        prov = result.provenance()
        extra = {
            "oftmerge.json": json.dumps(prov, indent=2, sort_keys=True) + "\n",
            "README.md": folded_model_card(result),
        }
        group = distributed.current()  # several processes (accelerate launch): each writes its share of the shards
        write = write_model if group is None else functools.partial(distributed.write_model, group=group)
        with torch_threads(threads):
            result.out_dir = write(
                base, out_dir, fold_one, shard_size=shard_size, overwrite=overwrite, extra_files=extra,
                only=by_key.__contains__, untie=_added(result.untied, ckpt), config_updates=config_updates,
            )  # fmt: skip
    if isinstance(adapter, MergeResult):
        adapter.saved_to = result.out_dir
    if push_to_hub and distributed.is_main():
        result.pushed = push_folder(result.out_dir, push_to_hub, private=private)
    return result


def _plan(
    read: OftAdapter,
    ckpt: Checkpoint,
    base: Path,
    modules: dict[str, str],
    source: dict[str, Any],
    shard_size: int | str,
    hash_base: bool,
    dry_run: bool,
) -> FoldResult:
    warnings: list[str] = []
    tied = tied_embeddings(base, ckpt)
    untied = tied if tied is not None and set(tied) & set(modules.values()) else None
    if untied is not None:
        rotated = ", ".join(sorted(set(untied) & set(modules.values())))
        warnings.append(
            f"the base ties {untied[1]} to {untied[0]} and the adapter rotates {rotated}: the folded model stores "
            f"{untied[1]} separately (tie_word_embeddings=false), so that it computes what the adapted model "
            "computes (PEFT's in-place merge_and_unload would rotate both tied matrices)"
        )
        if distributed.is_main():  # one process of a distributed run says it
            log.warning(warnings[-1])
    for name, key in modules.items():
        if key not in ckpt and (untied is None or key != untied[1]):
            raise IncompatibleAdaptersError(
                f"module {name!r}: the base model {base} stores no {key!r} and does not tie it to an input "
                "embedding; the adapter was trained on another model"
            )
    shards = plan_model(ckpt, shard_size, untie=_added(untied, ckpt))
    return FoldResult(
        base=base,
        source=source,
        modules=modules,
        base_info=_describe_base(base, ckpt, hash_base and not dry_run),
        untied=untied,
        shards=[[t.name for t in s] for s in shards],
        total_bytes=sum(t.nbytes for s in shards for t in s),
        shard_size=shard_size,
        warnings=warnings,
        dry_run=dry_run,
    )


def _added(untied: tuple[str, str] | None, ckpt: Checkpoint) -> tuple[str, str] | None:
    """The ``untie`` argument of :func:`write_model`: only when the output embedding is not stored."""
    return untied if untied is not None and untied[1] not in ckpt else None
