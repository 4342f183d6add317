"""The diffusion side of ``merge``, ``convert``, ``inspect`` and ``fold``: single ``.safetensors`` OFT files.

The commands hand over here when their inputs are files (LyCORIS, kohya sd-scripts, OneTrainer);
PEFT adapter directories stay on the PEFT path. Mixing the two in one command is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from oftmerge.cli.common import json_report, parse_options, parse_weights, print_report, progress_bars, require_output
from oftmerge.errors import OftMergeError
from oftmerge.formats.diffusion import is_diffusion_file

__all__ = ["convert_file", "diffusion_inputs", "fold_file", "inspect_files", "merge_files", "render_inspect"]

#: options of ``merge`` that only mean something for PEFT adapters, with why
_PEFT_ONLY = {
    "peft_release": "--peft-release",
    "base": "--base",
}


def diffusion_inputs(paths: Sequence[str], to: str | None = None) -> bool:
    """True when every input is a diffusion file, or an output format ``to`` is given (PEFT adapters then join as inputs);
    refuses a mix of files and PEFT adapters without ``to``."""
    files = [is_diffusion_file(p) for p in paths]
    if all(files) or to:
        return True
    if any(files):
        f = next(p for p, is_f in zip(paths, files) if is_f)
        d = next(p for p, is_f in zip(paths, files) if not is_f)
        raise OftMergeError(
            f"{f} is a single-file diffusion OFT adapter and {d} a PEFT adapter (directory or Hub id); give the output's format (--to lycoris, "
            "kohya or onetrainer): exact only where the sides agree (PEFT 0.7-0.13 with LyCORIS / kohya, PEFT >= 0.14 with OneTrainer)"
        )
    return False


def _refuse_peft_options(args: argparse.Namespace) -> None:
    for attr, flag in _PEFT_ONLY.items():
        if getattr(args, attr, None):
            raise OftMergeError(f"{flag} applies to PEFT adapter directories, not to diffusion OFT files; leave it out (use --fold-into BASE to fold)")
    if getattr(args, "cayley", "auto") != "auto":
        raise OftMergeError("--cayley applies to PEFT adapters; a diffusion file is written with its format's own map (use --to and --approximate)")
    if getattr(args, "saved_modules", "identical") != "identical":
        raise OftMergeError("--saved-modules applies to PEFT adapters (heads, biases); diffusion OFT files hold no saved modules")


def merge_files(args: argparse.Namespace) -> int:
    from oftmerge.ops.diffusion import merge_diffusion

    _refuse_peft_options(args)
    require_output(args)
    folded: Any = None
    with progress_bars(args, ("merge", "fold")) as progress:
        result = merge_diffusion(
            args.adapters, method=args.method, weights=parse_weights(args.weights), scale=args.scale, method_options=parse_options(args.option),
            to=args.to, format=args.format, rescale=args.rescale, approximate=args.approximate, union=args.union, threads=args.threads,
            progress=progress,
        )  # fmt: skip
        if not args.dry_run:
            if args.fold_into:
                from oftmerge.ops.diffusion_fold import fold_diffusion

                folded = fold_diffusion(
                    result.adapter(), args.fold_into, args.output, overwrite=args.overwrite, shard_size=args.shard_size, progress=progress
                )
            else:
                result.save(args.output, overwrite=args.overwrite)

    def data() -> dict[str, Any]:
        d = result.provenance()
        d["modules"] = {n: r.to_dict() for n, r in result.modules.items()}
        output = None if args.dry_run else folded.out_dir if folded is not None else result.saved_to
        return json_report(args, d, output=output, dry_run=args.dry_run)

    def text() -> str:
        if args.dry_run:
            done = "dry run: nothing written"
        elif folded is not None:
            done = f"wrote {folded.out_dir} (the merge folded into {args.fold_into})"
        else:
            done = f"wrote {result.saved_to}"
        return result.summary(max_modules=args.show) + "\n" + done

    print_report(args, data=data, text=text)
    return 0


def convert_file(args: argparse.Namespace) -> int:
    from oftmerge.ops.diffusion import convert_diffusion

    if not args.to:
        raise OftMergeError(f"{args.adapter}: a diffusion OFT file is converted to another format: give --to (lycoris, kohya or onetrainer)")
    if args.peft_release:
        raise OftMergeError("--peft-release applies to converting PEFT adapters to the current PEFT layout; leave it out with --to")
    result = convert_diffusion(args.adapter, args.output, to=args.to, format=args.format, approximate=args.approximate, overwrite=args.overwrite)
    lines = [f"converted {args.adapter} ({result.inputs[0]['format']} {result.inputs[0]['algo']}) -> {result.saved_to} ({result.format})"]
    lines += [f"warning: {w}" for w in result.warnings]
    print_report(args, data=lambda: json_report(args, result.provenance(), output=result.saved_to), text=lambda: "\n".join(lines))
    return 0


def render_inspect(report: dict[str, Any], max_modules: int = 20) -> str:
    lines: list[str] = []
    for k, f in enumerate(report["files"]):
        lines.append(f"[{k}] {f['path']}: {f['format']} {f['algo']}, {len(f['modules'])} modules, {f['side']} side, {f['map']}")
        for note in f["notes"]:
            lines.append(f"    note: {note}")
        for m in f["modules"][:max_modules]:
            stages = f", {m['stages']} stages" if m["stages"] > 1 else ""
            constraint = "off" if m["constraint"] is None else f"{m['constraint']:.4g}" + (" (clamp active)" if m["clamped"] else "")
            rescale = "" if m["rescale"] is None else f", rescale {m['rescale']['min']:.4g}..{m['rescale']['max']:.4g}"
            lines.append(
                f"    {m['name']}: {m['blocks']} x {m['block_size']}{stages} (width {m['width']}), constraint {constraint}, ||Q||_F {m['q_norm']:.4g}{rescale}"
            )
        if len(f["modules"]) > max_modules:
            lines.append(f"    ... {len(f['modules']) - max_modules} more modules (--show N)")
    if len(report["files"]) > 1:
        lines.append("cosine between the files' generators (modules they share):")
        for k, row in enumerate(report["cosine"]):
            lines.append(f"  [{k}] " + "  ".join("   -  " if c is None else f"{c:+.3f}" for c in row))
    return "\n".join(lines)


def inspect_files(args: argparse.Namespace) -> int:
    from oftmerge.ops.diffusion import inspect_diffusion

    if args.base or args.peft_release:
        raise OftMergeError("--base and --peft-release apply to PEFT adapter directories, not to diffusion OFT files; leave them out")
    report = inspect_diffusion(args.adapters, format=args.format)
    print_report(args, data=lambda: json_report(args, report), text=lambda: render_inspect(report, max_modules=args.show))
    return 0


def fold_file(args: argparse.Namespace) -> int:
    from oftmerge.ops.diffusion_fold import fold_diffusion

    if args.base is None:
        raise OftMergeError(
            f"{args.adapter}: a diffusion OFT file does not name its base model; give the diffusers model or pipeline directory with --base DIR"
        )
    if args.peft_release or args.push_to_hub:
        raise OftMergeError("--peft-release and --push-to-hub apply to PEFT adapters; leave them out for a diffusion OFT file")
    out = None if args.dry_run else args.output
    with progress_bars(args, ("fold",)) as progress:
        result = fold_diffusion(args.adapter, args.base, out, overwrite=args.overwrite, shard_size=args.shard_size, dry_run=args.dry_run, progress=progress)

    def text() -> str:
        done = "dry run: nothing written" if args.dry_run else f"wrote {result.out_dir}"
        return result.summary(max_modules=args.show) + "\n" + done

    print_report(args, data=lambda: json_report(args, result.provenance(), output=result.out_dir, dry_run=args.dry_run), text=text)
    return 0
