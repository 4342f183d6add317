"""Merge, convert and inspect single-file diffusion OFT adapters (LyCORIS, kohya sd-scripts, OneTrainer).

>>> from oftmerge.ops.diffusion import merge_diffusion
>>> result = merge_diffusion(["style.safetensors", "subject.safetensors"], out="merged.safetensors")  # doctest: +SKIP

Every module is merged in so(B) with the registered methods (:mod:`oftmerge.methods`), from the
**effective** generators the tools apply (:mod:`oftmerge.formats.diffusion`: clamp, sign and side
accounted for), and written back in the inputs' format (or ``to``) so that the tool loading the
file applies the merged generator unchanged (no clamp reaches it). ``docs/diffusion.md`` is the
user's page; the rules:

* all inputs adapt the same modules (a file with more or fewer modules is refused in one line), or
  with ``union`` each module is merged among the inputs that adapt it (one alone keeps its generator);
* block grids may differ: a module is merged on the finest grid all inputs' rotations fit (the
  least common multiple of their block sizes), exactly as PEFT adapters are;
* ``rescale`` vectors (LyCORIS) are merged as the ``|weight|``-weighted **geometric** mean (an input
  without one counts as ones), raised to the power ``scale``: a per-row scale multiplies, so its
  logarithm is what is averaged, as the generators are in so(B);
* ``scale`` multiplies the merged generator: ``cayley(s Q)`` is a true fractional rotation, unlike
  the loaders' linear strength ``I + s (R - I)``;
* mixed formats need ``to``; sides must agree (an output-side LyCORIS rotation is no input-side
  OneTrainer rotation), and a change of map (Cayley-Neumann into exact) needs ``approximate``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine.commit import output_file
from oftmerge.engine.guard import output_location
from oftmerge.engine.model import report_progress
from oftmerge.engine.threads import torch_threads
from oftmerge.errors import IncompatibleAdaptersError, NumericalError, OftMergeError
from oftmerge.formats.diffusion import (
    DiffusionAdapter,
    DiffusionFormat,
    DiffusionModule,
    MergedModule,
    diffusion_formats,
    frobenius,
    get_diffusion_format,
    is_diffusion_file,
    read_diffusion_adapter,
)
from oftmerge.formats.io import TensorDict, sha256_file
from oftmerge.formats.peft_oft import OftAdapter
from oftmerge.formats.peft_view import peft_as_diffusion
from oftmerge.kernels.merge import merge_module
from oftmerge.methods import get_method
from oftmerge.provenance import library_versions

__all__ = ["DiffusionMergeResult", "convert_diffusion", "inspect_diffusion", "merge_diffusion", "RESCALE_MERGES"]

#: how rescale vectors of several inputs are merged
RESCALE_MERGES = ("geometric", "arithmetic")


@dataclass
class ModuleRecord:
    name: str
    input_block_sizes: tuple[int, ...]
    block_size: int
    input_norms: tuple[float, ...]
    merged_norm: float
    rescaled: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DiffusionMergeResult:
    """A merged (or converted) diffusion OFT file: tensors, metadata, and what was done."""

    format: str
    inputs: list[dict[str, Any]]
    method: str
    options: dict[str, Any]
    weights: list[float]
    scale: float
    modules: dict[str, ModuleRecord]
    merged: list[MergedModule]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    saved_to: Path | None = None

    def provenance(self) -> dict[str, Any]:
        return {
            "tool": "oftmerge",
            "versions": library_versions(),
            "operation": "convert" if self.method == "convert" else "merge",
            "format": self.format,
            "method": self.method,
            "method_options": self.options,
            "weights": self.weights,
            "scale": self.scale,
            "inputs": self.inputs,
            "constraint": "not reached: every written alpha is above its module's ||Q||_F, so no loader clamps the merged generator",
            "warnings": self.warnings,
        }

    def adapter(self) -> DiffusionAdapter:
        """The result as an in-memory :class:`DiffusionAdapter` (what a fold of the merge reads)."""
        fmt = get_diffusion_format(self.format)
        label = str(self.saved_to or f"<merge of {len(self.inputs)} file(s)>")
        return fmt.read(Path(label), TensorDict(self.tensors, label), self.metadata)

    def summary(self, max_modules: int = 10) -> str:
        lines = [f"{self.method} of {len(self.inputs)} {self.format} file(s): {len(self.modules)} modules"]
        for i, inp in enumerate(self.inputs):
            lines.append(f"  input {i}: {inp['path']} ({inp['format']} {inp['algo']}, weight {self.weights[i]:g})")
        for rec in list(self.modules.values())[:max_modules]:
            norms = ", ".join(f"{n:.4g}" for n in rec.input_norms)
            lines.append(f"  {rec.name}: block {rec.block_size}, ||Q|| inputs [{norms}] -> {rec.merged_norm:.4g}" + (" (rescaled)" if rec.rescaled else ""))
        if len(self.modules) > max_modules:
            lines.append(f"  ... {len(self.modules) - max_modules} more modules")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the file atomically (never over an input)."""
        from safetensors.torch import save_file

        inputs = [("input file", inp["path"]) for inp in self.inputs]
        with output_file(out, overwrite=overwrite, inputs=inputs) as tmp:
            save_file(self.tensors, str(tmp), metadata=self.metadata)
            self.saved_to = output_location(out)
        return self.saved_to


