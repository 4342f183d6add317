"""The exception family of oftmerge.

Every error a user can cause derives from :class:`OftMergeError` (itself a
``ValueError``), and its message says *what* is wrong, *where* (file, module,
shape) and *what to do*.
"""

from __future__ import annotations

__all__ = [
    "OftMergeError",
    "AdapterFormatError",
    "IncompatibleAdaptersError",
    "NumericalError",
    "OutputExistsError",
]


class OftMergeError(ValueError):
    """Base class of every error oftmerge raises on bad input."""


class AdapterFormatError(OftMergeError):
    """A file is missing, unreadable, or not a PEFT OFT adapter we understand."""


class IncompatibleAdaptersError(OftMergeError):
    """Adapters cannot be merged together (other base model, shapes, grids, sides)."""


class NumericalError(OftMergeError):
    """Inputs or results are not finite, or a map is used outside its domain."""


class OutputExistsError(OftMergeError):
    """The output path exists and ``overwrite`` was not given."""
