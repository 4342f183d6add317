"""oftmerge: merge PEFT OFT adapters on the orthogonal group (OrthoMerge).

>>> import oftmerge
>>> result = oftmerge.merge_adapters(["adapters/oft-upper", "adapters/oft-reverse"])  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
>>> result.save("merged-adapter")  # doctest: +SKIP

The same with explicit configuration objects (what recipes store)::

    config = oftmerge.MergeConfig(["adapters/oft-upper", "adapters/oft-reverse"], weights=[1, 0.5])
    plan = oftmerge.plan_merge(config)           # what would be done, nothing merged
    result = oftmerge.merge_adapters(config, out_dir="merged", run=oftmerge.RunOptions(overwrite=True))
"""

from oftmerge._version import __version__
from oftmerge.config import DecoupleConfig, FoldConfig, MergeConfig, RunOptions
from oftmerge.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    NumericalError,
    OftMergeError,
    OutputExistsError,
)
from oftmerge.formats import OftAdapter, read_adapter
from oftmerge.integrations.hub import push_folder
from oftmerge.methods import available_methods
from oftmerge.ops.decouple import DecoupleResult, decouple_merge
from oftmerge.ops.fold import FoldResult, fold_adapter
from oftmerge.ops.merge import merge_adapters
from oftmerge.ops.merge_result import MergeResult
from oftmerge.plan.decouple import plan_decouple
from oftmerge.plan.fold import plan_fold
from oftmerge.plan.merge import plan_merge

__all__ = [
    "AdapterFormatError",
    "DecoupleConfig",
    "DecoupleResult",
    "FoldConfig",
    "FoldResult",
    "IncompatibleAdaptersError",
    "MergeConfig",
    "MergeResult",
    "NumericalError",
    "OftAdapter",
    "OftMergeError",
    "OutputExistsError",
    "RunOptions",
    "__version__",
    "available_methods",
    "decouple_merge",
    "fold_adapter",
    "merge_adapters",
    "plan_decouple",
    "plan_fold",
    "plan_merge",
    "push_folder",
    "read_adapter",
]
