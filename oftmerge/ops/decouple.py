"""Orthogonal-Residual Decoupling: merge LoRA and fully finetuned experts through the rotation/residual split.

For every 2-D weight ``W0`` ``(out, in)`` (torch layout) and the experts' versions ``W_i``
(OrthoMerge paper, section 3.3)::

    T_i   = W_i                                   target "global"
          = W0 + tau_i * mask_i                   target "conflict": the rows (output neurons) whose
                                                  cosine with tau_mean's row is negative
    R_i   = argmin_R ||T_i - W0 R||_F             Procrustes (oftmerge.linalg.procrustes), R in SO(in)
    Q_i   = cayley^-1(R_i);  Q_m = so(d) method(Q_1..Q_N);  R_m = cayley(Q_m)
    rho_i = W_i - W0 R_i;    rho_m = Euclidean method(rho_1..rho_N)
    W     = W0 R_m + rho_m

Tensors that are not 2-D (norms, biases, convolutions) and embeddings go through the
Euclidean method alone (``W = W0 + method(W_i - W0)``), as does every tensor with
``orthogonal=None``, which gives the plain TA / TIES / DARE / TSV-M baselines.

Only the experts whose tensor differs from the base take part in that tensor's merge
(a LoRA expert that does not adapt a layer does not dilute it). Experts are put in a
canonical order (by the SHA-256 of their weight files) before any float sum, so the
order they are given in does not change a byte of the output.

>>> import oftmerge
>>> oftmerge.decouple_merge("base", ["lora-a", "full-b"], euclidean="ties", orthogonal="orthomerge",
...                         target="conflict", out_dir="merged")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.config import DecoupleConfig, RunOptions
from oftmerge.engine.commit import check_output
from oftmerge.engine.distributed import Group, is_main, process_group
from oftmerge.engine.model import write_model
from oftmerge.engine.threads import torch_threads
from oftmerge.errors import OftMergeError
from oftmerge.formats.checkpoint import missing_config_warning
from oftmerge.formats.sources import describe_record
from oftmerge.integrations.cards import decoupled_model_card
from oftmerge.kernels.decouple import decouple_weight, merge_residuals
from oftmerge.methods.decoupling import MAX_ROTATION, Decomposition, LayerReport, Settings
from oftmerge.methods.euclidean import get_euclidean_method
from oftmerge.plan.decouple import DecouplePlan, Expert, plan_decouple
from oftmerge.provenance import library_versions

__all__ = ["DecoupleResult", "decouple_merge", "run_decouple"]

log = logging.getLogger(__name__)


@dataclass
class DecoupleResult:
    """What :func:`decouple_merge` did (or, in a dry run, would do)."""

    settings: Settings
    base: str
    experts: list[Expert]
    weights: list[float]
    plan: dict[str, str]  #: tensor -> "decouple" or "euclidean" (tensors some expert changes)
    layers: dict[str, LayerReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    out_dir: Path | None = None
    base_hub: dict[str, Any] | None = None  #: for a Hub base: ``repo_id``, ``revision`` asked for, ``commit``
    recipe: str | None = None  #: the ``oftmerge.yaml`` of the output (:mod:`oftmerge.ops.recipe`)

    def provenance(self) -> dict[str, Any]:
        versions = library_versions()
        return {
            "tool": "oftmerge",
            "command": "decouple",
            "versions": versions,
            "settings": self.settings.to_dict(),
            "base": self.base,
            **({"base_hub": self.base_hub} if self.base_hub else {}),
            "experts": [dict(e.describe(), weight=w) for e, w in zip(self.experts, self.weights)],
            "warnings": self.warnings,
            "totals": self.totals(),
            "layers": {n: r.to_dict() for n, r in self.layers.items()},
        }

    def totals(self) -> dict[str, Any]:
        dec = [r for r in self.layers.values() if r.path == "decoupled"]
        fb = [r for r in self.layers.values() if r.path.startswith("fallback")]
        q = [x for r in dec for x in r.q_norms]
        fits = [f for r in dec for f in r.fits if f is not None]
        return {
            "tensors": len(self.plan),
            "decoupled": len(dec),
            "euclidean": sum(1 for r in self.layers.values() if r.path == "euclidean"),
            "fallbacks": len(fb),
            "max_q_norm": max(q, default=0.0),
            "mean_fit": sum(fits) / len(fits) if fits else None,
            "max_shift_ratio": max((r.rotation_shift / max(max(r.task_norms), 1e-300) for r in dec), default=0.0),
            "max_merged_ortho_error": max((r.merged_ortho_error for r in dec), default=0.0),
            "min_margin": min((r.min_margin for r in dec), default=2.0),
            "det_flips": sum(r.det_flips for r in dec),
        }

    def summary(self, max_rows: int = 12) -> str:
        s = self.settings
        orth = "none (Euclidean method alone)" if s.orthogonal is None else f"{s.orthogonal}, target {s.target}, procrustes {s.procrustes}"
        lines = [f"euclidean: {s.euclidean} {dict(s.euclidean_options)}; orthogonal: {orth}"]
        for i, (e, w) in enumerate(zip(self.experts, self.weights)):
            lines.append(f"  expert {i}: {describe_record(str(e.path), e.hub)} ({e.kind}, weight {w:g})")
        n_dec = sum(1 for v in self.plan.values() if v == "decouple")
        lines.append(f"  {len(self.plan)} tensors changed by the experts: {n_dec} decoupled, {len(self.plan) - n_dec} Euclidean only")
        if self.dry_run:
            lines += [f"  {name[-60:]:<60} {path}" for name, path in list(self.plan.items())[:max_rows]]
            if len(self.plan) > max_rows:
                lines.append(f"  ... {len(self.plan) - max_rows} more tensors")
        if self.layers:
            lines.append(f"  {'tensor':<44} {'path':<10} {'|tau| mean':>10} {'|Q_i| max':>9} {'shift/|tau|':>11} {'fit':>6} {'margin':>7}")
            for r in list(self.layers.values())[:max_rows]:
                mean_tau = sum(r.task_norms) / max(1, len(r.task_norms))
                fits = [f for f in r.fits if f is not None]
                lines.append(
                    f"  {r.name[-44:]:<44} {r.path.split(':')[0]:<10} {mean_tau:>10.3g} {max(r.q_norms, default=0):>9.3g} "
                    f"{r.rotation_shift / max(max(r.task_norms, default=0), 1e-300):>11.3g} "
                    f"{(sum(fits) / len(fits)) if fits else float('nan'):>6.3f} {r.min_margin:>7.3g}"
                )
            if len(self.layers) > max_rows:
                lines.append(f"  ... {len(self.layers) - max_rows} more tensors")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class _LateFiles(Mapping[str, str]):
    """``extra_files`` whose contents are rendered when the writer reads them (after the last tensor)."""

    def __init__(self, result: DecoupleResult):
        self._result = result

    def __getitem__(self, key: str) -> str:
        if key == "oftmerge.json":
            return json.dumps(self._result.provenance(), indent=2, sort_keys=True) + "\n"
        if key == "README.md":
            return decoupled_model_card(self._result)
        if key == "oftmerge.yaml" and self._result.recipe is not None:
            return self._result.recipe
        raise KeyError(key)

    def _keys(self) -> tuple[str, ...]:
        return ("oftmerge.json", "README.md") + (("oftmerge.yaml",) if self._result.recipe is not None else ())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


#: Euclidean methods computed in float32 for tensors the base stores in bfloat16/float16 (elementwise:
#: each output entry is a short sum; TSV-M's SVDs stay in float64).
FLOAT32_METHODS = ("ta", "ties", "dare")

# model-wide TIES trim: a histogram of log10 |x| per expert, then one threshold per expert
_HIST_BINS, _LOG_LO, _LOG_HI = 1 << 16, -40.0, 10.0


def _thresholds(hists: torch.Tensor, counts: list[int], density: float) -> list[float]:
    out = []
    width = (_LOG_HI - _LOG_LO) / _HIST_BINS
    for h, n in zip(hists, counts):
        k = int(density * n)
        from_top = h.flip(0).cumsum(0)
        hit = torch.nonzero(from_top >= k)
        if k == 0 or hit.numel() == 0:
            out.append(math.inf if k == 0 else 0.0)
            continue
        b = _HIST_BINS - 1 - int(hit[0])
        out.append(10.0 ** (_LOG_LO + b * width))
    return out


def decouple_merge(
    base: str | os.PathLike[str] | DecoupleConfig,
    experts: Sequence[str | os.PathLike[str]] = (),
    *,
    euclidean: str = "ties",
    orthogonal: str | None = "orthomerge",
    target: str = "global",
    procrustes: str = "robust",
    weights: Sequence[float] | None = None,
    euclidean_options: Mapping[str, Any] | None = None,
    orthogonal_options: Mapping[str, Any] | None = None,
    anchor: float = 1e-6,
    cayley_margin: float = 1e-2,
    max_rotation: float = MAX_ROTATION,
    on_domain_error: str = "log",
    euclidean_only: Sequence[str] = (),
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    shard_size: int | str = "5GB",
    dry_run: bool = False,
    threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    run: RunOptions | None = None,
) -> DecoupleResult:
    """Merge LoRA adapters and/or full finetunes of ``base`` into one full model, tensor by tensor.

    Args:
        base: the base model directory (a ``transformers`` checkpoint) or Hub id, or a whole
            :class:`~oftmerge.config.DecoupleConfig` (then ``experts`` ... ``euclidean_only``
            are not used).
        experts: PEFT LoRA adapter directories (``W0 + s B A``, DoRA on linear layers) and/or
            model directories of full finetunes of ``base``, in any mix; each may be a Hub id
            (``ns/name[@revision]``, see :mod:`oftmerge.formats.sources`).
        euclidean: ``ta``, ``ties``, ``dare`` or ``tsv`` (``oftmerge.methods.euclidean``); merges
            the residuals (or, for tensors not decoupled, the task vectors).
        orthogonal: an so(d) method of :func:`oftmerge.available_methods` (``orthomerge``,
            ``mean_q``, ...) for the rotations, or None for the Euclidean method alone.
        target: ``global`` (``T_i = W_i``) or ``conflict`` (only the rows that oppose the mean).
        procrustes: ``robust`` (default), ``reference`` (the paper's plain SVD, bit for bit,
            safety nets reported but not applied) or ``fast`` (Newton polar iteration, checked).
        weights: one non-zero weight per expert (default 1).
        euclidean_options, orthogonal_options: the methods' own options (``density``, ``p``,
            ``seed``, ``scale``, ``fraction``, ``trim``; ``per_block``, ``cancel_tol``).
        anchor: null-space anchor ``mu = anchor * ||W0^T T||_2`` of the robust/fast solvers.
        cayley_margin: smallest admissible singular value of ``I + R_i``.
        max_rotation: a merged rotation may move ``W0`` by at most this times the largest
            task vector of the tensor; beyond it the tensor falls back to the Euclidean method.
        on_domain_error: ``log`` (merge that tensor in the exponential chart), ``euclidean``
            (fall back) or ``error``, when some ``R_i`` is outside the Cayley chart.
        euclidean_only: regular expressions of tensor names never decoupled (embeddings
            and non-2-D tensors never are).
        out_dir: where the merged model is written (atomically); required unless ``dry_run``.
        overwrite: replace an existing ``out_dir``.
        shard_size: largest shard, e.g. ``"5GB"``.
        dry_run: read configs and shapes only; report the plan.
        threads: torch threads for the arithmetic (restored afterwards; None leaves torch's setting).
            LAPACK's SVD and QR, and BLAS products, may round differently with another thread
            count: the output is bit-identical for one thread count (and any number of processes
            under ``accelerate launch``, whose processes get one thread each unless told otherwise).
        progress: ``progress(done, total, name)`` after each tensor written (with ``nbytes=`` its bytes, when
            the callback takes that keyword).
        run: a :class:`~oftmerge.config.RunOptions`; when given, ``overwrite``, ``shard_size``,
            ``dry_run``, ``threads`` and ``progress`` are not used.
    """
    if isinstance(base, DecoupleConfig):
        config = base
    else:
        config = DecoupleConfig(
            base, experts,  # type: ignore[arg-type]  # the config checks and normalises both (one-line errors)
            euclidean=euclidean, orthogonal=orthogonal, target=target,
            procrustes=procrustes, weights=None if weights is None else tuple(weights),
            euclidean_options=dict(euclidean_options or {}), orthogonal_options=dict(orthogonal_options or {}), anchor=anchor,
            cayley_margin=cayley_margin, max_rotation=max_rotation, on_domain_error=on_domain_error,
            euclidean_only=tuple(euclidean_only),
        )  # fmt: skip
    if run is None:
        run = RunOptions(threads=threads, shard_size=shard_size, overwrite=overwrite, dry_run=dry_run, progress=progress)
    return run_decouple(config, run, out_dir)


def run_decouple(config: DecoupleConfig, run: RunOptions, out_dir: str | os.PathLike[str] | None = None) -> DecoupleResult:
    """Plan and execute ``config``, writing the merged model to ``out_dir``."""
    if out_dir is None and not run.dry_run:
        raise OftMergeError("give an output directory (out_dir=... / -o OUT), or dry_run=True to see the plan")
    plan = plan_decouple(config)
    result = DecoupleResult(plan.settings, str(plan.base), list(plan.experts), list(plan.weights), dict(plan.tensors), dry_run=run.dry_run,
                            base_hub=dict(plan.base_hub) if plan.base_hub else None)  # fmt: skip
    if (no_config := missing_config_warning(plan.checkpoint)) is not None:
        result.warnings.append(no_config)
    if run.dry_run:
        return result
    assert out_dir is not None
    inputs = plan.inputs
    check_output(out_dir, inputs)  # before the model-wide pass, if any
    from oftmerge.ops.recipe import recipe_for

    result.recipe = recipe_for("decouple", config, run).to_yaml()
    group = process_group()  # several processes (accelerate launch): each merges and writes its share of the shards
    euclid = get_euclidean_method(plan.settings.euclidean)
    e_opts = dict(plan.settings.euclidean_options)
    split = _splitter(plan)
    thresholds = None
    if plan.settings.euclidean == "ties" and e_opts.get("trim") == "model":
        with torch_threads(run.threads):
            thresholds = _model_thresholds(plan, split, float(e_opts["density"]), group)

    def tensor_fn(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        got = split(name, tensor)
        if got is None:
            return None
        dec, idx = got
        wt = torch.tensor([plan.weights[i] for i in idx], dtype=torch.float64)
        limits = None if thresholds is None else [thresholds[i] for i in idx]
        out, result.layers[name] = merge_residuals(name, dec, wt, euclid, e_opts, indices=idx, thresholds=limits, dtype=tensor.dtype)
        out = out.T if name in plan.transposed else out
        return out.to(tensor.dtype).contiguous()

    def gather_reports() -> None:  # every process's tensors, back in plan order, before oftmerge.json is written
        if group.size == 1:
            return
        parts: dict[str, LayerReport] = {}
        for part in group.gather(result.layers):
            parts.update(part)
        result.layers = {name: parts[name] for name in plan.tensors if name in parts}

    with torch_threads(run.threads):
        result.out_dir = write_model(
            plan.base, out_dir, tensor_fn, shard_size=run.shard_size, overwrite=run.overwrite, extra_files=_LateFiles(result),
            only=plan.tensors.__contains__, cost=plan.cost, after_shards=gather_reports, progress=run.progress, inputs=inputs,
            group=group,
        )  # fmt: skip
    fb = [r for r in result.layers.values() if r.path.startswith("fallback")]
    if fb:
        result.warnings.append(f"{len(fb)} tensor(s) fell back to the Euclidean method alone (first: {fb[0].name}: {fb[0].path})")
    if is_main():  # one process of a distributed run says it
        for w in result.warnings:
            log.warning(w)
    return result


def _splitter(plan: DecouplePlan) -> Callable[[str, torch.Tensor], tuple[Decomposition, list[int]] | None]:
    """``split(name, base tensor)``: read the experts' versions of one tensor and decouple them (None: none changes it)."""

    def split(name: str, tensor: torch.Tensor) -> tuple[Decomposition, list[int]] | None:
        kind = plan.tensors[name]
        # float64, except for the elementwise Euclidean methods on tensors stored in 16 bits: float32
        # carries 16 more bits than the output keeps, at half the memory traffic (docs/decoupling.md)
        fp32 = kind == "euclidean" and plan.settings.euclidean in FLOAT32_METHODS and tensor.dtype in (torch.bfloat16, torch.float16)
        dtype = torch.float32 if fp32 else torch.float64
        w0 = tensor.to(dtype)
        w0 = w0.T if name in plan.transposed else w0
        candidates = [i for i, e in enumerate(plan.experts) if e.may_change(name)]
        stack = torch.empty((len(candidates), *w0.shape), dtype=dtype)  # filled in place: one copy
        idx: list[int] = []
        for i in candidates:
            w = plan.experts[i].tensor(name, tensor, dtype)
            w = w.T if name in plan.transposed else w
            if not torch.equal(w, w0):
                stack[len(idx)] = w
                idx.append(i)
            del w
        if not idx:
            return None
        wt = torch.tensor([plan.weights[i] for i in idx], dtype=torch.float64)
        return decouple_weight(name, w0, wt, stack[: len(idx)], plan.settings, decouple=kind == "decouple", indices=idx), idx

    return split


def _model_thresholds(plan: DecouplePlan, split: Callable[..., Any], density: float, group: Group) -> list[float]:
    """First pass of a model-wide TIES trim: one magnitude threshold per expert.

    With several processes each histograms its share of the tensors and the counts are summed
    (integers in float64: exact, so the thresholds do not depend on the split).
    """
    n = len(plan.experts)
    hists = torch.zeros(n, _HIST_BINS, dtype=torch.float64)
    counts = [0] * n
    names = list(plan.tensors)
    if group.size > 1:
        shapes = plan.checkpoint.shapes()
        names = [names[k] for k in group.share([plan.cost(m, tuple(shapes[m])) for m in names])]
    with group.checked():  # a failure stops every process
        for name in names:
            got = split(name, plan.checkpoint.read(name))
            if got is None:
                continue
            dec, idx = got
            for row, i in zip(dec.parts, idx):
                a = row.abs().flatten()
                a = a[a > 0].to(torch.float64)  # histc counts in the input's dtype: float32 is exact only to 2^24
                counts[i] += row.numel()
                if a.numel():
                    logs = torch.log10(a).clamp(_LOG_LO, _LOG_HI - 1e-9)
                    hists[i] += torch.histc(logs, bins=_HIST_BINS, min=_LOG_LO, max=_LOG_HI)
    if group.size > 1:
        parts = group.gather((hists, counts))
        hists = sum((h for h, _ in parts[1:]), parts[0][0].clone())
        counts = [sum(c[i] for _, c in parts) for i in range(n)]
    return _thresholds(hists, counts, density)
