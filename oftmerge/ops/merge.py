"""Merge several OFT adapters into one: plan, per-module kernel, streaming execution, the result.

:func:`merge_adapters` builds a :class:`~oftmerge.config.MergeConfig` (or takes one), plans the
merge with :func:`oftmerge.plan.merge.plan_merge` (modules, block grid, layout, rotation map,
output config), and streams module by module through
:func:`oftmerge.kernels.merge.merge_module`: the next modules' generators are decoded in a reader
thread and each merged rotation is checked in a thread of its own while the next module merges.
Under ``accelerate launch`` each process merges its share of the modules and the results are
gathered in plan order. The merged adapter is then saved, or folded into the base.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from oftmerge.config import MergeConfig, RunOptions
from oftmerge.engine.distributed import Group, is_main, process_group
from oftmerge.engine.model import report_progress
from oftmerge.engine.threads import OneThread, Prefetch, torch_threads
from oftmerge.errors import IncompatibleAdaptersError, NumericalError
from oftmerge.formats.peft_oft import OftAdapter, saved_key
from oftmerge.formats.sources import source_record
from oftmerge.formats.writer import pack_module
from oftmerge.kernels.merge import merge_module
from oftmerge.linalg import RotationMap, coft_project, orthogonality_error, unpack_skew
from oftmerge.ops.merge_result import InputInfo, MergeResult, ModuleReport
from oftmerge.plan.merge import MergePlan, ModulePlan, merged_scale, plan_merge
from oftmerge.plan.saved import saved_values

__all__ = ["MergeResult", "ModuleReport", "merge_adapters", "quiet_merge_log", "run_merge"]

log = logging.getLogger(__name__)

#: A Neumann-series rotation with ||R^T R - I||_F above this (worst block) gets a warning.
NEUMANN_ORTHO_WARN = 1e-2
#: modules whose generators are decoded ahead of the one being merged
PREFETCH = 2

AdapterLike = str | os.PathLike[str] | OftAdapter


@contextlib.contextmanager
def quiet_merge_log() -> Iterator[None]:
    """Silence this module's warning log lines, for callers that print ``MergeResult.warnings`` themselves."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def merge_adapters(
    adapters: Sequence[AdapterLike] | MergeConfig,
    *,
    method: str = "orthomerge",
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    cayley: str = "auto",
    method_options: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    base: str | os.PathLike[str] | None = None,
    peft_release: str | Sequence[str | None] | None = None,
    allow_base_mismatch: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    output: str = "adapter",
    shard_size: int | str = "5GB",
    threads: int | None = 1,
    saved_modules: str = "identical",
    run: RunOptions | None = None,
) -> MergeResult:
    """Merge OFT adapters into one OFT adapter, module by module, in so(b).

    Args:
        adapters: adapter directories (as written by PEFT's ``save_pretrained``)
            or already-read :class:`~oftmerge.formats.OftAdapter` objects; or a whole
            :class:`~oftmerge.config.MergeConfig`, in which case the keyword arguments that
            describe the merge (``method`` ... ``output``) are not used.
        method: a registered merge method (``oftmerge.available_methods()``):
            ``orthomerge`` (default), ``mean_q``, ``mean_r``, ``sequential``, ``karcher``.
        weights: one per adapter. For every method but ``sequential`` only
            their ratios matter; a negative weight inverts that adapter's
            rotation (task negation). ``sequential`` scales each generator.
        scale: multiplies the merged generator (``alpha``; 1 keeps the
            magnitude the method chose).
        cayley: map of the output: ``auto`` (the inputs' own when they agree,
            else exact), ``exact``, ``neumann`` or ``neumann:N``.
        method_options: the method's own options (see its registry entry).
        out_dir: if given, the merged adapter is written there atomically.
        overwrite: allow replacing an existing ``out_dir`` (never an input).
        base: optional base model directory; its tensor shapes are checked
            against the adapters and give the width of ``block_share`` layers.
        peft_release: override the detected PEFT release (one value for all
            inputs, or one per input), for checkpoints that do not record it.
        allow_base_mismatch: merge adapters whose configs name different
            base models (shapes are still checked).
        dry_run: only plan: read configs and tensor shapes, report what would be
            written, load no generator.
        progress: called as ``progress(done, total, module)`` after each module (with ``nbytes=`` the bytes of
            its merged tensors, when the callback takes that keyword).
        output: ``"adapter"`` writes the merged adapter to ``out_dir``;
            ``"model"`` folds it into ``base`` and writes a full model there
            (:func:`oftmerge.ops.fold.fold_adapter`, shards of ``shard_size``).
        saved_modules: what the output keeps of the non-OFT tensors the inputs saved
            (``modules_to_save`` heads, trained biases): ``identical`` (default: kept when every
            input that saved a tensor saved the same bytes, else an error), ``mean``
            (``|weight|``-weighted), ``first`` (of the inputs, in the order given) or ``drop``
            (the base's are used). See :mod:`oftmerge.plan.saved` and ``docs/saved_modules.md``.
        threads: torch threads for the per-module arithmetic (restored
            afterwards; None leaves torch's setting). The blocks are small
            (``(blocks, b, b)``, b = 32 typically), so one thread is the
            default. Results do not depend on it.
        run: a :class:`~oftmerge.config.RunOptions`; when given, ``overwrite``,
            ``dry_run``, ``progress``, ``shard_size`` and ``threads`` are not used.

    Returns:
        A :class:`MergeResult`: ``.tensors`` and ``.config`` of the merged
        adapter, ``.modules`` (per-module report), ``.summary()``, ``.save()``.

    >>> result = merge_adapters(["adapters/oft-upper", "adapters/oft-reverse"])  # doctest: +SKIP
    >>> result.save("merged")  # doctest: +SKIP
    """
    if isinstance(adapters, MergeConfig):
        config = adapters
    else:
        config = MergeConfig(
            tuple(adapters), method=method, weights=None if weights is None else tuple(weights), scale=scale, cayley=cayley,
            method_options=dict(method_options or {}), base=None if base is None else os.fspath(base),
            peft_release=peft_release if peft_release is None or isinstance(peft_release, str) else tuple(peft_release),
            allow_base_mismatch=allow_base_mismatch, output=output, saved_modules=saved_modules,
        )  # fmt: skip
    if run is None:
        run = RunOptions(threads=threads, shard_size=shard_size, overwrite=overwrite, dry_run=dry_run, progress=progress)
    return run_merge(config, run, out_dir)


