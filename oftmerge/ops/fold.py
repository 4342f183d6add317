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

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.config import FoldConfig, RunOptions
from oftmerge.engine.distributed import is_main
from oftmerge.engine.model import report_progress, write_model
from oftmerge.engine.threads import torch_threads
from oftmerge.errors import HubError, NumericalError, OftMergeError
from oftmerge.formats.peft_oft import OftAdapter
from oftmerge.formats.sources import ResolvedSource, describe_record
from oftmerge.integrations.cards import folded_model_card
from oftmerge.integrations.hub import push_folder
from oftmerge.kernels.fold import adapter_rotation, all_finite, cast_checked, fold_weight
from oftmerge.plan.fold import FoldPlan, fold_base, head_dtype, plan_fold
from oftmerge.provenance import library_versions

__all__ = ["FoldResult", "fold_adapter", "run_fold"]

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
    #: saved tensor of the adapter (head, bias) -> the base tensor it replaced
    saved: dict[str, str] = field(default_factory=dict)

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
            **({"saved_tensors": dict(self.saved)} if self.saved else {}),
        }

    def summary(self, max_modules: int = 12) -> str:
        src = self.source
        what = describe_record(src["path"], src.get("hub")) if src.get("path") else f"merge of {len(src.get('inputs', []))} adapters ({src.get('method')})"
        lines = [f"fold: {what} into {describe_record(str(self.base), self.base_info.get('hub'))}"]
        lines.append(
            f"output: {len(self.modules)} weights folded, "
            + (f"{len(self.saved)} replaced by the adapter's saved tensors (heads, biases), " if self.saved else "")
            + f"{sum(len(s) for s in self.shards) - len(self.modules) - len(self.saved)} tensors "
            f"copied as they are, {len(self.shards)} shard(s), {self.total_bytes / 1e6:.2f} MB"
        )
        for name, key in list(self.modules.items())[:max_modules]:
            lines.append(f"  {name[-56:]:<56} -> {key}")
        if len(self.modules) > max_modules:
            lines.append(f"  ... {len(self.modules) - max_modules} more modules")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def fold_adapter(
    adapter: str | os.PathLike[str] | OftAdapter | Any,
    base: str | os.PathLike[str] | ResolvedSource | None = None,
    out_dir: str | os.PathLike[str] | None = None,
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
    run: RunOptions | None = None,
) -> FoldResult:
    """Fold ``adapter`` into the model in directory ``base`` and write a full model to ``out_dir``.

    Args:
        adapter: an adapter directory (any PEFT release) or Hub id (``ns/name[@revision]``), an
            :class:`~oftmerge.formats.OftAdapter`, a
            :class:`~oftmerge.MergeResult` (its ``saved_to`` is set to ``out_dir``), or a whole
            :class:`~oftmerge.config.FoldConfig` (then ``base`` ... ``private`` are not used).
        base: a ``transformers`` model directory (safetensors, sharded or not, or ``.bin``) or a Hub id
            (``ns/name[@revision]``); when None, the base the adapter's config names
            (``base_model_name_or_path``: a directory, or a Hub id, downloaded if need be).
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
            thread keep the disk busy, so one thread is the default; raise it on
            many-core machines.
        progress: called as ``progress(done, total, module)`` after each folded module (with ``nbytes=`` the
            bytes of its folded weight, when the callback takes that keyword).
        run: a :class:`~oftmerge.config.RunOptions`; when given, ``shard_size``, ``overwrite``,
            ``dry_run``, ``threads`` and ``progress`` are not used.
    """
    if isinstance(adapter, FoldConfig):
        config = adapter
    else:
        if base is None:  # the base the adapter's config names (base_model_name_or_path)
            adapter, base = fold_base(adapter)
        config = FoldConfig(adapter, base, peft_release=peft_release, hash_base=hash_base, push_to_hub=push_to_hub, private=private)  # type: ignore[arg-type]
    if run is None:
        run = RunOptions(threads=threads, shard_size=shard_size, overwrite=overwrite, dry_run=dry_run, progress=progress)
    return run_fold(config, run, out_dir)


def _recipe(config: FoldConfig, run: RunOptions) -> str | None:
    """The ``oftmerge.yaml`` of a fold: the merge's recipe for a merge folded into its base, else the fold's (None for an adapter object)."""
    from oftmerge.ops.recipe import recipe_for

    recipe = getattr(config.adapter, "recipe", None)
    if recipe is not None:
        return str(recipe)
    if isinstance(config.adapter, (str, os.PathLike)) and isinstance(config.base, (str, os.PathLike)):
        return recipe_for("fold", config, run).to_yaml()
    return None


