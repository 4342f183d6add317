"""Orthogonal-Residual Decoupling: merge LoRA and fully finetuned experts through the rotation/residual split.

For every 2-D weight ``W0`` ``(out, in)`` (torch layout) and the experts' versions ``W_i``
(OrthoMerge paper, section 3.3; ``docs/decoupling.md``)::

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

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine import distributed
from oftmerge.errors import IncompatibleAdaptersError, NumericalError, OftMergeError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.lora import LoraAdapter, is_lora_adapter, read_lora
from oftmerge.formats.shards import write_model
from oftmerge.ops.merge import torch_threads
from oftmerge.linalg.procrustes import SOLVERS
from oftmerge.methods import get_method
from oftmerge.methods.decoupling import MAX_ROTATION, ON_DOMAIN_ERROR, TARGETS, Decomposition, LayerReport, Settings, decompose
from oftmerge.methods.euclidean import TensorContext, get_euclidean_method

__all__ = ["DecoupleResult", "decouple_merge"]

log = logging.getLogger(__name__)

#: tensors treated as embeddings (Euclidean only), by name.
EMBEDDING_PATTERN = (
    r"(^|\.)(embed_tokens|embed_positions|embeddings?|wte|wpe|word_embeddings|position_embeddings"
    r"|token_type_embeddings|tok_embeddings|shared)\.weight$"
)


@dataclass(frozen=True)
class Expert:
    """One input: a PEFT LoRA adapter (kept factored) or a full finetuned checkpoint."""

    path: Path
    kind: str  #: "lora" or "full"
    sha256: str
    lora: LoraAdapter | None = None
    checkpoint: Checkpoint | None = None
    changes: frozenset[str] | None = None  #: base tensors a LoRA expert changes (None: any)

    def may_change(self, name: str) -> bool:
        return self.changes is None or name in self.changes

    def tensor(self, name: str, base: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.lora is not None:
            return self.lora.tensor(name, base).to(dtype)
        assert self.checkpoint is not None
        t = self.checkpoint.read(name).to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{self.path}: tensor {name!r} contains NaN or Inf values; the checkpoint is broken")
        return t

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": str(self.path), "kind": self.kind, "sha256": self.sha256}
        if self.lora is not None:
            c = self.lora.config
            d["lora"] = {
                "r": c.get("r"),
                "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")),
                "use_dora": bool(c.get("use_dora")),
                "modules": len(self.lora.modules),
                "base_model_name_or_path": self.lora.base_model,
            }
        return d


def _fingerprint(files: Sequence[Path]) -> str:
    from oftmerge.formats.io import sha256_file

    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def _load_expert(path: str | os.PathLike[str], base: Checkpoint, shapes: Mapping[str, tuple[int, ...]]) -> Expert:
    p = Path(path)
    if not p.is_dir():
        raise OftMergeError(f"{p}: expert not found (give a PEFT LoRA adapter directory or a model directory)")
    if (p / "adapter_config.json").is_file():
        if not is_lora_adapter(p):
            from oftmerge.formats.io import read_json

            kind = read_json(p / "adapter_config.json").get("peft_type")
            hint = " (OFT adapters: `oftmerge merge`, or `oftmerge fold` then pass the folded model)" if kind == "OFT" else ""
            raise IncompatibleAdaptersError(f"{p}: a {kind} adapter; decouple takes LoRA adapters or full models{hint}")
        lora = read_lora(p)
        lora.check_base(shapes)
        return Expert(p, "lora", _fingerprint([lora.weights_path]), lora=lora, changes=frozenset(lora.changed()))
    ckpt = Checkpoint(p)
    theirs = set(ckpt.keys())
    missing = [k for k in shapes if k not in theirs]
    extra = sorted(theirs - set(shapes))
    if missing or extra:
        detail = (f"missing {len(missing)} of the base's tensors (e.g. {missing[0]!r})" if missing else "") + (
            ("; " if missing else "") + f"{len(extra)} tensors the base does not have (e.g. {extra[0]!r})" if extra else ""
        )
        raise IncompatibleAdaptersError(
            f"{p}: not the architecture of the base model {base.path}: {detail}. Full experts must be finetunes of "
            "that base saved with save_pretrained"
        )
    for k, shape in shapes.items():
        if tuple(ckpt.shape(k)) != tuple(shape):
            raise IncompatibleAdaptersError(
                f"{p}: tensor {k!r} has shape {tuple(ckpt.shape(k))}, the base model's has {tuple(shape)}; not a finetune of {base.path}"
            )
    return Expert(p, "full", _fingerprint([p / s for s in ckpt.shards]), checkpoint=ckpt)


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

    def provenance(self) -> dict[str, Any]:
        try:
            from oftmerge.integrations.hub import library_versions

            versions = library_versions()
        except ImportError:  # pragma: no cover - older hub module
            from oftmerge._version import __version__

            versions = {"oftmerge": __version__, "torch": torch.__version__.split("+")[0]}
        return {
            "tool": "oftmerge",
            "command": "decouple",
            "versions": versions,
            "settings": self.settings.to_dict(),
            "base": self.base,
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
            lines.append(f"  expert {i}: {e.path} ({e.kind}, weight {w:g})")
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


def _card(result: DecoupleResult) -> str:
    prov = result.provenance()
    s = result.settings
    title = s.euclidean.upper() + ("" if s.orthogonal is None else f" + {s.orthogonal} ({s.target} target)")
    meta = {"library_name": "transformers", "tags": ["oftmerge", "merge", s.euclidean] + ([s.orthogonal] if s.orthogonal else [])}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in meta.items()), "---", ""]
    lines += [f"# Merged model: {title}", ""]
    how = (
        "orthogonal-residual decoupling (OrthoMerge, ICML 2026): rotations merged on the orthogonal group, residuals "
        f"with {s.euclidean}" if s.orthogonal else f"{s.euclidean} on the task vectors (no decoupling)"
    )
    lines.append(
        f"Made by oftmerge {prov['versions'].get('oftmerge')} (`oftmerge decouple`) from {len(result.experts)} experts "
        f"of the base `{result.base}` by {how}. Weights keep the base's dtype."
    )
    lines += ["", "| # | expert | kind | sha256 | weight |", "|---|---|---|---|---|"]
    for i, e in enumerate(prov["experts"]):
        lines.append(f"| {i} | `{e['path']}` | {e['kind']} | `{e['sha256'][:16]}…` | {e['weight']:g} |")
    lines += ["", "Settings: `" + json.dumps(prov["settings"], sort_keys=True) + "`", ""]
    lines.append("Totals: `" + json.dumps(prov["totals"], sort_keys=True) + "`")
    lines += [f"- warning: {w}" for w in result.warnings]
    lines += ["", "Per-tensor diagnostics are in `oftmerge.json`. Load with `AutoModelForCausalLM.from_pretrained(this_directory)`."]
    return "\n".join(lines) + "\n"


class _LateFiles(Mapping[str, str]):
    """``extra_files`` whose contents are rendered when the writer reads them (after the last tensor)."""

    def __init__(self, result: DecoupleResult):
        self._result = result

    def __getitem__(self, key: str) -> str:
        if key == "oftmerge.json":
            return json.dumps(self._result.provenance(), indent=2, sort_keys=True) + "\n"
        if key == "README.md":
            return _card(self._result)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("oftmerge.json", "README.md"))

    def __len__(self) -> int:
        return 2


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
    base: str | os.PathLike[str],
    experts: Sequence[str | os.PathLike[str]],
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
) -> DecoupleResult:
    """Merge LoRA adapters and/or full finetunes of ``base`` into one full model, tensor by tensor.

    Args:
        base: the base model directory (a ``transformers`` checkpoint).
        experts: PEFT LoRA adapter directories (``W0 + s B A``, DoRA on linear layers) and/or
            model directories of full finetunes of ``base``, in any mix.
        euclidean: ``ta``, ``ties``, ``dare`` or ``tsv`` (``oftmerge.methods.euclidean``); merges
            the residuals (or, for tensors not decoupled, the task vectors).
        orthogonal: an so(d) method of :func:`oftmerge.available_methods` (``orthomerge``,
            ``mean_q``, ...) for the rotations, or None for the Euclidean method alone.
        target: ``global`` (``T_i = W_i``) or ``conflict`` (only the rows that oppose the mean).
        procrustes: ``robust`` (default), ``reference`` (the paper's plain SVD, bit for bit,
            safety nets reported but not applied) or ``fast`` (Newton polar iteration, checked).
        weights: one non-zero weight per expert (default 1); see ``docs/decoupling.md``.
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
        progress: ``progress(done, total, name)`` after each tensor written.
    """
    settings = _settings(euclidean, orthogonal, target, procrustes, euclidean_options, orthogonal_options,
                         anchor, cayley_margin, max_rotation, on_domain_error, euclidean_only)
    if out_dir is None and not dry_run:
        raise OftMergeError("give an output directory (out_dir=... / -o OUT), or dry_run=True to see the plan")
    if not experts:
        raise OftMergeError("no experts given: pass at least one LoRA adapter or finetuned model directory")
    base_ckpt = Checkpoint(base)
    shapes = base_ckpt.shapes()
    loaded = [_load_expert(e, base_ckpt, shapes) for e in experts]
    ws = [1.0] * len(loaded) if weights is None else [float(w) for w in weights]
    if len(ws) != len(loaded):
        raise OftMergeError(f"got {len(ws)} weights for {len(loaded)} experts; give one weight per expert")
    for e, w in zip(loaded, ws):
        if not math.isfinite(w) or w == 0:
            raise OftMergeError(f"weight {w!r} for {e.path}: weights must be finite and non-zero (drop the expert instead)")
    order = sorted(range(len(loaded)), key=lambda i: (loaded[i].sha256, str(loaded[i].path), ws[i]))
    loaded, ws = [loaded[i] for i in order], [ws[i] for i in order]
    transposed = {f"{m.name}.weight" for e in loaded if e.lora for m in e.lora.modules.values() if m.fan_in_fan_out}
    lora_embeddings = {f"{m.name}.weight" for e in loaded if e.lora for m in e.lora.modules.values() if m.kind == "embedding"}
    only = re.compile("|".join(f"(?:{p})" for p in (EMBEDDING_PATTERN, *settings.euclidean_only)))
    plan: dict[str, str] = {}
    for name in base_ckpt.keys_in_file_order():
        if not any(e.may_change(name) for e in loaded):
            continue
        flat = len(shapes[name]) != 2 or name in lora_embeddings or only.search(name) is not None
        plan[name] = "euclidean" if flat or settings.orthogonal is None else "decouple"
    result = DecoupleResult(settings, str(Path(base)), loaded, ws, plan, dry_run=dry_run)
    if dry_run:
        return result
    target_dir = Path(out_dir).absolute()  # type: ignore[arg-type]
    for e in loaded:
        if target_dir == e.path.absolute() or e.path.absolute().is_relative_to(target_dir):
            raise OftMergeError(f"{target_dir}: the output would replace expert {e.path}; inputs are never modified")

    euclid = get_euclidean_method(settings.euclidean)
    e_opts = euclid.resolve_options(dict(settings.euclidean_options))

    def split(name: str, tensor: torch.Tensor) -> tuple[Decomposition, list[int]] | None:
        # float64, except for the elementwise Euclidean methods on tensors stored in 16 bits: float32
        # carries 16 more bits than the output keeps, at half the memory traffic (docs/decoupling.md)
        fp32 = plan[name] == "euclidean" and settings.euclidean in FLOAT32_METHODS and tensor.dtype in (torch.bfloat16, torch.float16)
        dtype = torch.float32 if fp32 else torch.float64
        w0 = tensor.to(dtype)
        w0 = w0.T if name in transposed else w0
        candidates = [i for i, e in enumerate(loaded) if e.may_change(name)]
        stack = torch.empty((len(candidates), *w0.shape), dtype=dtype)  # filled in place: one copy
        idx: list[int] = []
        for i in candidates:
            w = loaded[i].tensor(name, tensor, dtype)
            w = w.T if name in transposed else w
            if not torch.equal(w, w0):
                stack[len(idx)] = w
                idx.append(i)
            del w
        if not idx:
            return None
        wt = torch.tensor([ws[i] for i in idx], dtype=torch.float64)
        dec = decompose(name, w0, stack[: len(idx)], wt, settings, decouple=plan[name] == "decouple", experts=tuple(idx))
        return dec, idx

    group = distributed.current()  # several processes (accelerate launch): each merges and writes its share of the shards

    def cost(name: str, shape: tuple[int, ...]) -> float:
        """Rough work of one tensor, to balance processes: its entries, and for a decoupled one its solves."""
        numel = math.prod(shape)
        if plan.get(name) != "decouple":
            return float(numel)
        width = min(shape[1], 2 * shape[0])  # the Procrustes size (row space for wide layers)
        return float(len(loaded) * (numel * shape[1] + 20 * width**3))

    thresholds = None
    if settings.euclidean == "ties" and e_opts.get("trim") == "model":
        with torch_threads(threads):
            thresholds = _model_thresholds(base_ckpt, plan, split, len(loaded), float(e_opts["density"]), group, cost)

    def tensor_fn(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        got = split(name, tensor)
        if got is None:
            return None
        dec, idx = got
        ctx = TensorContext(name, None if thresholds is None else tuple(thresholds[i] for i in idx), tuple(idx))
        wt = torch.tensor([ws[i] for i in idx], dtype=torch.float64)
        merged, stats = euclid(dec.parts, wt, context=ctx, **e_opts)
        out = dec.base_part + merged
        if not bool(torch.isfinite(out).all()):
            raise NumericalError(f"tensor {name!r}: the merged weight is not finite ({settings.euclidean}); nothing was written")
        dec.report.residual_norm = float(torch.linalg.vector_norm(merged))
        dec.report.stats = {**dec.report.stats, **{f"euclidean_{k}": v for k, v in stats.items()}}
        result.layers[name] = dec.report
        out = out.T if name in transposed else out
        return out.to(tensor.dtype).contiguous()

    extra: dict[str, Any] = {} if progress is None else {"progress": progress}
    with torch_threads(threads):
        _write(base, out_dir, tensor_fn, group, result, plan, cost, shard_size, overwrite, extra)
    result.out_dir = target_dir
    fb = [r for r in result.layers.values() if r.path.startswith("fallback")]
    if fb:
        result.warnings.append(f"{len(fb)} tensor(s) fell back to the Euclidean method alone (first: {fb[0].name}: {fb[0].path})")
    if distributed.is_main():  # one process of a distributed run says it
        for w in result.warnings:
            log.warning(w)
    return result


def _write(
    base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tensor_fn: Callable[[str, torch.Tensor], torch.Tensor | None],
    group: distributed.Group | None,
    result: DecoupleResult,
    plan: Mapping[str, str],
    cost: Callable[[str, tuple[int, ...]], float],
    shard_size: int | str,
    overwrite: bool,
    extra: Mapping[str, Any],
) -> None:
    """Write the merged model: one process, or each process of a launched run its share of the shards."""
    if group is None:
        write_model(base, out_dir, tensor_fn, shard_size=shard_size, overwrite=overwrite, extra_files=_LateFiles(result),
                    only=plan.__contains__, **extra)
    else:

        def gather_reports() -> None:  # every process's tensors, back in plan order, before oftmerge.json is written
            parts: dict[str, LayerReport] = {}
            for part in group.gather(result.layers):
                parts.update(part)
            result.layers = {name: parts[name] for name in plan if name in parts}

        distributed.write_model(base, out_dir, tensor_fn, group=group, shard_size=shard_size, overwrite=overwrite,
                                extra_files=_LateFiles(result), only=plan.__contains__, cost=cost,
                                after_shards=gather_reports, **extra)  # fmt: skip


def _model_thresholds(
    ckpt: Checkpoint,
    plan: Mapping[str, str],
    split: Callable[..., Any],
    n: int,
    density: float,
    group: distributed.Group | None = None,
    cost: Callable[[str, tuple[int, ...]], float] | None = None,
) -> list[float]:
    """First pass of a model-wide TIES trim: one magnitude threshold per expert.

    With several processes each histograms its share of the tensors and the counts are summed
    (integers in float64: exact, so the thresholds do not depend on the split).
    """
    hists = torch.zeros(n, _HIST_BINS, dtype=torch.float64)
    counts = [0] * n
    names = list(plan)
    if group is not None:
        shapes = ckpt.shapes()
        names = [names[k] for k in group.share([(cost or (lambda _n, s: math.prod(s)))(m, tuple(shapes[m])) for m in names])]
    with contextlib.nullcontext() if group is None else group.checked():  # a failure stops every process
        for name in names:
            got = split(name, ckpt.read(name))
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
    if group is not None:
        parts = group.gather((hists, counts))
        hists = sum((h for h, _ in parts[1:]), parts[0][0].clone())
        counts = [sum(c[i] for _, c in parts) for i in range(n)]
    return _thresholds(hists, counts, density)


def _settings(euclidean, orthogonal, target, procrustes_, e_opts, o_opts, anchor, margin, max_rot, on_err, only) -> Settings:
    e_opts = get_euclidean_method(euclidean).resolve_options(dict(e_opts or {}))
    if orthogonal in (None, "none", ""):
        orthogonal, o_opts = None, {}
    else:
        o_opts = get_method(orthogonal).resolve_options(dict(o_opts or {}))
    if target not in TARGETS:
        raise OftMergeError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if procrustes_ not in SOLVERS:
        raise OftMergeError(f"procrustes must be one of {', '.join(SOLVERS)}, got {procrustes_!r}")
    if on_err not in ON_DOMAIN_ERROR:
        raise OftMergeError(f"on_domain_error must be one of {', '.join(ON_DOMAIN_ERROR)}, got {on_err!r}")
    for value, what in ((anchor, "anchor"), (margin, "cayley_margin"), (max_rot, "max_rotation")):
        if not (math.isfinite(value) and value >= 0):
            raise OftMergeError(f"{what} must be a finite number >= 0, got {value!r}")
    for pattern in only:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OftMergeError(f"euclidean_only pattern {pattern!r} is not a regular expression ({exc})") from None
    return Settings(euclidean, e_opts, orthogonal, o_opts, target, procrustes_, anchor, margin,
                    max_rot, on_err, tuple(only))
