"""Reading and writing checkpoints: PEFT OFT adapters of every release, safely and atomically."""

from oftmerge.formats.io import TensorFile, atomic_directory
from oftmerge.formats.peft_oft import RELEASES, ModuleSpec, OftAdapter, read_adapter, release_family

__all__ = [
    "RELEASES",
    "ModuleSpec",
    "OftAdapter",
    "TensorFile",
    "atomic_directory",
    "read_adapter",
    "release_family",
]
