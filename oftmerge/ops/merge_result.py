"""What a merge of OFT adapters produced: the merged adapter in memory, its report, its provenance."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine.adapter import write_adapter
from oftmerge.errors import OftMergeError
from oftmerge.formats.io import TensorDict
from oftmerge.formats.peft_oft import RELEASES, OftAdapter, adapter_from_tensors
from oftmerge.formats.sources import describe_record
from oftmerge.formats.writer import PEFT_OFT, BlockConfig
from oftmerge.integrations.cards import adapter_card
from oftmerge.linalg import RotationMap
from oftmerge.provenance import library_versions

__all__ = ["InputInfo", "MergeResult", "ModuleReport"]


@dataclass(frozen=True)
class InputInfo:
    path: str
    sha256: str
    release: str
    release_source: str
    rotation_map: str
    modules: int
    weight: float
    hub: Mapping[str, Any] | None = None  #: for a Hub input: ``repo_id``, ``revision`` asked for, ``commit``

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d["hub"] is None:  # local inputs: the record as before
            del d["hub"]
        else:
            d["hub"] = dict(d["hub"])
        return d


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module: which inputs, norms, the method's statistics."""

    name: str
    inputs: tuple[int, ...]  #: indices into ``MergeResult.inputs``
    input_block_sizes: tuple[int, ...]
    block_size: int
    input_norms: tuple[float, ...]  #: ||Q_i||_F over the whole module (canonical, effective)
    merged_norm: float
    stats: Mapping[str, Any]
    ortho_error: float  #: worst block ||R^T R - I||_F of the rotation PEFT will apply (float32 check)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["stats"] = dict(self.stats)
        return d


