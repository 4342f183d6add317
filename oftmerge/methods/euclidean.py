"""Euclidean merge methods for task vectors (TA, TIES, DARE, TSV-M), with their own registry.

Each method is a pure function of one tensor's task vectors ``taus`` ``(N, *shape)``
(float64, or float32 for 16-bit checkpoints: see :mod:`oftmerge.ops.decouple`), per-expert weights ``w`` ``(N,)`` and a :class:`TensorContext` (the tensor's
name, for seeding, and model-wide statistics when a method needs them), passed as
``context=``. It returns the merged task vector ``(*shape)`` and a dict of statistics. The decoupling engine
(:mod:`oftmerge.ops.decouple`) feeds them either plain task vectors ``W_i - W0`` or the
residuals ``W_i - W0 R_i`` of the orthogonal-residual split.

=============  ======================================================================  ==========================
method         merged task vector                                                      paper
=============  ======================================================================  ==========================
``ta``         ``scale * sum_i w_i tau_i``                                             Ilharco et al., ICLR 2023
``ties``       trim each ``tau_i`` to its top ``density`` magnitudes, elect a sign per  Yadav et al., NeurIPS 2023
               entry from the sum of trimmed values, average the agreeing entries
               (disjoint mean), times ``scale``
``dare``       ``scale * sum_i w_i m_i * tau_i / (1 - p)`` with Bernoulli masks         Yu et al., ICML 2024
               ``m_i`` (keep probability ``1 - p``) seeded by tensor name and expert
``tsv``        per 2-D tensor: top ``k = rank / N`` singular triplets of each task      Gargiulo et al., CVPR 2025
               matrix (zero singular values dropped), concatenated, ``U`` and ``V``
               replaced by their orthogonal polar factors, reconstructed, times
               ``scale``; other tensors: the mean
=============  ======================================================================  ==========================

Weights: TA, DARE and TSV-M multiply each task vector by its weight first; TIES elects
signs from the unweighted trimmed values and takes the weighted disjoint mean (as PEFT's
``ties``). Trimming, sign election and the disjoint mean follow PEFT's
``peft.utils.merge_utils`` (``magnitude_based_pruning``,
``calculate_majority_sign_mask(method="total")``, ``disjoint_merge``), whose
definitions are the ones written above, and are pinned against them in the tests; they
are implemented here, one expert at a time (no ``(N, *shape)`` temporaries beyond the
trimmed copy) and with an O(n) selection (``kthvalue``) instead of a sort (``topk``). DARE does not reuse PEFT's
``random_pruning``: it draws from the global RNG, and merges must be reproducible
per tensor.

>>> import torch
>>> taus = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, -0.1]], dtype=torch.float64)
>>> w = torch.ones(2, dtype=torch.float64)
>>> get_euclidean_method("ta")(taus, w, context=TensorContext("x"))[0]
tensor([ 2.0000, -1.0000,  0.4000], dtype=torch.float64)
>>> get_euclidean_method("ties")(taus, w, context=TensorContext("x"), density=1.0)[0]
tensor([ 1.0000, -2.0000,  0.5000], dtype=torch.float64)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from oftmerge.errors import OftMergeError
from oftmerge.methods.registry import EUCLIDEAN, MergeMethod, MethodOption, merge_method

__all__ = [
    "TensorContext",
    "dare",
    "euclidean_method",
    "euclidean_methods",
    "get_euclidean_method",
    "task_arithmetic",
    "ties",
    "trim_magnitudes",
    "tsv",
]

EuclideanFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


@dataclass(frozen=True)
class TensorContext:
    """What a Euclidean method may know about the tensor besides its task vectors.

    ``thresholds``: one magnitude per expert, set when TIES trims over the whole
    model (``trim="model"``); entries with ``|tau| >= threshold`` are kept.
    ``experts``: the global index of each row of ``taus`` (DARE seeds its masks with
    it, so an expert's mask does not depend on which other experts change the tensor).
    """

    name: str
    thresholds: tuple[float, ...] | None = None
    experts: tuple[int, ...] | None = None


def euclidean_method(
    name: str, *, summary: str, reference: str, options: tuple[MethodOption, ...] = ()
) -> Callable[[EuclideanFn], EuclideanFn]:
    """Register ``fn(taus, weights, *, context, **options) -> (tau, stats)`` as Euclidean method ``name``."""
    return merge_method(name, summary=summary, reference=reference, options=options, registry=EUCLIDEAN)


def euclidean_methods() -> dict[str, MergeMethod]:
    """The Euclidean methods by name, in registration order (the OFT ones: :func:`available_methods`)."""
    return EUCLIDEAN.all()


def get_euclidean_method(name: str) -> MergeMethod:
    return EUCLIDEAN.get(name)


def _weighted(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return taus * weights.to(taus.dtype).view((-1,) + (1,) * (taus.dim() - 1))


#: TSV-M drops singular triplets below this fraction of the expert's largest singular value.
TSV_RANK_TOL = 1e-10

_SCALE = MethodOption("scale", float, 1.0, "multiplies the merged task vector (lambda)")


@euclidean_method(
    "ta",
    summary="Task arithmetic: the weighted sum of task vectors, times scale",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    options=(_SCALE,),
)
def task_arithmetic(
    taus: torch.Tensor, weights: torch.Tensor, *, context: TensorContext, scale: float = 1.0
) -> tuple[torch.Tensor, dict[str, Any]]:
    return scale * _weighted(taus, weights).sum(0), {}


#: above this many entries the k-th largest magnitude is found in a band bracketed by a sample.
_BRACKET_MIN = 1 << 20
_SAMPLE = 1 << 16


def _kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest entry of the flat tensor ``a`` (``1 <= k <= numel``), exactly.

    Large tensors: a strided sample of ``_SAMPLE`` entries brackets the answer between two of
    its order statistics (6 standard deviations of the sample quantile either side); one pass
    counts the entries above the bracket, and the selection runs on the entries inside it (about
    2% of them). Whenever the bracket misses (structured data), the plain ``kthvalue`` of
    everything runs instead: the sample only decides the speed, never the result.
    """
    n = a.numel()
    if n >= _BRACKET_MIN:
        sample = a[:: n // _SAMPLE].sort(descending=True).values
        m = sample.numel()
        rank, spread = m * k / n, 6.0 * math.sqrt(m * (k / n) * (1.0 - k / n)) + 2.0
        hi = sample[max(0, math.floor(rank - spread))]
        lo = sample[min(m - 1, math.ceil(rank + spread))]
        above = int(torch.count_nonzero(a > hi))
        if above < k:
            band = a[(a >= lo) & (a <= hi)]
            if above + band.numel() >= k:
                return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(a, n - k + 1).values


def _top_magnitudes(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask shaped like ``t``: its ``k`` entries largest in magnitude; among equal magnitudes at
    the cut, the lowest flat indices (a deterministic tie rule; PEFT's ``topk`` leaves it unspecified).
    """
    a = t.abs().reshape(-1)
    n = a.numel()
    if k >= n:
        return torch.ones_like(t, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    cut = _kth_largest(a, k)
    keep = a > cut
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        keep[torch.nonzero(a == cut).reshape(-1)[:missing]] = True
    return keep.view(t.shape)


def trim_magnitudes(taus: torch.Tensor, density: float, thresholds: tuple[float, ...] | None = None) -> torch.Tensor:
    """TIES's trim: each expert's task vector with all but its top ``density`` magnitudes zeroed.

    Per tensor (``thresholds=None``): exactly ``int(density * numel)`` entries kept, the ones
    PEFT's ``magnitude_based_pruning`` keeps (ties at the cut: lowest index first). Over the
    whole model: entries with ``|tau_i| >= thresholds[i]`` are kept.
    """
    if thresholds is not None:
        t = torch.tensor(thresholds, dtype=taus.dtype).view((-1,) + (1,) * (taus.dim() - 1))
        return torch.where(taus.abs() >= t, taus, torch.zeros((), dtype=taus.dtype))
    if density >= 1.0:
        return taus
    out = torch.empty_like(taus)
    k = int(density * taus[0].numel())
    zero = torch.zeros((), dtype=taus.dtype)
    for i in range(taus.shape[0]):
        torch.where(_top_magnitudes(taus[i], k), taus[i], zero, out=out[i])
    return out


@euclidean_method(
    "ties",
    summary="TIES: trim to the top-density magnitudes, elect signs, disjoint mean, times scale",
    reference="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
    options=(
        MethodOption("density", float, 0.2, "fraction of each task vector's entries kept by the trim (paper: 0.2)",
                     minimum=0.0, maximum=1.0, exclusive_minimum=True),
        MethodOption("trim", str, "tensor", "'tensor': top-k per tensor; 'model': one threshold per expert over the whole model (two streaming passes)",
                     choices=("tensor", "model")),
        _SCALE,
    ),
)
def ties(
    taus: torch.Tensor,
    weights: torch.Tensor,
    *,
    context: TensorContext,
    density: float = 0.2,
    trim: str = "tensor",
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if not 0.0 < density <= 1.0:
        raise OftMergeError(f"TIES density must be in (0, 1], got {density}")
    if trim not in ("tensor", "model"):
        raise OftMergeError(f"TIES trim must be 'tensor' or 'model', got {trim!r}")
    thresholds = context.thresholds if trim == "model" else None
    trimmed = trim_magnitudes(taus, density, thresholds)
    positive = trimmed.sum(0) >= 0  # the elected sign (PEFT's calculate_majority_sign_mask(method="total"))
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    kept = 0
    for i in range(trimmed.shape[0]):  # one expert at a time: no (N, *shape) temporaries beyond the trim
        t = trimmed[i]
        agree = torch.where(positive, t > 0, t < 0)  # zeros never agree
        kept += int(torch.count_nonzero(t))
        total.add_(torch.where(agree, t, 0.0), alpha=float(weights[i]))
        count.add_(agree)
    merged = total.div_(count.clamp_(min=1.0))  # PEFT's disjoint_merge of the weighted values
    return merged.mul_(scale) if scale != 1.0 else merged, {"kept": kept / max(1, taus.numel())}


def _seed(seed: int, name: str, index: int) -> int:
    digest = hashlib.sha256(f"oftmerge-dare/{seed}/{name}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@euclidean_method(
    "dare",
    summary="DARE: drop entries with probability p, rescale by 1/(1-p) (seeded per tensor name), weighted sum, times scale",
    reference="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, ICML 2024",
    options=(
        MethodOption("p", float, 0.5, "drop probability (the paper uses up to 0.9 on 7B models)", minimum=0.0, maximum=1.0, exclusive_maximum=True),
        MethodOption("seed", int, 0, "base seed; each (tensor name, expert) gets its own stream from it"),
        _SCALE,
    ),
)
def dare(
    taus: torch.Tensor,
    weights: torch.Tensor,
    *,
    context: TensorContext,
    p: float = 0.5,
    seed: int = 0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if not 0.0 <= p < 1.0:
        raise OftMergeError(f"DARE drop probability p must be in [0, 1), got {p}")
    out = torch.zeros_like(taus[0])
    for i in range(taus.shape[0]):  # one stream per expert: masks do not depend on N or on the batch
        expert = context.experts[i] if context.experts is not None else i
        g = torch.Generator().manual_seed(_seed(seed, context.name, expert))
        keep = torch.rand(taus.shape[1:], generator=g, dtype=torch.float64) >= p
        out += float(weights[i]) * torch.where(keep, taus[i] / (1.0 - p), torch.zeros((), dtype=taus.dtype))
    return scale * out, {}


def _orthogonal_factor(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


@euclidean_method(
    "tsv",
    summary="TSV-M: per layer, top rank/N singular triplets of each task matrix, orthogonalised jointly, times scale",
    reference="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025",
    options=(
        MethodOption("fraction", float, 0.0, "share of the rank kept per expert; 0 means 1/N (the paper's choice)", minimum=0.0, maximum=1.0),
        _SCALE,
    ),
)
def tsv(
    taus: torch.Tensor,
    weights: torch.Tensor,
    *,
    context: TensorContext,
    fraction: float = 0.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    n = taus.shape[0]
    wt = _weighted(taus, weights)
    if taus.dim() != 3:  # biases, norms, convolutions: TSV-M averages them
        return scale * wt.sum(0) / weights.abs().sum(), {"svd": False}
    rank = min(taus.shape[1:])
    k = max(1, int(rank * fraction) if fraction > 0 else rank // n)
    if fraction > 0 and n * k > rank:
        raise OftMergeError(f"{context.name}: TSV fraction {fraction} keeps {n}x{k} > rank {rank} singular vectors")
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)  # (N, out, r), (N, r), (N, r, in)
    # triplets with (numerically) zero singular values carry nothing, but their arbitrary vectors
    # would disturb the joint orthogonalisation: LoRA task matrices have rank r << rank / N
    keep = [s[i, :k] > TSV_RANK_TOL * s[i, 0] for i in range(n)]
    u_cat = torch.cat([u[i, :, :k][:, keep[i]] for i in range(n)], dim=1)  # (out, sum k_i)
    s_cat = torch.cat([s[i, :k][keep[i]] for i in range(n)])
    v_cat = torch.cat([vh[i, :k, :][keep[i]].T for i in range(n)], dim=1)  # (in, sum k_i)
    if s_cat.numel() == 0:
        return torch.zeros_like(taus[0]), {"svd": True, "k": k, "kept": 0}
    merged = _orthogonal_factor(u_cat) @ torch.diag(s_cat) @ _orthogonal_factor(v_cat).T
    return scale * merged, {"svd": True, "k": k, "kept": int(s_cat.numel())}