def _read_all(paths: Sequence[Any], format: str | None) -> list[DiffusionAdapter]:
    """Each input as a :class:`DiffusionAdapter`: files by their format, PEFT adapter directories through :func:`peft_as_diffusion`."""
    out = []
    for p in paths:
        if isinstance(p, DiffusionAdapter):
            out.append(p)
        elif isinstance(p, OftAdapter) or not is_diffusion_file(p):
            out.append(peft_as_diffusion(p))
        else:
            out.append(read_diffusion_adapter(p, format=format))
    return out


def _target(read: Sequence[DiffusionAdapter], to: str | None) -> DiffusionFormat:
    formats = list(dict.fromkeys(a.format for a in read))
    if to is None and formats == ["peft"]:
        raise OftMergeError(
            "the inputs are PEFT adapters: merge them with merge_adapters (oftmerge merge without --to), or pass to= (--to) for a diffusion format"
        )
    if to is None:
        if len(formats) > 1:
            listing = ", ".join(f"{a.path.name}: {a.format}" for a in read)
            raise IncompatibleAdaptersError(
                f"the inputs are of different formats ({listing}); pass --to FORMAT ({', '.join(diffusion_formats())}) to choose the output's"
            )
        return get_diffusion_format(formats[0])
    return get_diffusion_format(to)


def _check_compatible(read: Sequence[DiffusionAdapter], fmt: DiffusionFormat, approximate: bool) -> list[str]:
    notes: list[str] = []
    for a in read:
        if a.side != fmt.side:
            raise IncompatibleAdaptersError(
                f"{a.path}: {a.format} rotates the {a.side} side of each weight, {fmt.name} the {fmt.side} side; no {fmt.name} file computes "
                f"the same function (the rotations act on different axes). Fold it into the model instead (oftmerge fold), which is exact"
            )
        if a.rotation_map != fmt.rotation_map():
            what = f"{a.path}: {a.format} applies {a.rotation_map.describe()}, {fmt.name} applies {fmt.rotation_map().describe()}"
            if not approximate:
                raise IncompatibleAdaptersError(
                    f"{what}: the same generator gives another rotation there. Pass --approximate to keep the rotation the series approximates "
                    "(the function changes by the series' error), or fold the file into the model instead"
                )
            notes.append(f"{what}: converted with --approximate (the ideal rotation is kept; the series' error is not)")
    return notes


