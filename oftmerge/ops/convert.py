"""Upgrade legacy OFT checkpoints to the layout current PEFT loads, where that is exact.

=================  ===========================================================
input              what ``convert_adapter`` does
=================  ===========================================================
PEFT 0.7-0.13      refuses: those rotate the output side of each layer, PEFT
                   >= 0.14 the input side; no input-side adapter equals them.
                   Fold them into the base model instead (exact).
PEFT 0.14-0.15     exact when every ``oft_s`` is 1 (``Q = 0.5 (A - A^T)`` is
                   packed as its upper triangle); refuses otherwise, because
                   current OFT has no per-row scale.
PEFT 0.16-0.17     exact for the exact Cayley map (``peft_version`` is added);
                   with the Cayley-Neumann map PEFT >= 0.18 uses a different
                   series, so it refuses unless ``approximate=True``, which
                   keeps the generator and reports how far the rotation moved.
PEFT >= 0.18       already current: copied through unchanged (tensors bit for bit).
=================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import os

from oftmerge.engine.guard import check_nonempty
from oftmerge.errors import OftMergeError
from oftmerge.formats import read_oft_adapter
from oftmerge.formats.sources import resolve_source, source_record
from oftmerge.linalg import RotationMap
from oftmerge.ops.merge import merge_adapters
from oftmerge.ops.merge_result import MergeResult

__all__ = ["convert_adapter"]


def convert_adapter(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    peft_release: str | None = None,
    approximate: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Write ``src`` (an OFT adapter of any PEFT release; a directory or Hub id) to ``dst`` in the current layout."""
    source = resolve_source(src, "adapter")
    adapter = read_oft_adapter(source.path, peft_release=peft_release)
    where = f"{adapter.path} (PEFT {adapter.release_source})"
    if adapter.release == "0.13":
        raise OftMergeError(
            f"{where}: PEFT 0.7-0.13 OFT rotates the output side of each layer (W' = R^T W); PEFT >= 0.14 "
            "rotates the input side (W' = W R^T), so no current adapter reproduces it. Fold it into the base "
            "model instead (`oftmerge fold ADAPTER --base BASE -o OUT`), which is exact."
        )
    if adapter.release == "0.15" and adapter.has_nontrivial_scale():
        raise OftMergeError(
            f"{where}: its oft_s scales are not all 1 (PEFT 0.14-0.15 trained a per-output-row scale), and OFT "
            "in PEFT >= 0.16 has no such scale, so the conversion cannot be exact. Fold it into the base model "
            "instead (`oftmerge fold`), which is exact."
        )
    cayley = "auto"
    rmap = adapter.rotation_map
    if rmap.kind == "neumann" and rmap.variant == "0.16":
        if not approximate:
            raise OftMergeError(
                f"{where}: uses PEFT 0.16-0.17's Cayley-Neumann series ({rmap.terms} terms); PEFT >= 0.18 applies "
                "a different series to the same weights, so no conversion is exact. Pass approximate=True "
                "(--approximate) to keep the generator and get the change reported, or fold it into the base "
                "model with its own series (`oftmerge fold`), which is exact."
            )
        cayley = f"neumann:{rmap.terms}"
    result = merge_adapters([adapter], cayley=cayley)
    if rmap.kind == "neumann" and rmap.variant == "0.16":
        new = RotationMap("neumann", rmap.terms, "0.18")
        worst = 0.0
        for name in adapter.modules:
            q = adapter.generator(name)
            worst = max(worst, float((rmap.rotation(q) - new.rotation(q)).abs().max()))
        result.warnings.append(
            f"approximate conversion: the largest change of a rotation entry between the 0.16-0.17 and the "
            f"0.18+ series is {worst:.3g}"
        )
    hub = source_record(source)
    if hub is not None:  # the provenance names the Hub input, not only its snapshot
        result.inputs = [dataclasses.replace(info, hub=hub) for info in result.inputs]
    result.method = "convert"
    result.options = {"approximate": approximate}
    result.save(check_nonempty(dst), overwrite=overwrite)
    return result