def run_merge(config: MergeConfig, run: RunOptions, out_dir: str | os.PathLike[str] | None = None) -> MergeResult:
    """Plan and execute ``config``; save (or fold) to ``out_dir`` when given."""
    plan = plan_merge(config)
    result = MergeResult(
        method=plan.method.name,
        options=dict(plan.options),
        scale=config.scale,
        inputs=[],
        layout=plan.layout,
        rotation_map=plan.rotation_map,
        block_config=plan.blocks,
        config=dict(plan.adapter_config),
        warnings=list(plan.warnings),
        dry_run=run.dry_run,
        saved_modules=config.saved_modules,
        saved={s.name: s.describe([str(a.path) for a in plan.adapters]) for s in plan.saved},
        # the base, unless it is a local directory the user gave (the record of such a merge is as it was)
        base=plan.base.record() if plan.base is not None and (plan.base.defaulted or plan.base.source.is_hub) else None,
        protected=plan.inputs,
    )
    result.plan = plan.grid()
    if run.dry_run:
        for name, shape in plan.output_shapes().items():
            result.tensors[name] = torch.empty(shape, dtype=plan.out_dtype, device="meta")
        result.inputs = _inputs(plan)
        return result
    cancelled, non_orthogonal = _execute(plan, run, result)
    _summarise(plan, result, cancelled, non_orthogonal)
    if out_dir is not None and all(isinstance(a, (str, os.PathLike)) for a in config.adapters):
        from oftmerge.ops.recipe import recipe_for

        result.recipe = recipe_for("merge", config, run).to_yaml()
    if out_dir is not None and config.output == "model":
        from oftmerge.ops.fold import fold_adapter

        assert plan.base is not None
        fold_adapter(result, plan.base.source, out_dir, run=run)  # the base as resolved for the merge, not again
    elif out_dir is not None:
        result.save(out_dir, overwrite=run.overwrite)
    return result


def _inputs(plan: MergePlan) -> list[InputInfo]:
    """The inputs' provenance; waits for the files' SHA-256, hashed while the modules were merged."""
    hashes = plan.file_hashes()
    sources = plan.sources or (None,) * len(plan.adapters)
    return [
        InputInfo(str(a.path), hashes[k], a.release, a.release_source, a.rotation_map.describe(), len(a.modules), w, source_record(src))
        for a, k, w, src in zip(plan.adapters, plan.given_order, plan.weights, sources)
    ]