def _check_modules(read: Sequence[DiffusionAdapter], union: bool) -> list[str]:
    """The modules to merge: every input's (refused when they differ), or with ``union`` all of them."""
    if union:
        return list(dict.fromkeys(n for a in read for n in a.modules))
    names = list(read[0].modules)
    first = set(names)
    for a in read[1:]:
        other = set(a.modules)
        if other != first:
            only_a, only_0 = sorted(other - first), sorted(first - other)
            detail = "; ".join(
                part for part in (
                    f"{len(only_0)} only in {read[0].path.name} (e.g. {only_0[0]})" if only_0 else "",
                    f"{len(only_a)} only in {a.path.name} (e.g. {only_a[0]})" if only_a else "",
                ) if part
            )  # fmt: skip
            hint = _prefix_hint(read[0], a) or (
                "were they trained on another model, or with other target modules / a text encoder? "
                "Pass --union to merge every module among the inputs that adapt it"
            )
            raise IncompatibleAdaptersError(f"{a.path}: adapts other modules than {read[0].path} ({detail}); {hint}")
    return names


def _prefix_hint(a: DiffusionAdapter, b: DiffusionAdapter) -> str | None:
    """Why two files name the same modules differently, when that is all that differs (LyCORIS's two namings)."""
    def stems(x: DiffusionAdapter, prefix: str) -> set[str] | None:
        names = list(x.modules)
        return {n[len(prefix) :] for n in names} if names and all(n.startswith(prefix) for n in names) else None

    for pa, pb in (("lycoris_", "lora_unet_"), ("lora_unet_", "lycoris_")):
        sa, sb = stems(a, pa), stems(b, pb)
        if sa is not None and sa == sb:
            return (
                f"they are the same modules named two ways: {a.path.name} as {pa}..., {b.path.name} as {pb}... (LyCORIS's generic wrapper and "
                "its kohya network). Rename one file's keys to the other's prefix (the loader that reads the output decides which), then merge"
            )
    return None


def _grid(name: str, mods: Sequence[DiffusionModule], paths: Sequence[Path]) -> tuple[int, int]:
    features = {m.features for m in mods}
    if len(features) > 1:
        listing = ", ".join(f"{p.name}: {m.features}" for p, m in zip(paths, mods))
        raise IncompatibleAdaptersError(f"module {name!r}: the inputs rotate different widths ({listing}); they were trained on different models")
    width = features.pop()
    block = 1
    for m in mods:
        block = block * m.grid_block // math.gcd(block, m.grid_block)
    if width % block:
        raise IncompatibleAdaptersError(f"module {name!r}: block sizes {sorted({m.grid_block for m in mods})} have no common grid on width {width}")
    return width, block


