"""so(d) and SO(d) math on batches of blocks, shape ``(blocks, b, b)``.

Pure functions over tensors: nothing here opens a file or knows about PEFT's
checkpoint layouts. Solves run in float64; callers cast results back.
"""

from oftmerge.linalg.cayley import (
    RotationMap,
    cayley,
    coft_project,
    inverse_cayley,
    neumann_series,
)
from oftmerge.linalg.groups import (
    finest_block,
    karcher_mean,
    log_orthogonal,
    orthogonality_error,
    polar,
    regrid_blocks,
    split_blocks,
)
from oftmerge.linalg.norms import scaled_norm, weight_unit
from oftmerge.linalg.procrustes import (
    CayleyDomainError,
    ProcrustesInfo,
    cayley_generator,
    cayley_margin,
    orthogonal_procrustes,
    special_polar,
)
from oftmerge.linalg.skew import (
    block_size_from_packed,
    pack_skew,
    skew_from_full,
    unpack_skew,
)

__all__ = [
    "CayleyDomainError",
    "ProcrustesInfo",
    "RotationMap",
    "block_size_from_packed",
    "cayley",
    "cayley_generator",
    "cayley_margin",
    "coft_project",
    "finest_block",
    "inverse_cayley",
    "karcher_mean",
    "log_orthogonal",
    "neumann_series",
    "orthogonality_error",
    "orthogonal_procrustes",
    "pack_skew",
    "polar",
    "regrid_blocks",
    "scaled_norm",
    "skew_from_full",
    "special_polar",
    "split_blocks",
    "unpack_skew",
    "weight_unit",
]
