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

import math
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


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class MethodOption:
    """One option of a merge method: its type, default, help, and the values it accepts.

    Values are coerced strictly (:meth:`coerce`): a ``bool`` from ``True``/``False`` or the strings
    true/false/yes/no/1/0 (any case); an ``int`` from an integral number or numeral (``1.0`` yes,
    ``1.7`` no); a ``float`` from a finite number or numeral; a ``str`` from a string among
    ``choices`` when given. Numbers must lie within ``minimum``/``maximum`` (inclusive unless
    ``exclusive_minimum``/``exclusive_maximum``).

    >>> MethodOption("per_block", bool, False, "").coerce("No")
    False
    >>> MethodOption("tol", float, 1e-4, "", minimum=0.0, maximum=1.0).describe_range()
    'in [0, 1]'
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] | None = None

    def describe_range(self) -> str:
        """What the option accepts beyond its type, for messages and the docs ('' when any value of the type)."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"in {'(' if self.exclusive_minimum else '['}{lo:g}, {hi:g}{')' if self.exclusive_maximum else ']'}"
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {hi:g}"
        return ""

    def coerce(self, value: Any, method: str = "") -> Any:
        """``value`` as this option's type, checked against its range; :class:`OftMergeError` (one line) otherwise."""
        where = f"option {self.name!r}" + (f" of method {method!r}" if method else "")
        got = self._convert(value)
        if got is None:
            expects = {bool: "true/false (or yes/no, 1/0)", int: "a whole number", float: "a finite number"}.get(self.type, self.type.__name__)
            raise OftMergeError(f"{where} expects {self.type.__name__}, got {value!r} (give {expects})")
        if self.choices is not None and got not in self.choices:
            raise OftMergeError(f"{where} must be {self.describe_range()}, got {value!r}")
        if self.type in (int, float):
            lo, hi = self.minimum, self.maximum
            below = lo is not None and (got <= lo if self.exclusive_minimum else got < lo)
            above = hi is not None and (got >= hi if self.exclusive_maximum else got > hi)
            if below or above:
                raise OftMergeError(f"{where} must be {self.describe_range()}, got {value!r}")
        return got

    def _convert(self, value: Any) -> Any:
        """The value as ``self.type``, or None when it is not one (no silent truncation, no truthiness)."""
        text = value.strip() if isinstance(value, str) else None
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            return None
        if isinstance(value, bool):  # True is an int to Python, not to a user
            return None
        if self.type is int:
            if isinstance(value, int):
                return value
            number: float | None = None
            if isinstance(value, float):
                number = value
            elif text is not None:
                try:
                    return int(text)
                except ValueError:
                    try:
                        number = float(text)
                    except ValueError:
                        return None
            return int(number) if number is not None and math.isfinite(number) and number.is_integer() else None
        if self.type is float:
            try:
                number = float(text if text is not None else value) if isinstance(value, (int, float, str)) else None
            except (ValueError, OverflowError):
                return None
            return number if number is not None and math.isfinite(number) else None
        if self.type is str:
            return value if isinstance(value, str) else None
        try:
            return self.type(value)
        except (TypeError, ValueError, OverflowError):
            return None


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
            opts[key] = opt.coerce(value, self.name)
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
                accepts = f" ({o.describe_range()})" if o.describe_range() else ""
                lines.append(f"  {'':<12} --option {o.name}=<{o.type.__name__}> (default {o.default}): {o.help}{accepts}")
        lines.append("")
    return "\n".join(lines)


def methods_table() -> str:
    """The Markdown table of every method and option (the documentation's methods page is generated from it)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| kind | method | what it does | options (default) | reference |", "|---|---|---|---|---|"]
    for registry in REGISTRIES:
        for m in registry.all().values():
            opts = "<br>".join(
                f"`{o.name}` ({o.default}): {cell(o.help)}" + (f"; {cell(o.describe_range())}" if o.describe_range() else "") for o in m.options
            ) or "—"
            lines.append(f"| {registry.kind} | `{m.name}` | {cell(m.summary)} | {opts} | {cell(m.reference)} |")
    return "\n".join(lines) + "\n"
