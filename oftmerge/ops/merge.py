"""Merge several OFT adapters into one: planning, the per-module merge, and the result.

The public entry point is :func:`merge_adapters`. It reads every input with
:func:`oftmerge.formats.read_adapter`, plans the output (union of modules, a
block grid PEFT can express, the rotation map, the output layout), then
streams module by module: load each input's generator, bring it to the
canonical sign and the output grid, apply the merge method, check it, and
pack it for the output layout.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from oftmerge.engine import distributed
from oftmerge._version import __version__
from oftmerge.errors import IncompatibleAdaptersError, NumericalError, OftMergeError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.io import sha256_file
from oftmerge.formats.peft_oft import KEY_PREFIX, RELEASES, OftAdapter, read_adapter
from oftmerge.formats.writer import BlockConfig, write_adapter_dir
from oftmerge.linalg import RotationMap, pack_skew, unpack_skew
from oftmerge.plan.merge import (
    ModulePlan,
    block_config,
    merged_scale,
    module_norm,
    output_config,
    output_layout,
    peft_version,
    plan_modules,
    resolve_rotation_map,
    to_grid,
)
from oftmerge.methods import MergeMethod, get_method

__all__ = ["MergeResult", "ModuleReport", "merge_adapters", "module_norm", "quiet_merge_log", "resolve_rotation_map", "to_grid"]

log = logging.getLogger(__name__)

_SQRT2 = math.sqrt(2.0)

#: A Neumann-series rotation with ||R^T R - I||_F above this (worst block) gets a warning.
NEUMANN_ORTHO_WARN = 1e-2

AdapterLike = str | os.PathLike[str] | OftAdapter


@dataclass(frozen=True)
class InputInfo:
    path: str
    sha256: str
    release: str
    release_source: str
    rotation_map: str
    modules: int
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module: which inputs, norms, the method's statistics."""

    name: str
    inputs: tuple[int, ...]  #: indices into ``MergeResult.inputs``
    input_block_sizes: tuple[int, ...]
    block_size: int
    input_norms: tuple[float, ...]  #: ||Q_i||_F over the whole module (canonical, effective)
    merged_norm: float
    stats: Mapping[str, Any]
    ortho_error: float  #: worst block ||R^T R - I||_F of the rotation PEFT will apply (float32 check)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["stats"] = dict(self.stats)
        return d


