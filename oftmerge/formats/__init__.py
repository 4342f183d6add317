"""Reading and writing checkpoints: adapter formats behind one interface, model checkpoints, shards.

Formats (:mod:`oftmerge.formats.base`): the PEFT OFT adapter directory of every release
(:mod:`~oftmerge.formats.peft_oft` reads, :mod:`~oftmerge.formats.writer` writes) is the first
entry. :mod:`~oftmerge.formats.lora` reads PEFT LoRA experts (decoupling),
:mod:`~oftmerge.formats.checkpoint` model checkpoints, :mod:`~oftmerge.formats.shards` writes
the ``transformers`` layout.
"""

from oftmerge.formats.base import available_formats, detect_format, get_format, read_oft_adapter, register_format
from oftmerge.formats.io import TensorFile
from oftmerge.formats.peft_oft import RELEASES, ModuleSpec, OftAdapter, read_adapter, release_family
from oftmerge.formats.writer import PEFT_OFT

__all__ = [
    "PEFT_OFT",
    "RELEASES",
    "ModuleSpec",
    "OftAdapter",
    "TensorFile",
    "available_formats",
    "detect_format",
    "get_format",
    "read_adapter",
    "read_oft_adapter",
    "register_format",
    "release_family",
]
