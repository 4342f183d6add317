"""oftmerge: merge PEFT OFT adapters on the orthogonal group (OrthoMerge).

>>> import oftmerge
>>> result = oftmerge.merge_adapters(["adapters/oft-upper", "adapters/oft-reverse"])  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
>>> result.save("merged-adapter")  # doctest: +SKIP
"""

from oftmerge._version import __version__
from oftmerge.ops.decouple import DecoupleResult, decouple_merge
from oftmerge.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    NumericalError,
    OftMergeError,
    OutputExistsError,
)
from oftmerge.formats import OftAdapter, read_adapter
from oftmerge.ops.merge import MergeResult, merge_adapters
from oftmerge.methods import available_methods
from oftmerge.ops.fold import FoldResult, fold_adapter
from oftmerge.integrations.hub import push_folder

__all__ = [
    "AdapterFormatError",
    "DecoupleResult",
    "IncompatibleAdaptersError",
    "MergeResult",
    "NumericalError",
    "OftAdapter",
    "OftMergeError",
    "OutputExistsError",
    "__version__",
    "available_methods",
    "decouple_merge",
    "merge_adapters",
    "read_adapter",
    "FoldResult",
    "fold_adapter",
    "push_folder",
]
