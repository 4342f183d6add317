"""What to compute and how to run it: frozen, validated, serialisable configuration objects.

* :class:`MergeConfig` — merge OFT adapters (into an adapter, or folded into a base model);
* :class:`FoldConfig` — fold one adapter (or a merge) into its base model;
* :class:`DecoupleConfig` — orthogonal-residual decoupling of LoRA / full experts;
* :class:`RunOptions` — how to run any of them: threads, shard size, overwrite, dry run,
  progress (a device option will join).

Each is validated once, when it is built: a bad value raises
:class:`~oftmerge.errors.OftMergeError` that names it. The API functions accept them
(``merge_adapters(MergeConfig(...), run=RunOptions(...))``) as well as plain keywords, the CLI
builds them from its arguments, and ``to_dict()`` / ``from_dict()`` give a JSON-able form (what a
recipe file stores)::

    >>> from oftmerge.config import MergeConfig
    >>> c = MergeConfig(["adapters/oft-upper", "adapters/oft-reverse"], weights=[1, 0.5])
    >>> c.to_dict()["weights"]
    [1.0, 0.5]
    >>> MergeConfig.from_dict(c.to_dict()) == c
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from oftmerge.errors import OftMergeError
from oftmerge.formats.shards import parse_size
from oftmerge.formats.sources import ResolvedSource
from oftmerge.methods import get_method
from oftmerge.methods.decoupling import MAX_ROTATION, ON_DOMAIN_ERROR, TARGETS, Settings
from oftmerge.methods.euclidean import get_euclidean_method

__all__ = ["DecoupleConfig", "FoldConfig", "MergeConfig", "RunOptions"]

OUTPUTS = ("adapter", "model")
#: what a merge does with the heads and biases its inputs saved (see :mod:`oftmerge.plan.saved`)
SAVED_MODULES = ("identical", "mean", "first", "drop")


def _path_or_object(value: Any) -> Any:
    """Paths as ``str``; already-read objects (an ``OftAdapter``, a ``MergeResult``) as they are."""
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else value


def _describe(value: Any) -> Any:
    """The JSON form of an input: its path (or an in-memory object's label); a Hub input as ``ns/name@commit``."""
    if isinstance(value, str):
        return value
    if isinstance(value, ResolvedSource) and value.is_hub:
        return f"{value.repo_id}@{value.commit or value.revision or 'main'}"
    path = getattr(value, "path", None)
    return str(path) if path is not None else f"<{type(value).__name__}>"


def _check_weights(weights: Sequence[float] | None, inputs: Sequence[Any], what: str) -> tuple[float, ...] | None:
    if weights is None:
        return None
    try:
        ws = tuple(float(w) for w in weights)
    except (TypeError, ValueError):
        raise OftMergeError(f"weights must be numbers, got {list(weights)!r}") from None
    if len(ws) != len(inputs):
        raise OftMergeError(f"got {len(ws)} weights for {len(inputs)} {what}s; give one weight per {what}")
    for x, w in zip(inputs, ws):
        if not math.isfinite(w) or w == 0:
            raise OftMergeError(
                f"weight {w!r} for {_describe(x)}: weights must be finite and non-zero (drop the {what} instead of weight 0)"
            )
    return ws


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form: inputs by path, tuples as lists, mappings as dicts."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.compare:
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build from :meth:`to_dict`'s form; unknown keys are an error that names them."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise OftMergeError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**dict(data))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _describe(value)


@dataclass(frozen=True)
class RunOptions(_Serialisable):
    """How a command runs (nothing here changes what it computes, except ``threads`` for decoupling's LAPACK calls).

    Args:
        threads: torch intra-op threads for the arithmetic (restored afterwards; None leaves
            torch's setting). Merges and folds are many small batched products: one thread is
            the default. Decoupled outputs are bit-identical for one thread count.
        shard_size: largest shard of a model output, ``"5GB"`` style or bytes.
        overwrite: replace an existing output (never an input).
        dry_run: plan only: read configs and shapes, write nothing.
        progress: ``progress(done, total, name)`` after each module or tensor (not serialised).
    """

    threads: int | None = 1
    shard_size: int | str = "5GB"
    overwrite: bool = False
    dry_run: bool = False
    progress: Callable[[int, int, str], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise OftMergeError(f"threads must be a whole number >= 1 (or None for torch's setting), got {self.threads!r}")
        parse_size(self.shard_size)


@dataclass(frozen=True)
class MergeConfig(_Serialisable):
    """A merge of OFT adapters (the arguments of :func:`oftmerge.merge_adapters`, which documents each).

    ``adapters`` are directories (or already-read :class:`~oftmerge.formats.OftAdapter` objects);
    ``output="model"`` folds the merge into ``base``.
    """

    adapters: tuple[Any, ...]
    method: str = "orthomerge"
    weights: tuple[float, ...] | None = None
    scale: float = 1.0
    cayley: str = "auto"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    base: str | None = None
    peft_release: str | tuple[str | None, ...] | None = None
    allow_base_mismatch: bool = False
    output: str = "adapter"
    saved_modules: str = "identical"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.saved_modules not in SAVED_MODULES:
            raise OftMergeError(f"saved_modules={self.saved_modules!r}: choose one of {', '.join(SAVED_MODULES)}")
        adapters = (self.adapters,) if isinstance(self.adapters, (str, os.PathLike)) else tuple(self.adapters)
        set_(self, "adapters", tuple(_path_or_object(a) for a in adapters))
        if not self.adapters:
            raise OftMergeError("no adapters given: pass at least one adapter directory")
        if self.output not in OUTPUTS or (self.output == "model" and self.base is None):
            raise OftMergeError(f"output={self.output!r}: use 'adapter', or 'model' together with base=<base model directory>")
        try:
            set_(self, "scale", float(self.scale))
        except (TypeError, ValueError):
            raise OftMergeError(f"scale must be a finite number, got {self.scale!r}") from None
        if not math.isfinite(self.scale):
            raise OftMergeError(f"scale must be a finite number, got {self.scale!r}")
        if isinstance(self.peft_release, (list, tuple)):
            set_(self, "peft_release", tuple(self.peft_release))
            if len(self.peft_release) != len(self.adapters):
                raise OftMergeError(f"peft_release: got {len(self.peft_release)} values for {len(self.adapters)} adapters")
        set_(self, "weights", _check_weights(self.weights, self.adapters, "adapter"))
        set_(self, "method_options", get_method(self.method).resolve_options(dict(self.method_options or {})))
        if self.base is not None:
            set_(self, "base", os.fspath(self.base))

    def releases(self) -> list[str | None]:
        """The PEFT release override of each adapter (None: detect it)."""
        if isinstance(self.peft_release, tuple):
            return list(self.peft_release)
        return [self.peft_release] * len(self.adapters)


@dataclass(frozen=True)
class FoldConfig(_Serialisable):
    """A fold of one adapter (or a :class:`~oftmerge.MergeResult`) into its base model (see :func:`oftmerge.fold_adapter`)."""

    adapter: Any
    base: str | ResolvedSource  #: a directory or Hub id (or one already resolved)
    peft_release: str | None = None
    hash_base: bool = False
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter", _path_or_object(self.adapter))
        if self.base is None:
            raise OftMergeError("give the base model directory or Hub id (base=... / --base) to fold into")
        object.__setattr__(self, "base", _path_or_object(self.base))


@dataclass(frozen=True)
class DecoupleConfig(_Serialisable):
    """Orthogonal-residual decoupling of LoRA adapters and full finetunes (see :func:`oftmerge.decouple_merge`)."""

    base: str
    experts: tuple[str, ...]
    euclidean: str = "ties"
    orthogonal: str | None = "orthomerge"
    target: str = "global"
    procrustes: str = "robust"
    weights: tuple[float, ...] | None = None
    euclidean_options: Mapping[str, Any] = field(default_factory=dict)
    orthogonal_options: Mapping[str, Any] = field(default_factory=dict)
    anchor: float = 1e-6
    cayley_margin: float = 1e-2
    max_rotation: float = MAX_ROTATION
    on_domain_error: str = "log"
    euclidean_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from oftmerge.linalg.procrustes import SOLVERS

        set_ = object.__setattr__
        if not isinstance(self.base, (str, os.PathLike)):
            raise OftMergeError(f"give the base model directory or Hub id (base=... / --base), got {self.base!r}")
        set_(self, "base", os.fspath(self.base))
        if isinstance(self.experts, (str, os.PathLike)):
            experts: tuple[Any, ...] = (self.experts,)
        else:
            try:
                experts = tuple(self.experts)
            except TypeError:
                raise OftMergeError(f"experts must be a list of directories or Hub ids, got {self.experts!r}") from None
        bad = [e for e in experts if not isinstance(e, (str, os.PathLike))]
        if bad:
            raise OftMergeError(f"experts must be directories or Hub ids (str or path), got {bad[0]!r}")
        set_(self, "experts", tuple(os.fspath(e) for e in experts))
        set_(self, "euclidean_options", get_euclidean_method(self.euclidean).resolve_options(dict(self.euclidean_options or {})))
        if self.orthogonal in (None, "none", ""):
            set_(self, "orthogonal", None)
            set_(self, "orthogonal_options", {})
        else:
            set_(self, "orthogonal_options", get_method(self.orthogonal).resolve_options(dict(self.orthogonal_options or {})))
        for value, allowed, what in ((self.target, TARGETS, "target"), (self.procrustes, SOLVERS, "procrustes"),
                                     (self.on_domain_error, ON_DOMAIN_ERROR, "on_domain_error")):  # fmt: skip
            if value not in allowed:
                raise OftMergeError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
        for number, what in ((self.anchor, "anchor"), (self.cayley_margin, "cayley_margin"), (self.max_rotation, "max_rotation")):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not (math.isfinite(number) and number >= 0):
                raise OftMergeError(f"{what} must be a finite number >= 0, got {number!r}")
        only = self.euclidean_only
        set_(self, "euclidean_only", (only,) if isinstance(only, str) else tuple(only))
        for pattern in self.euclidean_only:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise OftMergeError(f"euclidean_only pattern {pattern!r} is not a regular expression ({exc})") from None
        if not self.experts:
            raise OftMergeError("no experts given: pass at least one LoRA adapter or finetuned model directory")
        set_(self, "weights", _check_weights(self.weights, self.experts, "expert"))

    def settings(self) -> Settings:
        """The per-tensor settings of :func:`oftmerge.methods.decoupling.decompose`."""
        return Settings(
            self.euclidean, dict(self.euclidean_options), self.orthogonal, dict(self.orthogonal_options), self.target,
            self.procrustes, self.anchor, self.cayley_margin, self.max_rotation, self.on_domain_error, self.euclidean_only,
        )  # fmt: skip
