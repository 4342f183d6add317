"""What ``oftmerge inspect`` reports about OFT adapters, as plain data.

Per adapter: the PEFT release and how it was recognised, the rotation map, and per module the
block size and count, ``||Q||_F`` over the whole module, a per-block summary, and the
orthogonality error ``||R^T R - I||_F`` (worst block) of the matrix PEFT actually applies —
PEFT's truncated Cayley–Neumann series is far from a rotation when ``||Q||`` is not small.
For several adapters: the cosine between their generators per shared module, and the magnitude
correction ``c = sum ||Q_i|| / ||sum Q_i||`` the default merge would use (or, when the adapters
could not be merged, why not: ``merge.error``; the adapters are still described).

``block_share`` adapters do not store the layer width. It comes from ``base`` or from another
input that adapts the same module, and the two give the same ``||Q||_F``; where neither gives
it, the norm is that of the stored block and ``q_norm_of`` says ``"stored block"`` (else
``"module"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from oftmerge.errors import IncompatibleAdaptersError, OftMergeError
from oftmerge.formats.base import read_oft_adapter
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.peft_oft import OftAdapter
from oftmerge.formats.sources import describe_record, resolve_source, source_record
from oftmerge.kernels.fold import rotation_overflows
from oftmerge.linalg import orthogonality_error
from oftmerge.ops.merge import merge_adapters, quiet_merge_log
from oftmerge.plan.fold import head_updates, saved_keys
from oftmerge.plan.merge import merge_base, module_norm, to_grid

__all__ = ["inspect_adapters", "render_report"]


def _block_stats(values: torch.Tensor) -> dict[str, float]:
    v = values.flatten().double()
    return {"min": float(v.min()), "median": float(v.median()), "max": float(v.max())}


def _module_report(adapter: OftAdapter, name: str, width: int | None) -> dict[str, Any]:
    spec = adapter.modules[name]
    q = adapter.generator(name)
    block_norms = torch.linalg.matrix_norm(q)
    width = spec.features or width
    n = width // spec.block_size if width else None
    total = module_norm(q, spec, width)
    applied = adapter.rotation_map.rotation(q)
    ortho = orthogonality_error(applied)
    if rotation_overflows(adapter.rotation_map, q, adapter.dtype(name)):  # PEFT computes it in float32: NaN there
        ortho = torch.full_like(ortho, math.nan)
    report = {
        "name": name,
        "kind": spec.kind,
        "block_size": spec.block_size,
        "blocks": n,
        "shared": spec.shared,
        "q_norm": total,  # per stored block only when a shared block's width is unknown (blocks None)
        "q_norm_of": "module" if n is not None or not spec.shared else "stored block",
        "block_q_norm": _block_stats(block_norms),
        "ortho_error": float(ortho.max()),
    }
    if adapter.rotation_map.kind == "neumann":
        ideal = adapter.rotation_map.ideal_rotation(q)
        report["series_error"] = float(torch.linalg.matrix_norm(applied - ideal).max())
    return report


def _worst(values: Iterable[float]) -> float:
    """The largest value; NaN when any is NaN (``max`` would depend on the order)."""
    vals = list(values)
    return math.nan if any(math.isnan(v) for v in vals) else max(vals)


def _broken(modules: Sequence[dict[str, Any]]) -> list[str]:
    """A warning for the modules whose applied rotation is not finite (``--json`` shows their error as null)."""
    bad = [m["name"] for m in modules if not math.isfinite(m["ortho_error"])]
    if not bad:
        return []
    return [
        f"{len(bad)} module(s) whose rotation, as PEFT computes it, is not finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
        "PEFT's outputs are NaN there; the adapter is broken, and merge and fold refuse it"
    ]


def _saved_report(a: OftAdapter, ckpt: Checkpoint | None) -> list[dict[str, Any]]:
    """The tensors the adapter saved besides its rotations (heads, biases): on load they replace the base's.

    With a base, each names the base tensor it replaces (a missing or differently shaped one is
    refused, as the fold refuses it).
    """
    replaces = saved_keys(a, ckpt) if ckpt is not None else {}
    if ckpt is not None:
        head_updates(a, ckpt, replaces)  # refuses what the fold would refuse
    return [
        {"name": n, "key": a.saved[n], "shape": list(a.saved_shape(n)), "dtype": str(a.saved_dtype(n)).removeprefix("torch."), "replaces": replaces.get(n)}
        for n in a.saved
    ]


def _pair_cosines(a: OftAdapter, b: OftAdapter) -> list[float]:
    out = []
    for name in sorted(set(a.modules) & set(b.modules)):
        sa, sb = a.modules[name], b.modules[name]
        features = sa.features or sb.features
        shared = sa.shared and sb.shared
        grid = math.lcm(sa.block_size, sb.block_size)
        if not shared and features is None:
            continue
        qa = to_grid(a.generator(name) * a.rotation_map.sign, sa, shared, features, grid).flatten()
        qb = to_grid(b.generator(name) * b.rotation_map.sign, sb, shared, features, grid).flatten()
        denom = float(qa.norm() * qb.norm())
        if denom > 0:
            out.append(float(qa @ qb) / denom)
    return out


def inspect_adapters(
    adapters: Sequence[str | os.PathLike[str] | OftAdapter],
    *,
    base: str | os.PathLike[str] | None = None,
    peft_release: str | None = None,
) -> dict[str, Any]:
    """Diagnostics of one or more adapters (see the module docstring); JSON-serialisable.

    Adapters and ``base`` may be Hub ids (:mod:`oftmerge.formats.sources`). Without ``base``, the
    base the adapters' configs name is used when it is at hand without a download (as for a merge,
    :func:`oftmerge.plan.merge.merge_base`); ``report["base"]`` says which base was used (or None).
    """
    given = [a if isinstance(a, OftAdapter) else resolve_source(a, "adapter") for a in adapters]
    sources = [None if isinstance(a, OftAdapter) else a for a in given]
    chosen, base_shapes = merge_base(base, [s for s in sources if s is not None])

    def read_all(shapes: dict[str, tuple[int, ...]] | None) -> list[OftAdapter]:
        return [a if isinstance(a, OftAdapter) else read_oft_adapter(a.path, peft_release=peft_release, base_shapes=shapes) for a in given]

    report: dict[str, Any] = {"adapters": [], "base": None if chosen is None else chosen.record()}
    try:
        read = read_all(base_shapes)
    except IncompatibleAdaptersError as exc:
        if chosen is None or not chosen.defaulted:
            raise
        report["base"] = dict(chosen.record(), error=str(exc))  # described without it, as with no base at hand
        chosen, read = None, read_all(None)
    base_dir = None if chosen is None else chosen.source.path
    widths = {n: s.features for a in read for n, s in a.modules.items() if s.features}  # for shared blocks
    ckpt = Checkpoint(base_dir) if base_dir is not None and any(a.saved for a in read) else None
    for a, src in zip(read, sources):
        modules = [_module_report(a, n, widths.get(n)) for n in a.modules]
        report["adapters"].append(
            {
                "path": str(a.path),
                **({"hub": source_record(src)} if src is not None and src.is_hub else {}),
                "release": a.release,
                "release_source": a.release_source,
                "peft_version": a.peft_version,
                "rotation_map": a.rotation_map.describe(),
                "block_share": bool(a.config.get("block_share", False)),
                "coft": bool(a.config.get("coft", False)),
                "base_model": a.base_model,
                "modules": modules,
                "saved": _saved_report(a, ckpt),
                "q_norm": _block_stats(torch.tensor([m["q_norm"] for m in modules], dtype=torch.float64)),
                "ortho_error_max": _worst(m["ortho_error"] for m in modules),
                "warnings": [*a.notes, *_broken(modules)],
            }
        )
    if len(read) > 1:
        pairs = []
        for i in range(len(read)):
            for j in range(i + 1, len(read)):
                cos = _pair_cosines(read[i], read[j])
                pairs.append({"a": i, "b": j, "modules": len(cos), "cosine": _block_stats(torch.tensor(cos, dtype=torch.float64)) if cos else None})
        report["pairs"] = pairs

        try:
            with quiet_merge_log():  # its warnings are part of this report, not log lines
                result = merge_adapters(read, base=base_dir, allow_base_mismatch=True)
        except OftMergeError as exc:  # the adapters are described all the same; say why they would not merge
            report["merge"] = {"error": str(exc), "modules": {}, "warnings": []}
            return report
        report["merge"] = {
            "method": result.method,
            "modules": {
                n: {"inputs": len(r.inputs), "c": r.stats.get("c", 1.0), "merged_q_norm": r.merged_norm}
                for n, r in result.modules.items()
            },
            "warnings": result.warnings,
        }
    return report


def render_report(report: dict[str, Any], *, max_modules: int = 20) -> str:
    """The human-readable table ``oftmerge inspect`` prints."""
    lines: list[str] = []
    base = report.get("base")
    if base is not None:
        where = describe_record(base["path"], base.get("hub"))
        if "error" in base:
            lines.append(f"base {where} (named by the adapters' configs) not used, the adapters do not fit it: {base['error']}")
        else:
            lines.append(f"base: {where}" + ("" if base["from"] == "given" else " (named by the adapters' base_model_name_or_path)"))
    for i, a in enumerate(report["adapters"]):
        lines.append(f"[{i}] {describe_record(a['path'], a.get('hub'))}")
        lines.append(f"    PEFT {a['release_source']}; {a['rotation_map']}" + ("; block_share" if a["block_share"] else "") + ("; COFT" if a["coft"] else ""))
        qn = a["q_norm"]
        lines.append(
            f"    {len(a['modules'])} modules, ||Q||_F per module {qn['min']:.3g} .. {qn['max']:.3g} (median {qn['median']:.3g}); "
            f"worst ||R^T R - I||_F of the applied rotation {a['ortho_error_max']:.2g}"
        )
        lines.append(f"    {'module':<46} {'b':>4} {'blocks':>6} {'||Q||_F':>9} {'block ||Q|| min/med/max':>24} {'|RtR-I|':>8}")
        for m in a["modules"][:max_modules]:
            bq = m["block_q_norm"]
            blocks = "shared" if m["shared"] and m["blocks"] is None else str(m["blocks"])
            lines.append(
                f"    {m['name'][-46:]:<46} {m['block_size']:>4} {blocks:>6} {m['q_norm']:>9.4g} "
                f"{bq['min']:>7.3g}/{bq['median']:.3g}/{bq['max']:.3g}".ljust(97) + f" {m['ortho_error']:>8.2g}"
            )
        if len(a["modules"]) > max_modules:
            lines.append(f"    ... {len(a['modules']) - max_modules} more modules (--show N, or --json)")
        if a["saved"]:
            lines.append(f"    {len(a['saved'])} saved tensor(s) besides the rotations (heads, trained biases); they replace the base's on load:")
            for t in a["saved"][:max_modules]:
                renamed = f"  -> {t['replaces']}" if t["replaces"] not in (None, t["name"]) else ""
                lines.append(f"    {t['name'][-46:]:<46} {str(t['shape']):>14} {t['dtype']}{renamed}")
            if len(a["saved"]) > max_modules:
                lines.append(f"    ... {len(a['saved']) - max_modules} more saved tensors")
        for w in a.get("warnings", []):
            lines.append(f"    warning: {w}")
    if "pairs" in report:
        lines.append("cosine between generators (per shared module):")
        for p in report["pairs"]:
            c = p["cosine"]
            text = "no shared modules" if c is None else f"min {c['min']:.3f} / median {c['median']:.3f} / max {c['max']:.3f} over {p['modules']} modules"
            lines.append(f"    [{p['a']}] vs [{p['b']}]: {text}")
        cs = [m["c"] for m in report["merge"]["modules"].values() if m["inputs"] > 1]
        if cs:
            lines.append(
                f"orthomerge magnitude correction c = sum ||Q_i|| / ||sum Q_i|| over {len(cs)} merged modules: "
                f"{min(cs):.3f} .. {max(cs):.3f} (1: all point the same way; sqrt(N): N orthogonal ones of equal size)"
            )
        if "error" in report["merge"]:
            lines.append(f"these adapters would not merge: {report['merge']['error']}")
        for w in report["merge"]["warnings"]:
            lines.append(f"warning: {w}")
    return "\n".join(lines)
