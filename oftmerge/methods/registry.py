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

__all__ = ["MergeMethod", "MethodOption", "available_methods", "get_method", "merge_method", "weighted_sum"]

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


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    summary: str,
    reference: str,
    options: tuple[MethodOption, ...] = (),
    normalized_weights: bool = True,
    order_matters: bool = False,
    from_sum: MethodFn | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn`` as merge method ``name`` (see the module docstring for the signature)."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise RuntimeError(f"merge method {name!r} registered twice")
        _REGISTRY[name] = MergeMethod(name, fn, summary, reference, tuple(options), normalized_weights, order_matters, from_sum)
        return fn

    return deco


def _load_builtin() -> None:
    from oftmerge.methods import oft  # noqa: F401  (registers on import)


def available_methods() -> dict[str, MergeMethod]:
    """All registered methods by name, in registration order."""
    _load_builtin()
    return dict(_REGISTRY)


def get_method(name: str) -> MergeMethod:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OftMergeError(f"unknown merge method {name!r}; choose one of: {', '.join(_REGISTRY)}") from None