def _execute(plan: MergePlan, run: RunOptions, result: MergeResult) -> tuple[list[str], list[tuple[str, float]]]:
    """Merge this process's modules into ``result`` (all of them, in plan order, once gathered)."""
    group = process_group()  # a group of one unless launched with several processes (accelerate launch)
    mine = [plan.modules[k] for k in plan.share(group)]
    read, rmap = plan.adapters, plan.rotation_map
    cancelled: list[str] = []
    non_orthogonal: list[tuple[str, float]] = []
    added: dict[str, list[str]] = {}
    reports: dict[str, dict[str, Any]] = {}
    progress = report_progress(run.progress)

    def load(p: ModulePlan) -> list[torch.Tensor]:
        if p.name in plan.packed:
            return [read[i].packed_generator(p.name) for i, _ in p.entries]
        return [read[i].generator(p.name) for i, _ in p.entries]

    with torch_threads(run.threads), group.checked(), Prefetch(load, mine, ahead=PREFETCH) as generators, _Checks() as checks:
        for done, (p, loaded) in enumerate(generators, start=1):
            first_key = len(result.tensors)
            is_packed = p.name in plan.packed
            merged = merge_module(
                p.name, loaded, [s for _, s in p.entries], [read[i].rotation_map.sign for i, _ in p.entries],
                [plan.weights[i] for i, _ in p.entries], plan.method, plan.options, block=plan.blocks.sizes[p.name],
                shared=plan.shared, features=p.features, packed=is_packed, out_sign=rmap.sign, scale=plan.config.scale,
            )  # fmt: skip
            if merged.stats.get("cancelled"):
                cancelled.append(p.name)
            # the rotation PEFT will apply, checked in the checker thread while the next module merges
            radius = p.entries[0][1].coft_radius if plan.coft_eps is not None else None  # PEFT projects the output too
            checks.submit(p.name, rmap, merged.stored, is_packed, radius, wide=plan.out_dtype == torch.float64)
            reports[p.name] = dict(
                name=p.name,
                inputs=tuple(i for i, _ in p.entries),
                input_block_sizes=tuple(s.block_size for _, s in p.entries),
                block_size=plan.blocks.sizes[p.name],
                input_norms=merged.input_norms,
                merged_norm=merged.merged_norm,
                stats=merged.stats,
            )
            scale = merged_scale(read, p, plan.weights) if plan.layout == "0.15" else None
            packed = pack_module(p.name, p.kind, merged.stored, plan.layout, is_packed=is_packed, dtype=plan.out_dtype, scale=scale)
            result.tensors.update(packed)
            _copy_saved_base(plan, p, result.tensors)
            if group.size > 1:  # which tensors are this module's, to gather them in plan order
                added[p.name] = list(result.tensors)[first_key:]
            if progress is not None:
                progress(done, len(plan.modules), p.name, sum(t.nbytes for t in packed.values()))
        for name, ortho in checks.results():
            if not math.isfinite(ortho):
                alone = [str(read[i].path) for i in reports[name]["inputs"]] if len(reports[name]["inputs"]) == 1 else None
                raise _non_finite_rotation(name, rmap, reports[name]["merged_norm"], alone[0] if alone else None)
            result.modules[name] = ModuleReport(**reports[name], ortho_error=ortho)
            if rmap.kind == "neumann" and ortho > NEUMANN_ORTHO_WARN:
                non_orthogonal.append((name, ortho))
    result.inputs = _inputs(plan)
    if group.size > 1:
        _gather_modules(group, plan.modules, result, added, cancelled, non_orthogonal)
    oft_modules = {p.name for p in plan.modules}
    for name, tensor in saved_values(read, plan.weights, plan.saved).items():
        result.tensors[saved_key(name, oft_modules)] = tensor
    return cancelled, non_orthogonal


def _copy_saved_base(plan: MergePlan, p: ModulePlan, tensors: dict[str, torch.Tensor]) -> None:
    """The base-weight copy PEFT saved with the adapters (targeted embeddings), when every input saved the same.

    Inputs that do not adapt ``p`` may hold a copy too (:attr:`~oftmerge.formats.peft_oft.OftAdapter.base_copies`:
    PEFT saves one for every embedding a tuner of the model wraps); it is compared, never written.
    """
    read = plan.adapters
    holders = [i for i, a in enumerate(read) if p.name in a.saved_base or p.name in a.base_copies]
    if not holders:
        return
    copies = [(i, read[i].saved_base_weight(p.name)) for i in holders]
    first = copies[0][1]
    if any(first.shape != t.shape or not torch.equal(first, t) for _, t in copies[1:]):
        raise IncompatibleAdaptersError(
            f"module {p.name!r}: the adapters saved different copies of its base weight "
            f"({', '.join(f'{read[i].path} {list(t.shape)}' for i, t in copies)}); they were trained on different "
            "base models (e.g. resized vocabularies) and cannot be merged"
        )
    written = [(i, t) for i, t in copies if p.name in read[i].saved_base]
    if written:  # only an adapter that adapts the module carries its copy (as PEFT saves it)
        tensors[read[written[0][0]].saved_base[p.name]] = written[0][1]


