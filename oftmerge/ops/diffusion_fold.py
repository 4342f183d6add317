"""Fold a diffusion OFT file (LyCORIS, kohya sd-scripts, OneTrainer) into a ``diffusers`` model or pipeline.

>>> from oftmerge.ops.diffusion_fold import fold_diffusion
>>> fold_diffusion("style.safetensors", "sdxl-base", "sdxl-style")              # doctest: +SKIP
>>> fold_diffusion("style.safetensors", "sdxl-base/unet", "unet-style")         # doctest: +SKIP
>>> print(fold_diffusion(merged, "sd15", None, dry_run=True).summary())         # doctest: +SKIP

``base`` is a pipeline directory (``model_index.json`` with ``unet/`` or ``transformer/``,
``text_encoder/``, ``text_encoder_2/``, ...) or one model directory of it (a diffusers
``unet/`` / ``transformer/``, or a ``transformers`` text encoder). The output has the same
layout: every file and folder of the base is copied byte for byte, except the weights of the
adapted components, which :func:`~oftmerge.engine.model.write_model` streams one tensor at a time
(the same file names, sharded as ``shard_size`` says). ``oftmerge.json`` records the provenance.

Each module is folded exactly as the tool that wrote the file applies it at multiplier 1
(:mod:`oftmerge.formats.diffusion`): ``W' = rescale * (D^T W)`` on the output rows for LyCORIS and
kohya (``W D^T`` on the input columns for OneTrainer), ``D`` the block-diagonal rotation of the
module's effective generator, bias untouched (neither LyCORIS nor sd-scripts rotates it).

Module names, from the tools' own conventions (no hand-written tables):

* ``lora_unet_X`` -> the pipeline's denoiser (``unet``, else ``transformer``); ``lora_te_X`` /
  ``lora_te1_X`` -> ``text_encoder``; ``lora_te2_X`` -> ``text_encoder_2``; ``lycoris_X`` -> the
  model directory given (the denoiser of a pipeline).
* ``X`` is the module path with ``.`` replaced by ``_`` (LyCORIS and sd-scripts build names as
  ``prefix + name.replace('.', '_')``): it is matched against the component's weights (the loaded
  model's names and the checkpoint's keys), and must match exactly one. ``transformers`` 5's flat
  ``CLIPTextModel`` drops the ``text_model.`` prefix older files keep; as diffusers' LoRA loader
  does, it is dropped (or added) when that alone makes the name match.
* Denoiser names in LDM/SGM layout (kohya's SDXL files: ``lora_unet_input_blocks_4_1_..._attn1_to_q``,
  ``middle_block``, ``output_blocks``, ``time_embed``, ``label_emb``, ``out_2``) are mapped by
  diffusers' own LoRA conversion (``_maybe_map_sgm_blocks_to_diffusers``,
  ``_convert_non_diffusers_lora_to_diffusers``, ``convert_unet_state_dict_to_peft``), fed one
  fake LoRA pair per module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine.commit import output_directory
from oftmerge.engine.distributed import LOCAL, current
from oftmerge.engine.guard import check_output, check_replaceable
from oftmerge.engine.model import report_progress, write_model
from oftmerge.engine.threads import torch_threads
from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, OftMergeError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.diffusers_names import resolve_modules
from oftmerge.formats.diffusion import DiffusionAdapter, component_of, read_diffusion_adapter
from oftmerge.formats.io import read_json, sha256_file
from oftmerge.formats.shards import is_weight_file, plan_model
from oftmerge.formats.sources import resolve_source, source_record
from oftmerge.kernels.fold import cast_checked, fold_rescaled
from oftmerge.ops.fold import FoldResult
from oftmerge.plan.fold import describe_base
from oftmerge.provenance import LIBRARIES, library_versions

__all__ = ["DiffusionFoldResult", "fold_diffusion"]

log = logging.getLogger(__name__)

#: the denoiser folders of a pipeline, in the order they are looked for
DENOISERS = ("unet", "transformer")


@dataclass
class DiffusionFoldResult(FoldResult):
    """What :func:`fold_diffusion` wrote (or, in a dry run, would write).

    ``modules`` maps each canonical module name to the tensor it folds into, prefixed with its
    component's folder in a pipeline (``unet/down_blocks.0.attentions.0.proj_in.weight``);
    ``shards`` lists the written components' tensors the same way.
    """

    layout: str = "model"  #: ``"pipeline"`` or ``"model"``
    components: dict[str, str] = field(default_factory=dict)  #: folder written ("" for a model directory) -> its class
    copied: list[str] = field(default_factory=list)  #: top-level entries of a pipeline copied as they are

    def provenance(self) -> dict[str, Any]:
        return {
            "tool": "oftmerge",
            "kind": f"folded diffusion {self.layout}",
            "versions": library_versions((*LIBRARIES, "diffusers")),
            "base": self.base_info,
            "source": self.source,
            "components": dict(self.components),
            "modules": dict(self.modules),
            "warnings": list(self.warnings),
        }

    def summary(self, max_modules: int = 12) -> str:
        lines = super().summary(max_modules).split("\n")
        folders = ", ".join(f"{c or '.'} ({cls})" for c, cls in self.components.items())
        lines.insert(1, f"{self.layout}: folds into {folders}" + (f"; copies {len(self.copied)} other entries as they are" if self.copied else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Component:
    folder: str  #: relative to the base ("" for a model directory)
    path: Path
    checkpoint: Checkpoint
    modules: Mapping[str, str]  #: canonical module name -> checkpoint key of its weight


def fold_diffusion(
    adapter: str | os.PathLike[str] | DiffusionAdapter,
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    shard_size: int | str = "5GB",
    dry_run: bool = False,
    threads: int | None = 1,
    progress: Callable[[int, int, str], None] | None = None,
    source: Mapping[str, Any] | None = None,
) -> DiffusionFoldResult:
    """Fold diffusion OFT ``adapter`` into ``base`` and write the result to ``out`` (see the module docstring).

    Args:
        adapter: a ``.safetensors`` diffusion OFT file (format detected) or a
            :class:`~oftmerge.formats.diffusion.DiffusionAdapter` (a merge in memory).
        base: a diffusers pipeline directory (``model_index.json``) or one model directory
            (a diffusers ``unet``/``transformer``, or a text encoder); a model's Hub id is downloaded
            (a pipeline's is not: download it first).
        out: the output directory (written atomically); may be None in a dry run.
        overwrite: replace an existing ``out`` that is an earlier output (never an input).
        shard_size: largest shard of each written component, ``"5GB"`` style or bytes.
        dry_run: resolve modules and plan shards from headers only; write nothing.
        threads: torch threads for the fold (None leaves torch's setting).
        progress: ``progress(done, total, module)`` after each folded module (with ``nbytes=`` the bytes of
            its folded weight, when the callback takes that keyword).
        source: the provenance record of ``adapter`` (a merge's inputs and method); by default
            the file's path, SHA-256, format and algorithm.
    """
    read = adapter if isinstance(adapter, DiffusionAdapter) else read_diffusion_adapter(adapter)
    base_source = resolve_source(base, "base model")
    root = base_source.path
    if base_source.is_hub and (root / "model_index.json").is_file():  # the Hub download takes a repository's top-level files only
        raise OftMergeError(
            f"{base}: is a diffusers pipeline on the Hub, and oftmerge downloads only a repository's top-level files; download it "
            f"(hf download {base_source.repo_id} --local-dir DIR) and pass DIR, or pass one model folder of it"
        )
    layout, components = _plan(read, root)
    record = dict(source) if source is not None else _source_record(read)
    warnings = list(read.notes) + [w for c in components if (w := _left_out(c)) is not None]
    shards = {c.folder: plan_model(c.checkpoint, shard_size) for c in components}
    result = DiffusionFoldResult(
        base=root,
        source=record,
        modules={name: _prefixed(c.folder, key) for c in components for name, key in c.modules.items()},
        base_info=_base_info(root, layout, components, source_record(base_source)),
        untied=None,
        shards=[[_prefixed(c, t.name) for t in s] for c, plan in shards.items() for s in plan],
        total_bytes=sum(t.nbytes for plan in shards.values() for s in plan for t in s),
        shard_size=shard_size,
        warnings=warnings,
        dry_run=dry_run,
        layout=layout,
        components={c.folder: _class_name(c.checkpoint) for c in components},
        copied=_copied_entries(root, components) if layout == "pipeline" else [],
    )
    for w in warnings:
        log.warning(w)
    if dry_run:
        return result
    if out is None:
        raise OftMergeError("give an output directory (out / -o) or use dry_run=True")
    inputs = [("the base model", root)] + ([("the adapter", read.path)] if read.path.is_file() else [])
    provenance = json.dumps(result.provenance(), indent=2, sort_keys=True) + "\n"
    folder = _folder(read, components, progress)
    with torch_threads(threads):
        if layout == "model":
            (comp,) = components
            result.out_dir = write_model(
                root, out, folder(comp), shard_size=shard_size, overwrite=overwrite, only=comp.modules.values(),
                extra_files={"oftmerge.json": provenance}, inputs=inputs,
            )  # fmt: skip
            return result
        if (group := current()) is not None and group.size > 1:
            raise OftMergeError(f"a pipeline is folded by one process (this is process {group.rank} of {group.size}); run it without a launcher")
        target = check_output(out, inputs)
        if overwrite:
            check_replaceable(target)
        with output_directory(target, overwrite=overwrite, inputs=inputs) as tmp:
            for name in result.copied:
                _copy_entry(root / name, tmp / name)
            for comp in components:
                write_model(comp.path, tmp / comp.folder, folder(comp), shard_size=shard_size, only=comp.modules.values(), inputs=inputs, group=LOCAL)
            (tmp / "oftmerge.json").write_text(provenance, encoding="utf-8")
        result.out_dir = target
    return result


TensorFn = Callable[[str, torch.Tensor], torch.Tensor]


def _prefixed(folder: str, name: str) -> str:
    """A tensor's name in the output: ``unet/conv_in.weight`` in a pipeline, ``conv_in.weight`` in a model directory."""
    return f"{folder}/{name}" if folder else name


def _folder(read: DiffusionAdapter, components: Sequence[_Component], progress: Callable[[int, int, str], None] | None) -> Callable[[_Component], TensorFn]:
    """``write_model``'s ``tensor_fn`` for one component: fold the weight of the module it belongs to."""
    total = sum(len(c.modules) for c in components)
    done = [0]
    report = report_progress(progress)

    def for_component(comp: _Component) -> TensorFn:
        by_key = {key: name for name, key in comp.modules.items()}
        where = f"{comp.folder}/" if comp.folder else ""

        def fold_one(key: str, weight: torch.Tensor) -> torch.Tensor:
            name = by_key[key]
            rotation = read.fold_rotation(name, weight)
            compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
            folded = fold_rescaled(weight.to(compute), rotation, read.modules[name].spec(read.side), read.rescale(name))
            out = cast_checked(folded, weight.dtype, f"module {name!r}: the folded weight {where}{key}")
            done[0] += 1
            if report is not None:
                report(done[0], total, name, out.nbytes)
            return out

        return fold_one

    return for_component


# -- planning: components and module names -----------------------------------------------------------


def _plan(read: DiffusionAdapter, root: Path) -> tuple[str, list[_Component]]:
    """The base's layout and, per component the file adapts, its module -> weight key map (checked)."""
    by_component: dict[str, list[str]] = {}
    for name in read.modules:
        by_component.setdefault(component_of(name)[0], []).append(name)
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json")
        present = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and (root / k).is_dir()]
        denoiser = next((d for d in DENOISERS if d in present), None)
        folders: dict[str, list[str]] = {}
        for component, names in sorted(by_component.items()):
            folder = denoiser if component in ("unet", "model") else component
            if folder is None or folder not in present:
                raise IncompatibleAdaptersError(
                    f"{read.describe()}: {len(names)} module(s) adapt the {_what(component)} (e.g. {names[0]!r}), but the pipeline {root} has "
                    f"no {folder or ' or '.join(DENOISERS)} folder (it has {', '.join(present) or 'none'}); fold into the pipeline it was trained on"
                )
            folders.setdefault(folder, []).extend(names)
        return "pipeline", [_component(read, root, folder, names, denoiser=folder == denoiser) for folder, names in sorted(folders.items())]
    if not (root / "config.json").is_file():
        raise AdapterFormatError(
            f"{root}: neither a diffusers pipeline (model_index.json) nor a model directory (config.json and weights); "
            "give the pipeline's directory or one of its model folders (unet, transformer, text_encoder)"
        )
    ckpt = Checkpoint(root)
    kinds = sorted(c for c in by_component if c != "model")
    allowed = {"unet"} if ckpt.is_diffusers else {"text_encoder", "text_encoder_2"}
    if len(kinds) > 1 or (kinds and kinds[0] not in allowed):
        what = "a diffusers " + str((ckpt.config or {}).get("_class_name", "model")) if ckpt.is_diffusers else "a text encoder"
        raise IncompatibleAdaptersError(
            f"{read.describe()}: adapts {', '.join(_what(k) for k in kinds)}, but {root} is {what}, one model; fold into the pipeline "
            "directory (the folder with model_index.json) to fold every component at once"
        )
    return "model", [_component(read, root, "", list(read.modules), denoiser=ckpt.is_diffusers, checkpoint=ckpt)]


def _what(component: str) -> str:
    return {"unet": "denoiser (lora_unet_)", "model": "model (lycoris_)"}.get(component, component)


def _component(read: DiffusionAdapter, root: Path, folder: str, names: Sequence[str], *, denoiser: bool, checkpoint: Checkpoint | None = None) -> _Component:
    path = root / folder if folder else root
    ckpt = checkpoint or Checkpoint(path)
    modules = resolve_modules([component_of(n)[1] for n in names], ckpt, denoiser=denoiser, labels=names, where=read.describe())
    named = dict(zip(names, modules))
    seen: dict[str, str] = {}
    for name, key in named.items():
        if key in seen:
            raise IncompatibleAdaptersError(
                f"{read.describe()}: modules {seen[key]!r} and {name!r} both name {path}'s {key} (two spellings of one module); "
                "the tools would apply one of them, so the file has no single meaning: remove one"
            )
        seen[key] = name
        _check_shape(read, name, ckpt, key, path)
    return _Component(folder, path, ckpt, named)


def _check_shape(read: DiffusionAdapter, name: str, ckpt: Checkpoint, key: str, path: Path) -> None:
    shape = tuple(ckpt.shape(key))
    mod = read.modules[name]
    if len(shape) < 2:
        raise IncompatibleAdaptersError(f"module {name!r}: {path}'s {key} has shape {list(shape)}; OFT folds into a Linear or Conv weight (out, in, ...)")
    width = shape[0] if read.side == "output" else math.prod(shape[1:])
    if mod.features != width:
        axis = "output rows" if read.side == "output" else "input columns (in * kh * kw)"
        raise IncompatibleAdaptersError(
            f"module {name!r}: rotates {mod.features} {axis}, but {path}'s {key} has shape {list(shape)} ({width}); "
            "the file was trained on another model"
        )


# -- output -------------------------------------------------------------------------------------------


def _class_name(ckpt: Checkpoint) -> str:
    config = ckpt.config or {}
    return str(config.get("_class_name") or (config.get("architectures") or ["?"])[0])


def _left_out(comp: _Component) -> str | None:
    """The warning for what of a written component the output leaves out (a ``.fp16`` variant's weights, subfolders), or None.

    The writer copies the folder's non-weight files only (:func:`~oftmerge.formats.shards.copy_model_files`): another
    weight file holds the base's unrotated weights, which a loader asking for that variant would load.
    """
    ckpt = comp.checkpoint
    own = {*ckpt.shards, *([ckpt.index_file.name] if ckpt.index_file is not None else [])}
    entries = sorted(comp.path.iterdir())
    other = [p.name for p in entries if p.is_file() and is_weight_file(p.name) and p.name not in own]
    folders = [p.name + "/" for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not other and not folders:
        return None
    shown = other + folders
    return (
        f"{comp.path}: {', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''} not written to the output: "
        + ("weight files other than the folded ones hold the base's unrotated weights (a variant such as .fp16, or another format)" if other else "")
        + ("; " if other and folders else "")
        + ("subfolders of a model folder are not copied" if folders else "")
    )


def _copied_entries(root: Path, components: Sequence[_Component]) -> list[str]:
    """Top-level entries of a pipeline copied as they are: all but the written components (and hidden files)."""
    written = {c.folder for c in components}
    return sorted(p.name for p in root.iterdir() if p.name not in written and not p.name.startswith("."))


def _copy_entry(src: Path, dst: Path) -> None:
    """Copy a file or a folder byte for byte (links followed: a Hub snapshot's files are links to its blobs)."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(".*"))
    else:
        shutil.copyfile(src, dst)


def _source_record(read: DiffusionAdapter) -> dict[str, Any]:
    path = Path(read.path)
    return {
        "path": str(path.absolute()),
        **({"sha256": sha256_file(path)} if path.is_file() else {"content_sha256": read.content_hash()}),
        "format": read.format,
        "algo": read.algo,
        "side": read.side,
        "rotation_map": read.rotation_map.describe(),
    }


def _base_info(root: Path, layout: str, components: Sequence[_Component], hub: Mapping[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(root.absolute()), "layout": layout}
    if layout == "pipeline":
        index = read_json(root / "model_index.json")
        info["class_name"] = index.get("_class_name")
        info["components"] = {c.folder: describe_base(c.path, c.checkpoint, False) for c in components}
    else:
        info.update(describe_base(root, components[0].checkpoint, False))
    if hub:
        info["hub"] = dict(hub)
    return info
