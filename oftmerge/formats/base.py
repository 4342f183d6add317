"""The adapter-format interface: each format is one module with ``detect``, ``read`` and ``write``.

A format reads a checkpoint into the frozen adapter description the merge works on
(:class:`~oftmerge.formats.peft_oft.OftAdapter`: per-module generators, rotation map, rotated
side, block grid, extras), and writes a merged one back. The merge, fold and inspect code only
see that description, so adding a format is a module in :mod:`oftmerge.formats` that registers
itself with :func:`register_format`, plus its tests::

    class MyFormat:
        name = "my-format"
        def detect(self, path): ...         # True when `path` is a checkpoint of this format
        def read(self, path, **options): ...  # -> OftAdapter
        def write(self, directory, tensors, config, extra_files): ...  # files into `directory`

    register_format(MyFormat())

:func:`detect_format` picks the format of a path (the first registered one whose ``detect`` says
yes), :func:`read_oft_adapter` reads through it. Writing is always into a directory the engine
commits atomically (:mod:`oftmerge.engine.commit`); a format never replaces an output itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from oftmerge.errors import AdapterFormatError

if TYPE_CHECKING:
    import torch

    from oftmerge.formats.peft_oft import OftAdapter

__all__ = ["AdapterFormat", "available_formats", "detect_format", "get_format", "read_oft_adapter", "register_format"]


class AdapterFormat(Protocol):
    """What a format module provides (see the module docstring)."""

    name: str

    def detect(self, path: Path) -> bool: ...

    def read(self, path: Path, **options: Any) -> OftAdapter: ...

    def write(
        self, directory: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], extra_files: Mapping[str, bytes]
    ) -> None: ...


_FORMATS: dict[str, AdapterFormat] = {}


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    if fmt.name in _FORMATS:
        raise RuntimeError(f"adapter format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def available_formats() -> dict[str, AdapterFormat]:
    """The registered formats by name, in registration order."""
    from oftmerge import formats  # noqa: F401  (the package registers the built-in formats)

    return dict(_FORMATS)


def get_format(name: str) -> AdapterFormat:
    fmts = available_formats()
    try:
        return fmts[name]
    except KeyError:
        raise AdapterFormatError(f"unknown adapter format {name!r}; choose one of: {', '.join(fmts)}") from None


def detect_format(path: str | os.PathLike[str]) -> AdapterFormat:
    """The format of the checkpoint at ``path``; a one-line error naming the formats tried when none matches."""
    p = Path(path)
    fmts = available_formats()
    for fmt in fmts.values():
        if fmt.detect(p):
            return fmt
    # the first format's reader gives the precise reason (missing config, wrong peft_type, ...)
    first = next(iter(fmts.values()))
    first.read(p)
    raise AdapterFormatError(f"{p}: not a checkpoint of any known adapter format ({', '.join(fmts)})")  # pragma: no cover


def read_oft_adapter(path: str | os.PathLike[str], *, format: str | None = None, **options: Any) -> OftAdapter:
    """Read the adapter at ``path`` with its detected format (or ``format``)."""
    fmt = get_format(format) if format is not None else detect_format(path)
    return fmt.read(Path(path), **options)