def _summarise(plan: MergePlan, result: MergeResult, cancelled: list[str], non_orthogonal: list[tuple[str, float]]) -> None:
    """The run's warnings, in the result and (one process of a distributed run) in the log."""
    if cancelled:
        result.warnings.append(
            f"{len(cancelled)} module(s) whose inputs' generators (nearly) cancel ({', '.join(cancelled[:3])}"
            f"{', ...' if len(cancelled) > 3 else ''}): their merged direction is ill-defined, so the plain "
            "weighted mean was used there (finite, small)"
        )
    if non_orthogonal:
        worst = max(non_orthogonal, key=lambda t: t[1])
        result.warnings.append(
            f"{len(non_orthogonal)} module(s) where PEFT's Cayley-Neumann series ({plan.rotation_map.terms} terms) is far "
            f"from a rotation for the merged generator (worst: {worst[0]}, ||R^T R - I||_F = {worst[1]:.3g}); "
            "consider cayley='exact' or a smaller scale"
        )
    if is_main():  # one process of a distributed run says it
        for w in result.warnings:
            log.warning(w)


def _non_finite_rotation(name: str, rmap: RotationMap, merged_norm: float, only_input: str | None) -> NumericalError:
    """The error for a merged module whose rotation (as PEFT computes it) is NaN or infinite.

    ``only_input``: the adapter, when only one input adapts the module (its generator is kept as it is).
    """
    if only_input is not None:
        advice = f"its only input, {only_input}, already has a generator this large (the adapter is broken: re-train or re-export it)"
        advice += ", or use a smaller --scale" if rmap.kind == "exact" else ", or use a smaller --scale or --cayley exact"
    elif rmap.kind == "neumann":
        advice = "use a smaller --scale (or weights), or --cayley exact (a true rotation for any generator)"
    else:
        advice = "use a smaller --scale (or weights); the generator is too large for float32 arithmetic"
    return NumericalError(
        f"module {name!r}: the rotation PEFT would apply ({rmap.describe()}) to the merged generator "
        f"(||Q||_F = {merged_norm:.3g}) is not finite, so the adapter would give NaN outputs; {advice}; nothing was written"
    )


class _Checks(OneThread):
    """``||R^T R - I||_F`` (worst block, float32) of each merged module's rotation, in a thread of its own.

    PEFT's Cayley–Neumann series (or the exact map) on the merged blocks is a few batched
    products per module, as much arithmetic as the merge itself; torch releases the GIL, so
    it overlaps with the next module. Results come back in submission order.
    """

    def __init__(self) -> None:
        super().__init__("oftmerge-check")

    @staticmethod
    def _check(rmap: RotationMap, stored: torch.Tensor, is_packed: bool, coft_radius: float | None, wide: bool = False) -> float:
        """The worst block's error; NaN or inf when the rotation is not finite (the caller refuses it).

        ``wide``: the output stores float64, so a rotation that overflows float32 is computed again in float64.
        """
        blocks_f32 = unpack_skew(stored.float()) if is_packed else stored.float()
        if coft_radius is not None:
            blocks_f32 = coft_project(blocks_f32, coft_radius)
        # a check against a 1e-2 threshold: float32 suffices
        error = float(orthogonality_error(rmap.rotation(blocks_f32)).max())
        if not math.isfinite(error) and wide:
            blocks = unpack_skew(stored) if is_packed else stored
            error = float(orthogonality_error(rmap.rotation(blocks if coft_radius is None else coft_project(blocks, coft_radius))).max())
        return error

    def submit(
        self, name: str, rmap: RotationMap, stored: torch.Tensor, is_packed: bool, coft_radius: float | None = None, *, wide: bool = False
    ) -> None:
        self._pending.append((name, self._pool.submit(self._check, rmap, stored, is_packed, coft_radius, wide)))

    def results(self) -> list[tuple[str, float]]:
        return [(name, future.result()) for name, future in self._pending]


def _gather_modules(
    group: Group,
    plans: Sequence[ModulePlan],
    result: MergeResult,
    added: Mapping[str, list[str]],
    cancelled: list[str],
    non_orthogonal: list[tuple[str, float]],
) -> None:
    """Collect every process's modules and put reports, tensors and warnings back in plan order."""
    ortho = dict(non_orthogonal)
    mine = {
        name: (result.modules[name], {k: result.tensors[k] for k in keys}, name in cancelled, ortho.get(name))
        for name, keys in added.items()
    }
    parts: dict[str, Any] = {}
    for part in group.gather(mine):
        parts.update(part)
    result.modules.clear()
    result.tensors.clear()
    cancelled.clear()
    non_orthogonal.clear()
    for p in plans:
        report, tensors, was_cancelled, error = parts[p.name]
        result.modules[p.name] = report
        result.tensors.update(tensors)
        if was_cancelled:
            cancelled.append(p.name)
        if error is not None:
            non_orthogonal.append((p.name, error))
