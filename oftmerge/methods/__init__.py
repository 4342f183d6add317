"""Merge methods, registered by name in one registry type (:class:`~oftmerge.methods.registry.Registry`).

so(b) methods (:data:`~oftmerge.methods.registry.ORTHOGONAL`, :func:`available_methods`) live in
:mod:`~oftmerge.methods.oft`; Euclidean methods for task vectors and residuals
(:data:`~oftmerge.methods.registry.EUCLIDEAN`) in :mod:`~oftmerge.methods.euclidean`; the
per-tensor rotation/residual split in :mod:`~oftmerge.methods.decoupling`. Importing this package
registers the built-in methods.
"""

from oftmerge.methods import euclidean, oft  # noqa: F401  (register the built-in methods)
from oftmerge.methods.registry import (
    EUCLIDEAN,
    ORTHOGONAL,
    MergeMethod,
    MethodOption,
    Registry,
    available_methods,
    describe_methods,
    get_method,
    merge_method,
    methods_table,
    weighted_sum,
)

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