def _merged_rescale(
    read: Sequence[DiffusionAdapter], name: str, weights: Sequence[float], how: str, scale: float
) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    vectors = [a.rescale(name) for a in read]
    if all(v is None for v in vectors):
        return None, None
    shape = next(a.rescale_shape(name) for a in read if a.rescale_shape(name) is not None)
    width = read[0].modules[name].features
    ones = torch.ones(width, dtype=torch.float64)
    vs = [ones if v is None else v for v in vectors]
    w = torch.tensor([abs(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    if how == "geometric":
        bad = [(a.path, float(v.min())) for a, v in zip(read, vs) if bool((v <= 0).any())]
        if bad:
            raise NumericalError(
                f"{bad[0][0]}: module {name!r} has a rescale entry <= 0 ({bad[0][1]:.3g}); its geometric mean is undefined. "
                "Pass --rescale arithmetic (the weighted mean) to merge it"
            )
        logs = torch.stack([v.log() for v in vs])
        merged = torch.exp((w[:, None] * logs).sum(0) * scale)
    elif how == "arithmetic":
        merged = (w[:, None] * torch.stack(vs)).sum(0)
        if scale != 1.0:
            merged = 1 + scale * (merged - 1)
    else:
        raise OftMergeError(f"rescale merge must be one of {', '.join(RESCALE_MERGES)}, got {how!r}")
    return merged, shape


def _weights(given: Sequence[float] | None, n: int) -> list[float]:
    if given is None:
        return [1.0] * n
    w = [float(x) for x in given]
    if len(w) != n:
        raise OftMergeError(f"got {len(w)} weight(s) for {n} input(s); give one weight per input (--weights 1,1,...)")
    if not all(math.isfinite(x) for x in w):
        raise OftMergeError(f"weights must be finite numbers, got {given}")
    if all(x == 0 for x in w):
        raise OftMergeError("all weights are 0: nothing to merge; give at least one non-zero weight")
    return w


def _metadata(read: Sequence[DiffusionAdapter], record: Mapping[str, Any]) -> dict[str, str]:
    """Metadata every input agrees on (kohya's ``ss_*`` training notes, ...) plus oftmerge's provenance."""
    common: dict[str, str] = {}
    for key, value in read[0].metadata.items():
        if key in ("oftmerge", "sshs_model_hash", "sshs_legacy_hash") or not all(a.metadata.get(key) == value for a in read[1:]):
            continue
        common[key] = value
    common["oftmerge"] = json.dumps(record, sort_keys=True, allow_nan=False)
    return common


def merge_diffusion(
    inputs: Sequence[str | os.PathLike[str] | DiffusionAdapter],
    *,
    method: str = "orthomerge",
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    method_options: Mapping[str, Any] | None = None,
    to: str | None = None,
    format: str | None = None,
    rescale: str = "geometric",
    approximate: bool = False,
    union: bool = False,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    threads: int | None = 1,
    operation: str = "merge",
    progress: Callable[[int, int, str], None] | None = None,
) -> DiffusionMergeResult:
    """Merge diffusion OFT files into one file of their format (or ``to``); see the module docstring.

    ``progress(done, total, module)`` is called after each merged module (with ``nbytes=`` the bytes of its
    merged generator, when the callback takes that keyword).
    """
    if not inputs:
        raise OftMergeError("no input files given")
    if not math.isfinite(scale):
        raise OftMergeError(f"scale must be a finite number, got {scale}")
    read = _read_all(inputs, format)
    fmt = _target(read, to)
    warnings = [n for a in read for n in a.notes] + _check_compatible(read, fmt, approximate)
    names = _check_modules(read, union)
    w = _weights(weights, len(read))
    meth = get_method(method)
    options = meth.resolve_options(dict(method_options or {}))
    out_sign = fmt.rotation_map().sign
    merged: list[MergedModule] = []
    records: dict[str, ModuleRecord] = {}
    report = report_progress(progress)
    with torch_threads(threads):
        for done, name in enumerate(names, start=1):
            have = [i for i, a in enumerate(read) if name in a.modules]  # all inputs, unless union: those that adapt it
            ins, wi = [read[i] for i in have], [w[i] for i in have]
            mods = [a.modules[name] for a in ins]
            width, block = _grid(name, mods, [a.path for a in ins])
            result = merge_module(
                name, [a.generator(name) for a in ins], [m.spec(a.side) for a, m in zip(ins, mods)], [a.rotation_map.sign for a in ins],
                wi, meth, options, block=block, shared=False, features=width, packed=False, out_sign=out_sign, scale=scale,
            )  # fmt: skip
            vec, shape = _merged_rescale(ins, name, wi, rescale, scale)
            merged.append(MergedModule(name, result.stored, vec, shape))
            records[name] = ModuleRecord(name, tuple(m.grid_block for m in mods), block, result.input_norms, result.merged_norm, vec is not None)
            if report is not None:
                report(done, len(names), name, result.stored.nbytes + (0 if vec is None else vec.nbytes))
    where = f"the {operation} of {', '.join(str(a.path) for a in read)}"
    fmt.check_writable(merged, where)
    dtypes = {a.dtype(n) for a in read for n in list(a.modules)[:1]}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    tensors = fmt.write_tensors(merged, dtype)
    if any(a.algo == "boft" for a in read):
        warnings.append(
            "BOFT inputs: each file's butterfly stages were multiplied out to the block-diagonal rotation they apply (blocks of 2^(m-1) b rows) "
            "and merged exactly in so(B); the output stores that rotation as diag-oft"
        )
    inputs_record = [
        {"path": str(a.path), "format": a.format, "algo": a.algo, "sha256": sha256_file(a.path) if a.path.is_file() else a.content_hash()} for a in read
    ]
    result_obj = DiffusionMergeResult(
        format=fmt.name, inputs=inputs_record, method="convert" if operation == "convert" else meth.name, options=options, weights=w, scale=scale,
        modules=records, merged=merged, tensors=tensors, metadata={}, warnings=warnings,
    )  # fmt: skip
    result_obj.metadata = _metadata(read, {**result_obj.provenance(), "rescale": rescale, "modules": "union" if union else "same"})
    if out is not None:
        result_obj.save(out, overwrite=overwrite)
    return result_obj


def convert_diffusion(
    src: str | os.PathLike[str], out: str | os.PathLike[str], *, to: str, format: str | None = None, approximate: bool = False, overwrite: bool = False
) -> DiffusionMergeResult:
    """Write diffusion OFT file ``src`` in format ``to``, where that is exact (else refused with the reason, or ``approximate``)."""
    return merge_diffusion([src], to=to, format=format, approximate=approximate, out=out, overwrite=overwrite, operation="convert")


def inspect_diffusion(paths: Sequence[str | os.PathLike[str]], *, format: str | None = None) -> dict[str, Any]:
    """Format, modules, block sizes, constraint, effective ||Q||, rescale, and cosines between files (of common modules).

    One module of every file is in memory at a time: the cosines are accumulated module by module.
    """
    read = _read_all(paths, format)
    n = len(read)
    mods: list[list[dict[str, Any]]] = [[] for _ in read]
    dot = torch.zeros(n, n, dtype=torch.float64)
    norm_i = torch.zeros(n, n, dtype=torch.float64)  # ||x_i||^2 over the modules i shares with j
    shared = torch.zeros(n, n, dtype=torch.bool)
    for name in dict.fromkeys(name for a in read for name in a.modules):
        flat: dict[int, torch.Tensor] = {}
        for k, a in enumerate(read):
            if name not in a.modules:
                continue
            m = a.modules[name]
            raw, q = a.raw_and_generator(name)
            flat[k] = q.reshape(-1) * a.rotation_map.sign
            s = a.rescale(name)
            raw_norm = frobenius(raw - raw.transpose(-1, -2)) if a.format != "onetrainer" else None
            clamped = raw_norm is not None and m.constraint is not None and m.stages == 1 and abs(frobenius(q) - raw_norm) > 1e-9 * max(raw_norm, 1.0)
            mods[k].append({
                "name": name, "key": m.key, "stages": m.stages, "blocks": m.num_blocks, "block_size": m.block_size, "width": m.features,
                "alpha": m.alpha, "constraint": m.constraint, "clamped": clamped,
                "q_norm": frobenius(q), "rescale": None if s is None else {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())},
            })  # fmt: skip
        for i, x in flat.items():
            for j, y in flat.items():
                if x.shape == y.shape:
                    dot[i, j] += float(x @ y)
                    norm_i[i, j] += float(x @ x)
                    shared[i, j] = True
    files = [
        {"path": str(a.path), "format": a.format, "algo": a.algo, "side": a.side, "map": a.rotation_map.describe(), "modules": mods[k], "notes": list(a.notes)}
        for k, a in enumerate(read)
    ]
    cos: list[list[float | None]] = []
    for i in range(n):
        row: list[float | None] = []
        for j in range(n):
            den = math.sqrt(float(norm_i[i, j]) * float(norm_i[j, i]))
            row.append(float(dot[i, j]) / den if bool(shared[i, j]) and den else None)
        cos.append(row)
    return {"files": files, "cosine": cos}