@dataclass
class MergeResult:
    """The merged adapter (in memory) and a report of what the merge did."""

    method: str
    options: dict[str, Any]
    scale: float
    inputs: list[InputInfo]
    layout: str  #: "0.18" (current packed layout), "0.15" or "0.13" (legacy layouts)
    rotation_map: RotationMap
    block_config: BlockConfig | None
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    saved_to: Path | None = None
    #: module -> (input block sizes, output block size), filled by planning (also in a dry run)
    plan: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def provenance(self) -> dict[str, Any]:
        """Everything needed to know how this adapter was made (no timestamps: re-runs give the same bytes)."""
        versions = {"oftmerge": __version__, "torch": torch.__version__.split("+")[0]}
        installed = peft_version()
        if installed is not None:  # peft is optional for the core
            versions["peft"] = installed
        return {
            "tool": "oftmerge",
            "versions": versions,
            "method": self.method,
            "options": self.options,
            "scale": self.scale,
            "rotation_map": self.rotation_map.describe(),
            "layout": RELEASES[self.layout],
            "inputs": [i.to_dict() for i in self.inputs],
            "warnings": self.warnings,
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the merged adapter to ``path`` atomically; refuse to write over an input."""
        if self.dry_run:
            raise OftMergeError("this is a dry-run result: nothing was merged, nothing can be saved")
        target = Path(path).absolute()
        for info in self.inputs:
            src = Path(info.path).absolute()
            if target == src or src.is_relative_to(target):
                raise OftMergeError(
                    f"{target}: the output would replace input adapter {src}; inputs are never modified. "
                    "Choose another output directory."
                )
        prov = self.provenance()
        prov["modules"] = {n: r.to_dict() for n, r in self.modules.items()}
        extra = {"oftmerge.json": (json.dumps(prov, indent=2, sort_keys=True) + "\n").encode()}
        try:
            from oftmerge.integrations.hub import adapter_card

            extra["README.md"] = adapter_card(self).encode()
        except ImportError:  # pragma: no cover
            pass
        distributed.on_main(  # one adapter file: only the main process of a distributed run writes it
            distributed.current(),
            lambda: write_adapter_dir(target, self.tensors, self.config, extra_files=extra, overwrite=overwrite),
        )
        self.saved_to = target
        return target

    def summary(self, max_modules: int = 12) -> str:
        """A human-readable account of the merge (the CLI prints this)."""
        lines = [f"method: {self.method}" + (f" {self.options}" if self.options else "") + (f", scale {self.scale}" if self.scale != 1 else "")]
        for i, info in enumerate(self.inputs):
            lines.append(
                f"  input {i}: {info.path}  (PEFT {RELEASES[info.release]}, {info.rotation_map}, "
                f"{info.modules} modules, weight {info.weight:g})"
            )
        bc = self.block_config
        grid = "" if bc is None else (f", oft_block_size={bc.oft_block_size}" if bc.oft_block_size else f", r={bc.r}")
        lines.append(
            f"output: PEFT {RELEASES[self.layout]} layout, {self.rotation_map.describe()}{grid}, "
            f"{len(self.plan)} modules, {self.output_bytes / 1e6:.2f} MB"
        )
        if self.dry_run:
            lines.append(f"  {'module':<48} {'input block sizes':>18} {'-> b':>5}")
            for name, (sizes, b) in list(self.plan.items())[:max_modules]:
                lines.append(f"  {name[-48:]:<48} {','.join(map(str, sizes)):>18} {b:>5}")
            if len(self.plan) > max_modules:
                lines.append(f"  ... {len(self.plan) - max_modules} more modules")
        if not self.dry_run and self.modules:
            lines.append(f"  {'module':<48} {'inputs':>6} {'b':>4} {'|Q_i| (mean)':>12} {'|Q_merged|':>10} {'c':>7} {'|RtR-I|':>8}")
            reports = list(self.modules.values())
            for r in reports[:max_modules]:
                mean_in = sum(r.input_norms) / len(r.input_norms)
                c = r.stats.get("c")
                lines.append(
                    f"  {r.name[-48:]:<48} {len(r.inputs):>6} {r.block_size:>4} {mean_in:>12.4g} {r.merged_norm:>10.4g} "
                    f"{'' if c is None else f'{c:.3f}':>7} {r.ortho_error:>8.2g}"
                )
            if len(reports) > max_modules:
                lines.append(f"  ... {len(reports) - max_modules} more modules")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


@contextlib.contextmanager
def quiet_merge_log() -> Iterator[None]:
    """Silence this module's warning log lines, for callers that print ``MergeResult.warnings`` themselves."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (restored afterwards); None leaves torch's setting."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _input_hashes(read: Sequence[OftAdapter], need_content: bool) -> tuple[Callable[[], list[str]], list[str | None]]:
    """Content hashes of the inputs (if needed: the canonical order), and a call for their files' SHA-256.

    The content hashes are computed now, by up to 4 threads (hashlib releases the GIL); the
    files' SHA-256 (provenance, not needed before the output is written) go on in those threads
    while the caller merges, and the returned call waits for them. An input that is not a file
    is described by its content hash.
    """

    def content(a: OftAdapter) -> str | None:
        return a.content_hash() if need_content or not a.weights_path.is_file() else None

    pool = ThreadPoolExecutor(min(4, len(read)), "oftmerge-hash")
    try:
        keys = list(pool.map(content, read))
        files = [pool.submit(sha256_file, a.weights_path) if a.weights_path.is_file() else None for a in read]
    finally:
        pool.shutdown(wait=False)

    def file_hashes() -> list[str]:
        return [f.result() if f is not None else k for f, k in zip(files, keys)]  # type: ignore[misc]

    return file_hashes, keys


def _ortho_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return float(torch.linalg.matrix_norm(r.transpose(-2, -1) @ r - eye).max())


def merge_adapters(
    adapters: Sequence[AdapterLike],
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
) -> MergeResult:
    """Merge OFT adapters into one OFT adapter, module by module, in so(b).

    Args:
        adapters: adapter directories (as written by PEFT's ``save_pretrained``)
            or already-read :class:`~oftmerge.formats.OftAdapter` objects.
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
        progress: called as ``progress(done, total, module)`` after each module.
        output: ``"adapter"`` writes the merged adapter to ``out_dir``;
            ``"model"`` folds it into ``base`` and writes a full model there
            (:func:`oftmerge.ops.fold.fold_adapter`, shards of ``shard_size``).
        threads: torch threads for the per-module arithmetic (restored
            afterwards; None leaves torch's setting). The blocks are small
            (``(blocks, b, b)``, b = 32 typically), so a second thread mostly
            waits: on the 2-core benchmark machine one thread was 5x faster than
            two (docs/benchmarks.md). Results do not depend on it.

    Returns:
        A :class:`MergeResult`: ``.tensors`` and ``.config`` of the merged
        adapter, ``.modules`` (per-module report), ``.summary()``, ``.save()``.

    >>> result = merge_adapters(["adapters/oft-upper", "adapters/oft-reverse"])  # doctest: +SKIP
    >>> result.save("merged")  # doctest: +SKIP
    """
    if len(adapters) == 0:
        raise OftMergeError("no adapters given: pass at least one adapter directory")
    if output not in ("adapter", "model") or (output == "model" and base is None):
        raise OftMergeError(f"output={output!r}: use 'adapter', or 'model' together with base=<base model directory>")
    if not math.isfinite(scale):
        raise OftMergeError(f"scale must be a finite number, got {scale!r}")
    releases = list(peft_release) if isinstance(peft_release, (list, tuple)) else [peft_release] * len(adapters)
    if len(releases) != len(adapters):
        raise OftMergeError(f"peft_release: got {len(releases)} values for {len(adapters)} adapters")
    base_shapes = Checkpoint(base).shapes() if base is not None else None
    read = [
        a if isinstance(a, OftAdapter) else read_adapter(a, peft_release=rel, base_shapes=base_shapes)
        for a, rel in zip(adapters, releases)
    ]
    if weights is None:
        weights = [1.0] * len(read)
    weights = [float(w) for w in weights]
    if len(weights) != len(read):
        raise OftMergeError(f"got {len(weights)} weights for {len(read)} adapters; give one weight per adapter")
    for a, w in zip(read, weights):
        if not math.isfinite(w) or w == 0:
            raise OftMergeError(f"weight {w!r} for {a.path}: weights must be finite and non-zero (drop the adapter instead of weight 0)")
    meth: MergeMethod = get_method(method)
    options = meth.resolve_options(dict(method_options or {}))

    file_hashes, keys = _input_hashes(read, need_content=not meth.order_matters)
    order = list(range(len(read)))
    if not meth.order_matters:  # a canonical order makes float sums independent of the order given
        # keys: content hashes, of the tensors, not the file: .bin, safetensors, memory agree
        order.sort(key=lambda i: (keys[i], weights[i], str(read[i].path)))
    read = [read[i] for i in order]
    weights = [weights[i] for i in order]
    in_order = order[:]

    names = {a.base_model for a in read} - {None}
    if len(names) > 1 and not allow_base_mismatch:
        raise IncompatibleAdaptersError(
            "the adapters name different base models (" + ", ".join(f"{a.path}: {a.base_model}" for a in read)
            + "); pass allow_base_mismatch=True (--allow-base-mismatch) if they are the same model saved at "
            "different paths"
        )

    warnings: list[str] = []
    layout = output_layout(read)
    rmap, notes = resolve_rotation_map([a.rotation_map for a in read], cayley, layout)
    warnings += notes
    plans = plan_modules(read)
    blocks, shared = block_config(read, plans, layout)
    config = output_config(read, plans, layout, rmap, blocks, shared, warnings)

    def inputs() -> list[InputInfo]:  # waits for the files' SHA-256, hashed while the modules are merged
        hashes = file_hashes()
        return [
            InputInfo(str(a.path), hashes[k], a.release, a.release_source, a.rotation_map.describe(), len(a.modules), w)
            for a, k, w in zip(read, in_order, weights)
        ]

    result = MergeResult(
        method=meth.name,
        options=options,
        scale=float(scale),
        inputs=[],
        layout=layout,
        rotation_map=rmap,
        block_config=blocks,
        config=config,
        warnings=warnings,
        dry_run=dry_run,
    )
    result.plan = {p.name: (tuple(s.block_size for _, s in p.entries), blocks.sizes[p.name]) for p in plans}
    dtypes = {a.dtype(name) for a in read for name in a.modules}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dry_run:
        for p in plans:
            b = blocks.sizes[p.name]
            rows = 1 if shared else (p.features or b) // b
            n = b * (b - 1) // 2 if layout == "0.18" else b * b
            result.tensors[p.name] = torch.empty((rows, n), dtype=out_dtype, device="meta")
        result.inputs = inputs()
        return result

    cancelled: list[str] = []
    non_orthogonal: list[tuple[str, float]] = []
    group = distributed.current()  # None unless launched with several processes (accelerate launch)
    mine = range(len(plans)) if group is None else group.share([len(p.entries) * (p.features or 1) for p in plans])
    added: dict[str, list[str]] = {}
    # modules whose inputs all store the generator packed on the output grid go through the merge packed:
    # a linear method commutes with packing, and ||Q||_F = sqrt(2) ||upper triangle||
    packed = {
        p.name for p in plans
        if layout == "0.18" and not shared and (meth.from_sum is not None or len(p.entries) == 1)
        and all(read[i].is_packed(p.name) and s.block_size == blocks.sizes[p.name] and not s.shared for i, s in p.entries)
    }  # fmt: skip
    reports: dict[str, dict[str, Any]] = {}
    with (
        torch_threads(threads),
        contextlib.nullcontext() if group is None else group.checked(),
        _Prefetch(read, [plans[k] for k in mine], packed) as generators,
        _Checks() as checks,
    ):
        for done, p in ((k + 1, plans[k]) for k in mine):
            first_key = len(result.tensors)
            b = blocks.sizes[p.name]
            is_packed = p.name in packed
            w = torch.tensor([weights[i] for i, _ in p.entries], dtype=torch.float64)
            if is_packed:
                signs = [read[i].rotation_map.sign for i, _ in p.entries]
                q, stats, norms = _merge_packed(generators.next(p), signs, w, meth, options)
            else:
                qs: torch.Tensor | None = None  # (inputs, blocks, b, b), canonical sign
                norms = []
                for k, ((i, spec), loaded) in enumerate(zip(p.entries, generators.next(p))):
                    norms.append(module_norm(loaded, spec, p.features))
                    loaded = to_grid(loaded, spec, shared, p.features, b)
                    if qs is None:
                        qs = torch.empty((len(p.entries), *loaded.shape), dtype=torch.float64)
                    torch.mul(loaded, read[i].rotation_map.sign, out=qs[k])
                assert qs is not None
                if len(p.entries) == 1:  # one adapter adapts this module: keep its generator as it is
                    q, stats = (torch.sign(w[0]) if meth.normalized_weights else w[0]) * qs[0], {}
                else:
                    q, stats = meth(qs, w, **options)
            if scale != 1.0:
                q = q * scale
            where = f"module {p.name!r}"
            if not bool(torch.isfinite(q).all()):
                raise NumericalError(f"{where}: the merged generator is not finite (method {meth.name}); nothing was written")
            if stats.get("cancelled"):
                cancelled.append(p.name)
            stored = q * rmap.sign
            # the rotation PEFT will apply, checked in the checker thread while the next module merges
            checks.submit(p.name, rmap, stored, is_packed)
            reports[p.name] = dict(
                name=p.name,
                inputs=tuple(i for i, _ in p.entries),
                input_block_sizes=tuple(s.block_size for _, s in p.entries),
                block_size=b,
                input_norms=tuple(norms),
                merged_norm=_SQRT2 * float(torch.linalg.vector_norm(q)) if is_packed
                else float(torch.linalg.matrix_norm(q).square().sum().sqrt()) * (math.sqrt((p.features or b) // b) if shared else 1.0),
                stats=stats,
            )
            prefix = KEY_PREFIX + p.name
            if layout == "0.18":
                suffix = ".oft_embedding_R.weight" if p.kind == "embedding" else ".oft_R.weight"
                result.tensors[prefix + suffix] = (stored if is_packed else pack_skew(stored)).to(out_dtype)
            else:
                result.tensors[prefix + ".oft_r"] = stored.to(out_dtype).contiguous()
                if layout == "0.15":
                    result.tensors[prefix + ".oft_s"] = merged_scale(read, p, weights).to(out_dtype)
            copies = [(i, read[i].saved_base_weight(p.name)) for i, _ in p.entries if p.name in read[i].saved_base]
            if copies:
                first = copies[0][1]
                if any(not torch.equal(first, t) for _, t in copies[1:]):
                    raise IncompatibleAdaptersError(
                        f"module {p.name!r}: the adapters saved different copies of its base weight "
                        f"({', '.join(str(read[i].path) for i, _ in copies)}); they were trained on different "
                        "base models (e.g. resized vocabularies) and cannot be merged"
                    )
                result.tensors[read[copies[0][0]].saved_base[p.name]] = first
            if group is not None:
                added[p.name] = list(result.tensors)[first_key:]
            if progress is not None:
                progress(done, len(plans), p.name)
        for name, ortho in checks.results():
            result.modules[name] = ModuleReport(**reports[name], ortho_error=ortho)
            if rmap.kind == "neumann" and ortho > NEUMANN_ORTHO_WARN:
                non_orthogonal.append((name, ortho))
    result.inputs = inputs()
    if group is not None:
        _gather_modules(group, plans, result, added, cancelled, non_orthogonal)
    if cancelled:
        warnings.append(
            f"{len(cancelled)} module(s) whose inputs' generators (nearly) cancel ({', '.join(cancelled[:3])}"
            f"{', ...' if len(cancelled) > 3 else ''}): their merged direction is ill-defined, so the plain "
            "weighted mean was used there (finite, small)"
        )
    if non_orthogonal:
        worst = max(non_orthogonal, key=lambda t: t[1])
        warnings.append(
            f"{len(non_orthogonal)} module(s) where PEFT's Cayley-Neumann series ({rmap.terms} terms) is far from a "
            f"rotation for the merged generator (worst: {worst[0]}, ||R^T R - I||_F = {worst[1]:.3g}); "
            "consider cayley='exact' or a smaller scale"
        )
    if distributed.is_main():  # one process of a distributed run says it
        for w_ in warnings:
            log.warning(w_)
    if out_dir is not None and output == "model":
        from oftmerge.ops.fold import fold_adapter

        fold_adapter(result, base, out_dir, shard_size=shard_size, overwrite=overwrite, threads=threads)  # type: ignore[arg-type]
    elif out_dir is not None:
        result.save(out_dir, overwrite=overwrite)
    return result


def _merge_packed(
    stored: Sequence[torch.Tensor], signs: Sequence[int], w: torch.Tensor, meth: MergeMethod, options: Mapping[str, Any]
) -> tuple[torch.Tensor, dict[str, Any], list[float]]:
    """A linear method on packed generators ``(blocks, b(b-1)/2)`` as stored: ``(merged, stats, ||Q_i||_F)``.

    The weighted sum is accumulated in float64 straight from the stored (float32) vectors, the
    canonical sign folded into each weight; block norms are taken in float64 too. The norms are
    of the triangles, ``||Q||_F / sqrt(2)``: a common factor every linear method cancels.
    """
    row_norms = torch.stack([torch.linalg.vector_norm(v, dim=-1, dtype=torch.float64) for v in stored])  # (inputs, blocks)
    norms = [_SQRT2 * float(n) for n in torch.linalg.vector_norm(row_norms, dim=-1)]
    if len(stored) == 1:  # one adapter adapts this module: keep its generator as it is
        factor = float(torch.sign(w[0])) if meth.normalized_weights else float(w[0])
        return stored[0].to(torch.float64) * (factor * signs[0]), {}, norms
    s = stored[0].to(torch.float64).mul_(float(w[0]) * signs[0])
    for v, wi, sign in zip(stored[1:], w[1:].tolist(), signs[1:]):
        s.add_(v, alpha=wi * sign)  # float64 += float32 * alpha, upcast elementwise: no float64 copy of v
    assert meth.from_sum is not None
    q, stats = meth.from_sum(s.unsqueeze(1), row_norms, w, **options)
    return q.squeeze(1), stats, norms


class _OneThread:
    """One worker thread and its futures, in submission order; leaving the ``with`` cancels what has not started."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, name)
        self._pending: collections.deque[tuple[str, Future[Any]]] = collections.deque()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


class _Prefetch(_OneThread):
    """Decode the inputs' generators of the next modules in a thread while this one is merged.

    ``OftAdapter.generator`` (read, finiteness check, float64, unpack) is about
    a third of a merge's arithmetic; torch releases the GIL, so it overlaps
    with the merge of the previous module. At most ``_PREFETCH`` modules ahead.
    """

    def __init__(self, read: Sequence[OftAdapter], plans: Sequence[ModulePlan], packed: Collection[str] = ()):
        self._read = read
        self._plans = iter(plans)
        self._packed = packed
        super().__init__("oftmerge-read")

    def _load(self, p: ModulePlan) -> list[torch.Tensor]:
        if p.name in self._packed:
            return [self._read[i].packed_generator(p.name) for i, _ in p.entries]
        return [self._read[i].generator(p.name) for i, _ in p.entries]

    def _fill(self) -> None:
        while len(self._pending) < _PREFETCH and (p := next(self._plans, None)) is not None:
            self._pending.append((p.name, self._pool.submit(self._load, p)))

    def next(self, p: ModulePlan) -> list[torch.Tensor]:
        """The generators of module ``p`` (the next one in plan order); re-raises a reading error."""
        self._fill()
        name, future = self._pending.popleft()
        assert name == p.name, (name, p.name)
        self._fill()
        return future.result()


#: modules whose generators are decoded ahead of the one being merged
_PREFETCH = 2


class _Checks(_OneThread):
    """``||R^T R - I||_F`` (worst block, float32) of each merged module's rotation, in a thread of its own.

    PEFT's Cayley–Neumann series (or the exact map) on the merged blocks is a few batched
    products per module, as much arithmetic as the merge itself; torch releases the GIL, so
    it overlaps with the next module. Results come back in submission order.
    """

    def __init__(self) -> None:
        super().__init__("oftmerge-check")

    @staticmethod
    def _check(rmap: RotationMap, stored: torch.Tensor, is_packed: bool) -> float:
        blocks_f32 = unpack_skew(stored.float()) if is_packed else stored.float()
        return _ortho_error(rmap.rotation(blocks_f32))  # a check against a 1e-2 threshold: float32 suffices

    def submit(self, name: str, rmap: RotationMap, stored: torch.Tensor, is_packed: bool) -> None:
        self._pending.append((name, self._pool.submit(self._check, rmap, stored, is_packed)))

    def results(self) -> list[tuple[str, float]]:
        return [(name, future.result()) for name, future in self._pending]


def _gather_modules(
    group: distributed.Group,
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