def run_fold(config: FoldConfig, run: RunOptions, out_dir: str | os.PathLike[str] | None = None) -> FoldResult:
    """Plan and execute ``config``, writing the folded model to ``out_dir``."""
    plan = plan_fold(config, run.shard_size, dry_run=run.dry_run)
    if is_main():  # one process of a distributed run says it
        for w in plan.warnings:
            log.warning(w)
    result = FoldResult(
        base=plan.base,
        source=dict(plan.source),
        modules=dict(plan.modules),
        base_info=dict(plan.base_info),
        untied=plan.untied,
        shards=[[t.name for t in s] for s in plan.shards],
        total_bytes=sum(t.nbytes for s in plan.shards for t in s),
        shard_size=run.shard_size,
        warnings=list(plan.warnings),
        dry_run=run.dry_run,
        saved=dict(plan.saved),
    )
    if run.dry_run:
        return result
    if out_dir is None:
        raise OftMergeError("give an output directory (out_dir / -o) or use dry_run=True")
    extra = {
        "oftmerge.json": json.dumps(result.provenance(), indent=2, sort_keys=True) + "\n",
        "README.md": folded_model_card(result),
    }
    if (recipe := _recipe(config, run)) is not None:
        extra["oftmerge.yaml"] = recipe
    by_key = _folds(plan)
    with torch_threads(run.threads):
        result.out_dir = write_model(
            plan.base, out_dir, _folder(plan, by_key, run), shard_size=run.shard_size, overwrite=run.overwrite, extra_files=extra,
            only=by_key.__contains__, untie=plan.untie, inputs=plan.inputs,
            config_updates={**({"tie_word_embeddings": False} if plan.untied else {}), **plan.config_updates} or None,
            replace=_resized(plan), drop=plan.dropped,
        )  # fmt: skip
    if hasattr(config.adapter, "saved_to"):  # a MergeResult
        config.adapter.saved_to = result.out_dir
    if config.push_to_hub and is_main():
        try:
            result.pushed = push_folder(result.out_dir, config.push_to_hub, private=config.private)
        except OftMergeError as exc:  # the fold is done: keep it, and say how to push it later
            raise HubError(
                f"the folded model is complete in {result.out_dir}, but it was not pushed: {exc}; push it later with "
                f"`oftmerge push {result.out_dir} {config.push_to_hub}" + (" --private`" if config.private else "`")
            ) from exc
    return result


def _folds(plan: FoldPlan) -> dict[str, str]:
    """base tensor -> the module folded into it, or the saved tensor (head, bias) that replaces it (same shape)."""
    saved = {key: name for name, key in plan.saved.items() if key not in plan.resized}
    return {**saved, **{key: name for name, key in plan.modules.items()}}


def _resized(plan: FoldPlan) -> dict[str, torch.Tensor]:
    """The head tensors written with their own shape (another number of labels, or a head the base lacks)."""
    read = plan.adapter
    return {
        key: cast_checked(read.saved_tensor(name), head_dtype(read, plan.checkpoint, plan.saved, name), f"saved tensor {name!r}")
        for name, key in plan.saved.items() if key in plan.resized
    }  # fmt: skip


def _folder(plan: FoldPlan, by_key: dict[str, str], run: RunOptions) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The writer's ``tensor_fn``: fold one base weight (``by_key``: base tensor -> module) with the adapter's rotation, checked."""
    read = plan.adapter
    done = [0]
    progress = report_progress(run.progress)

    def fold_one(key: str, weight: torch.Tensor) -> torch.Tensor:
        name = by_key[key]
        if name not in read.modules:  # a saved head or bias replaces the base's, cast as PEFT's load does
            return cast_checked(read.saved_tensor(name), weight.dtype, f"saved tensor {name!r}")
        folded = fold_weight(weight, adapter_rotation(read, name), read.modules[name], scale=read.scale(name))
        if not all_finite(folded):
            raise NumericalError(
                f"module {name!r}: the folded weight {key} is not finite in {str(weight.dtype).removeprefix('torch.')}, the base "
                "weight's dtype (the rotation or the base weight is too large for it); nothing was written"
            )
        done[0] += 1
        if progress is not None:
            progress(done[0], len(plan.modules), name, folded.nbytes)
        return folded

    return fold_one
