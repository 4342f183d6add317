"""The ``oftmerge`` command line: argument parsing only; everything else is the Python API."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from oftmerge._version import __version__
from oftmerge.errors import OftMergeError

log = logging.getLogger("oftmerge")

#: Modules that add subcommands: each has ``register(subparsers)`` (kept apart so each stays small).
SUBCOMMAND_MODULES: list[str] = [
    "oftmerge.cli.inspect",
    "oftmerge.cli.demo",
    "oftmerge.cli.fold",
    "oftmerge.cli.decouple",
]

EPILOG_MERGE = """examples:
  oftmerge merge adapters/oft-upper adapters/oft-reverse -o merged
  oftmerge merge A B C -o out --weights 1,1,0.5 --scale 0.9
  oftmerge merge A B -o out --method karcher --cayley exact
  oftmerge merge A B --dry-run             # show the plan, write nothing

The merged adapter loads with stock PEFT: PeftModel.from_pretrained(base, "merged").
"""


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise OftMergeError(f"--weights expects comma-separated numbers, e.g. 1,1,0.5; got {text!r}") from None


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OftMergeError(f"--option expects KEY=VALUE, got {item!r}")
        low = value.lower()
        out[key] = low in ("1", "true", "yes") if low in ("1", "0", "true", "false", "yes", "no") else value
    return out


def add_report_arguments(parser: argparse.ArgumentParser, *, dry_run: str, listed: str = "modules") -> None:
    """The options every writing command shares: --overwrite, --dry-run, --json, --show, -q."""
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--dry-run", action="store_true", help=dry_run)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--show", type=int, default=12, help=f"{listed} to list in the summary (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def require_output(args: argparse.Namespace) -> None:
    if args.output is None and not args.dry_run:
        raise OftMergeError("give an output directory with -o/--output (or --dry-run to only see the plan)")


def _progress(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None

    def report(done: int, total: int, name: str) -> None:
        sys.stderr.write(f"\r  merged {done}/{total} modules  {name[-50:]:<50}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def _cmd_merge(args: argparse.Namespace) -> int:
    from oftmerge.engine import distributed
    from oftmerge.ops.merge import merge_adapters

    require_output(args)
    result = merge_adapters(
        args.adapters,
        method=args.method,
        weights=_parse_weights(args.weights),
        scale=args.scale,
        cayley=args.cayley,
        method_options=_parse_options(args.option),
        base=args.base or args.fold_into,
        peft_release=args.peft_release,
        allow_base_mismatch=args.allow_base_mismatch,
        dry_run=args.dry_run,
        progress=_progress(not args.quiet),
        threads=args.threads,
    )
    if not args.dry_run and args.fold_into:
        from oftmerge.ops.fold import fold_adapter

        fold_adapter(result, args.fold_into, args.output, shard_size=args.shard_size, overwrite=args.overwrite, threads=args.threads)
    elif not args.dry_run:
        result.save(args.output, overwrite=args.overwrite)
    if not distributed.is_main():  # under accelerate launch only the main process reports
        return 0
    if args.json:
        data = result.provenance()
        data["modules"] = {n: r.to_dict() for n, r in result.modules.items()}
        data["output"] = str(result.saved_to) if result.saved_to else None
        data["dry_run"] = args.dry_run
        print(json.dumps(data, indent=2, sort_keys=True))
    elif not args.quiet:
        print(result.summary(max_modules=args.show))
        print(f"dry run: nothing written (would write {result.output_bytes / 1e6:.2f} MB)" if args.dry_run else f"wrote {result.saved_to}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from oftmerge.ops.convert import convert_adapter

    result = convert_adapter(
        args.adapter, args.output, peft_release=args.peft_release, approximate=args.approximate, overwrite=args.overwrite
    )
    if not args.quiet:
        print(f"converted {args.adapter} (PEFT {result.inputs[0].release_source}) -> {result.saved_to}")
        for w in result.warnings:
            print(f"warning: {w}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from oftmerge.methods import available_methods
    from oftmerge.methods.euclidean import euclidean_methods

    sections = (
        ("so(b) methods (oftmerge merge --method; oftmerge decouple --orthogonal)", available_methods()),
        ("Euclidean methods for residuals and full weights (oftmerge decouple --euclidean)", euclidean_methods()),
    )
    for title, methods in sections:
        print(title)
        for m in methods.values():
            print(f"  {m.name:<12} {m.summary}")
            print(f"  {'':<12} reference: {m.reference}")
            for o in m.options:
                print(f"  {'':<12} --option {o.name}=<{o.type.__name__}> (default {o.default}): {o.help}")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from oftmerge.methods import available_methods

    p = argparse.ArgumentParser(
        prog="oftmerge",
        description="Merge PEFT OFT adapters on the orthogonal group (OrthoMerge).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"oftmerge {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "merge",
        help="merge OFT adapters into one PEFT OFT adapter",
        description="Merge OFT adapters (any PEFT release) into one adapter, module by module, in so(b).",
        epilog=EPILOG_MERGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories written by save_pretrained")
    m.add_argument("-o", "--output", help="output directory (written atomically)")
    m.add_argument("--method", default="orthomerge", choices=list(available_methods()), help="merge method (default: %(default)s; see `oftmerge methods`)")
    m.add_argument("--weights", help="comma-separated weight per adapter; negative = negate that adapter")
    m.add_argument("--scale", type=float, default=1.0, help="multiply the merged generator (default: 1)")
    m.add_argument("--cayley", default="auto", help="output map: auto (inputs' own if they agree, else exact), exact, neumann, neumann:N")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. per_block=true")
    m.add_argument("--base", help="base model directory: checks shapes, gives widths of block_share layers")
    m.add_argument("--peft-release", help="PEFT release that wrote the inputs, when their config does not record it")
    m.add_argument("--allow-base-mismatch", action="store_true", help="merge adapters whose configs name different base models")
    m.add_argument("--fold-into", metavar="BASE", help="write a full model instead: the merge folded into base model directory BASE (see `oftmerge fold`)")
    m.add_argument("--shard-size", default="5GB", help="with --fold-into: largest shard of the model, e.g. 2GB (default: %(default)s)")
    m.add_argument("--threads", type=int, default=1, help="torch threads for the arithmetic (default: %(default)s; see `oftmerge fold --help`)")
    add_report_arguments(m, dry_run="print the plan; read no generator, write nothing")
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser(
        "convert",
        help="upgrade a legacy OFT checkpoint to the current PEFT layout (only where exact)",
        description="Write an OFT adapter of an older PEFT release in the layout PEFT >= 0.18 loads.",
    )
    c.add_argument("adapter")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--peft-release", help="PEFT release that wrote the input, when its config does not record it")
    c.add_argument("--approximate", action="store_true", help="allow the PEFT 0.16-0.17 -> 0.18 Neumann series change")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=_cmd_convert)

    ls = sub.add_parser("methods", help="list the merge methods and their options")
    ls.set_defaults(func=_cmd_methods)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except OftMergeError as exc:
        print(f"oftmerge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
