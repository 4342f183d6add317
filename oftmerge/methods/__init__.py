"""Merge methods, registered by name (see :func:`available_methods`)."""

from oftmerge.methods.registry import MergeMethod, MethodOption, available_methods, get_method, merge_method, weighted_sum

__all__ = ["MergeMethod", "MethodOption", "available_methods", "get_method", "merge_method", "weighted_sum"]
