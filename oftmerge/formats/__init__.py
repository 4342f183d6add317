"""Reading and writing checkpoints: adapter formats behind one interface, model checkpoints, shards.

Formats (:mod:`oftmerge.formats.base`): the PEFT OFT adapter directory of every release
(:mod:`~oftmerge.formats.peft_oft` reads, :mod:`~oftmerge.formats.writer` writes) is the first
entry. :mod:`~oftmerge.formats.lora` reads PEFT LoRA experts (decoupling),
:mod:`~oftmerge.formats.checkpoint` model checkpoints, :mod:`~oftmerge.formats.shards` writes
the ``transformers`` layout. :mod:`~oftmerge.formats.diffusion` is the interface of single-file
diffusion OFT formats: :mod:`~oftmerge.formats.lycoris`, :mod:`~oftmerge.formats.kohya`,
:mod:`~oftmerge.formats.onetrainer` (and :mod:`~oftmerge.formats.peft_view`, a PEFT adapter seen as one).
"""

from oftmerge.formats import kohya, lycoris, onetrainer  # noqa: F401  (the diffusion formats register themselves)
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
