"""Versions of the libraries that shape an output, for provenance records and model cards."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Sequence

from oftmerge._version import __version__

__all__ = ["LIBRARIES", "library_versions", "peft_version"]

#: the libraries whose versions a folded or decoupled model records
LIBRARIES = ("torch", "peft", "transformers", "safetensors", "huggingface_hub")


def peft_version() -> str | None:
    """The installed PEFT's ``__version__``, without importing PEFT (which imports transformers) when not yet loaded."""
    module = sys.modules.get("peft")
    if module is not None:
        return module.__version__
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - peft is optional for the core
        return None


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    """``{"oftmerge": ..., name: version}`` for each of ``names`` that is installed (local build tags dropped)."""
    versions = {"oftmerge": __version__}
    for name in names:
        version = _installed(name)
        if version is not None:
            versions[name] = version.split("+")[0]
    return versions


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
