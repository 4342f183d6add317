"""The merge-method registry: one place that the API, the CLI and the docs read.

A method is a pure function over a stack of generators of one module,
``qs`` of shape ``(N, blocks, b, b)`` in the canonical sign (the ideal rotation
of each is ``cayley(q)``), and per-input weights ``(N,)``. It returns the merged
generator ``(blocks, b, b)`` and a dict of statistics for the report.

A method that is linear in the generators (its result depends on the inputs only through
the weighted sum ``S = sum_i w_i Q_i`` and the per-block norms ``||Q_i||_F``) also declares
``from_sum(s, block_norms, weights, **options)``, with ``s`` ``(blocks, b, b)`` (from
:func:`weighted_sum`) and ``block_norms`` ``(N, blocks)``. Callers that produce one large
generator at a time (decoupling at full width, where each ``Q_i`` is ``in x in``) then
accumulate ``S`` instead of stacking ``N`` copies; the stacked call gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from oftmerge.errors import OftMergeError

__all__ = [
    "EUCLIDEAN",
    "ORTHOGONAL",
    "MergeMethod",
    "MethodOption",
    "Registry",
    "available_methods",
    "describe_methods",
    "get_method",
    "merge_method",
    "methods_table",
    "weighted_sum",
]

MethodFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


def weighted_sum(qs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i qs[i]``, accumulated in input order (the order a streaming caller adds them in).

    ``torch.sum`` over the first dimension may reorder the additions for five or more inputs;
    this fixed order makes the stacked and the streamed merge agree bit for bit.
    """
    w = weights.to(qs.dtype)
    s = qs[0] * w[0]
    for i in range(1, qs.shape[0]):
        s.add_(qs[i] * w[i])
    return s


@dataclass(frozen=True)
class MethodOption:
    name: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    summary: str
    reference: str
    options: tuple[MethodOption, ...] = field(default_factory=tuple)
    #: True when weights only set relative importance (their scale does not matter);
    #: False when a weight scales each input's generator (``sequential``).
    normalized_weights: bool = True
    order_matters: bool = False
    #: for methods linear in the generators: the result from ``(S, block_norms, weights)`` (module docstring)
    from_sum: MethodFn | None = None

    def option_defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def resolve_options(self, given: dict[str, Any] | None) -> dict[str, Any]:
        opts = self.option_defaults()
        for key, value in (given or {}).items():
            if key not in opts:
                known = ", ".join(sorted(opts)) or "none"
                raise OftMergeError(f"method {self.name!r} has no option {key!r} (its options: {known})")
            opt = next(o for o in self.options if o.name == key)
            try:
                opts[key] = opt.type(value)
            except (TypeError, ValueError):
                raise OftMergeError(f"option {key!r} of method {self.name!r} expects {opt.type.__name__}, got {value!r}") from None
        return opts

    def __call__(self, qs: torch.Tensor, weights: torch.Tensor, **options: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.fn(qs, weights, **options)


class Registry:
    """Merge methods of one kind, by name, in registration order: what the API, the CLI choices and the docs read.

    Two instances: :data:`ORTHOGONAL` (so(b) methods over generators ``(N, blocks, b, b)``) and
    :data:`EUCLIDEAN` (methods over task vectors / residuals, ``fn(taus, weights, *, context, **options)``).
    """

    def __init__(self, kind: str, label: str, flag: str):
        self.kind = kind  #: "so(d)" or "euclidean"
        self.label = label  #: how an error message names a method of this kind
        self.flag = flag  #: the CLI option that chooses one
        self._methods: dict[str, MergeMethod] = {}

    def add(self, method: MergeMethod) -> MergeMethod:
        if method.name in self._methods:
            raise RuntimeError(f"{self.label} {method.name!r} registered twice")
        self._methods[method.name] = method
        return method

    def all(self) -> dict[str, MergeMethod]:
        return dict(self._methods)

    def get(self, name: str) -> MergeMethod:
        try:
            return self._methods[name]
        except KeyError:
            raise OftMergeError(f"unknown {self.label} {name!r}; choose one of: {', '.join(self._methods)}") from None


#: so(b) methods: ``oftmerge merge --method``, ``oftmerge decouple --orthogonal``
ORTHOGONAL = Registry("so(d)", "merge method", "oftmerge merge --method; oftmerge decouple --orthogonal")
#: Euclidean methods: ``oftmerge decouple --euclidean``
EUCLIDEAN = Registry("euclidean", "Euclidean merge method", "oftmerge decouple --euclidean")
REGISTRIES = (ORTHOGONAL, EUCLIDEAN)


def merge_method(
    name: str,
    *,
    summary: str,
    reference: str,
    options: tuple[MethodOption, ...] = (),
    normalized_weights: bool = True,
    order_matters: bool = False,
    from_sum: MethodFn | None = None,
    registry: Registry = ORTHOGONAL,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as merge method ``name`` of ``registry`` (see the module docstring for the signature)."""

    def deco(fn: MethodFn) -> MethodFn:
        registry.add(MergeMethod(name, fn, summary, reference, tuple(options), normalized_weights, order_matters, from_sum))
        return fn

    return deco


def available_methods() -> dict[str, MergeMethod]:
    """All registered so(b) methods by name, in registration order."""
    return ORTHOGONAL.all()


def get_method(name: str) -> MergeMethod:
    return ORTHOGONAL.get(name)


def describe_methods() -> str:
    """The text ``oftmerge methods`` prints: every method of every registry, with its options."""
    titles = {
        "so(d)": "so(b) methods (oftmerge merge --method; oftmerge decouple --orthogonal)",
        "euclidean": "Euclidean methods for residuals and full weights (oftmerge decouple --euclidean)",
    }
    lines: list[str] = []
    for registry in REGISTRIES:
        lines.append(titles[registry.kind])
        for m in registry.all().values():
            lines.append(f"  {m.name:<12} {m.summary}")
            lines.append(f"  {'':<12} reference: {m.reference}")
            for o in m.options:
                lines.append(f"  {'':<12} --option {o.name}=<{o.type.__name__}> (default {o.default}): {o.help}")
        lines.append("")
    return "\n".join(lines)


def methods_table() -> str:
    """The Markdown table of every method and option (the documentation's methods page is generated from it)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| kind | method | what it does | options (default) | reference |", "|---|---|---|---|---|"]
    for registry in REGISTRIES:
        for m in registry.all().values():
            opts = "<br>".join(f"`{o.name}` ({o.default}): {cell(o.help)}" for o in m.options) or "—"
            lines.append(f"| {registry.kind} | `{m.name}` | {cell(m.summary)} | {opts} | {cell(m.reference)} |")
    return "\n".join(lines) + "\n"