@dataclass
class MergeResult:
    """The merged adapter (in memory) and a report of what the merge did."""

    method: str
    options: dict[str, Any]
    scale: float
    inputs: list[InputInfo]
    layout: str  #: "0.18" (current packed layout), "0.15" or "0.13" (legacy layouts)
    rotation_map: RotationMap
    block_config: BlockConfig | None
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    saved_to: Path | None = None
    #: module -> (input block sizes, output block size), filled by planning (also in a dry run)
    plan: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    saved_modules: str = "identical"  #: the policy for the inputs' saved heads and biases
    #: saved tensor (model name) -> what the merge did with it (:meth:`oftmerge.plan.saved.SavedPlan.describe`)
    saved: dict[str, str] = field(default_factory=dict)
    #: the base the shapes were checked against (:meth:`oftmerge.plan.merge.MergeBase.record`) when it was taken from
    #: the adapters' configs or is a Hub repo; None without a base, or for a local directory given as the base
    base: dict[str, Any] | None = None
    #: what an output must not replace besides the input adapters (``(role, path)``: the base), from the plan
    protected: tuple[tuple[str, str], ...] = ()
    #: the recipe that made this merge (``oftmerge.yaml`` of its output, :mod:`oftmerge.ops.recipe`), when it ran from a config
    recipe: str | None = None

    @property
    def release(self) -> str:
        """The PEFT release family the output is written as: its layout, or ``"0.16"`` when it keeps 0.16-0.17's series."""
        rmap = self.rotation_map
        return "0.16" if self.layout == "0.18" and rmap.kind == "neumann" and rmap.variant == "0.16" else self.layout

    @property
    def output_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def provenance(self) -> dict[str, Any]:
        """Everything needed to know how this adapter was made (no timestamps: re-runs give the same bytes)."""
        return {
            "tool": "oftmerge",
            "versions": library_versions(("torch", "peft")),
            "method": self.method,
            "options": self.options,
            "scale": self.scale,
            "rotation_map": self.rotation_map.describe(),
            "layout": RELEASES[self.release],
            "inputs": [i.to_dict() for i in self.inputs],
            "warnings": self.warnings,
            **({"saved_modules": {"policy": self.saved_modules, "tensors": dict(self.saved)}} if self.saved else {}),
            **({"base": self.base} if self.base is not None else {}),
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the merged adapter to ``path`` atomically; refuse to write over an input."""
        if self.dry_run:
            raise OftMergeError("this is a dry-run result: nothing was merged, nothing can be saved")
        prov = self.provenance()
        prov["modules"] = {n: r.to_dict() for n, r in self.modules.items()}
        extra = {"oftmerge.json": (json.dumps(prov, indent=2, sort_keys=True) + "\n").encode(), "README.md": adapter_card(self).encode()}
        if self.recipe is not None:
            extra["oftmerge.yaml"] = self.recipe.encode()
        inputs = [*self.protected, *(("input adapter", info.path) for info in self.inputs)]
        self.saved_to = write_adapter(path, PEFT_OFT, self.tensors, self.config, extra_files=extra, overwrite=overwrite, inputs=inputs)
        return self.saved_to

    def as_oft_adapter(self, base_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[OftAdapter, dict[str, Any]]:
        """The merged adapter as an :class:`~oftmerge.formats.OftAdapter` read from memory, and this merge's provenance."""
        if self.dry_run:
            raise OftMergeError("this is a dry-run merge result: nothing was merged, nothing can be folded")
        label = Path("<merged adapter>")
        read = adapter_from_tensors(label, self.config, TensorDict(self.tensors, str(label)), peft_release=self.release, base_shapes=base_shapes)
        return read, self.provenance()

    def summary(self, max_modules: int = 12) -> str:
        """A human-readable account of the merge (the CLI prints this)."""
        lines = [f"method: {self.method}" + (f" {self.options}" if self.options else "") + (f", scale {self.scale}" if self.scale != 1 else "")]
        for i, info in enumerate(self.inputs):
            lines.append(
                f"  input {i}: {describe_record(info.path, info.hub)}  (PEFT {RELEASES[info.release]}, {info.rotation_map}, "
                f"{info.modules} modules, weight {info.weight:g})"
            )
        if self.base is not None:
            told = "given" if self.base["from"] == "given" else "named by the adapters' base_model_name_or_path"
            lines.append(f"  base (shapes checked): {describe_record(self.base['path'], self.base.get('hub'))}  ({told})")
        bc = self.block_config
        grid = "" if bc is None else (f", oft_block_size={bc.oft_block_size}" if bc.oft_block_size else f", r={bc.r}")
        lines.append(
            f"output: PEFT {RELEASES[self.release]} layout, {self.rotation_map.describe()}{grid}, "
            f"{len(self.plan)} modules, {self.output_bytes / 1e6:.2f} MB"
        )
        if self.dry_run:
            lines.append(f"  {'module':<48} {'input block sizes':>18} {'-> b':>5}")
            for name, (sizes, b) in list(self.plan.items())[:max_modules]:
                lines.append(f"  {name[-48:]:<48} {','.join(map(str, sizes)):>18} {b:>5}")
            if len(self.plan) > max_modules:
                lines.append(f"  ... {len(self.plan) - max_modules} more modules")
        if not self.dry_run and self.modules:
            lines.append(f"  {'module':<48} {'inputs':>6} {'b':>4} {'|Q_i| (mean)':>12} {'|Q_merged|':>10} {'c':>7} {'|RtR-I|':>8}")
            reports = list(self.modules.values())
            for r in reports[:max_modules]:
                mean_in = sum(r.input_norms) / len(r.input_norms)
                c = r.stats.get("c")
                lines.append(
                    f"  {r.name[-48:]:<48} {len(r.inputs):>6} {r.block_size:>4} {mean_in:>12.4g} {r.merged_norm:>10.4g} "
                    f"{'' if c is None else f'{c:.3f}':>7} {r.ortho_error:>8.2g}"
                )
            if len(reports) > max_modules:
                lines.append(f"  ... {len(reports) - max_modules} more modules")
        if self.saved:
            lines.append(f"saved tensors (heads, biases; --saved-modules {self.saved_modules}):")
            for name, what in list(self.saved.items())[:max_modules]:
                lines.append(f"  {name[-48:]:<48} {what}")
            if len(self.saved) > max_modules:
                lines.append(f"  ... {len(self.saved) - max_modules} more saved tensors")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)
