"""``oftmerge inspect``: diagnostics of OFT adapters (see :mod:`oftmerge.ops.inspect`)."""

from __future__ import annotations

import argparse

from oftmerge.cli.common import EXIT_CODES, json_report, print_report


def _cmd_inspect(args: argparse.Namespace) -> int:
    from oftmerge.cli.diffusion import diffusion_inputs, inspect_files
    from oftmerge.ops.inspect import inspect_adapters, render_report

    if diffusion_inputs(args.adapters):
        return inspect_files(args)
    report = inspect_adapters(args.adapters, base=args.base, peft_release=args.peft_release)
    print_report(args, data=lambda: json_report(args, report), text=lambda: render_report(report, max_modules=args.show))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="report release, block sizes, ||Q|| and orthogonality per module; cosines between adapters",
        description=(
            "Describe OFT adapters: the PEFT release detected, per-module block size and count, ||Q||_F "
            "(whole module, and min/median/max per block), the orthogonality error ||R^T R - I||_F of the "
            "rotation PEFT actually applies, and for several adapters the cosine between their generators "
            "and the magnitude correction c the default merge would use."
        ),
        epilog=EXIT_CODES,
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter directories or Hub ids NS/NAME[@REV], or diffusion OFT .safetensors files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--show", type=int, default=20, help="modules listed per adapter (default: %(default)s)")
    p.add_argument("--base", help="base model directory or Hub id (checks shapes; widths of block_share layers); default: the "
                   "adapters' base_model_name_or_path when it is at hand without a download")
    p.add_argument("--peft-release", help="PEFT release that wrote the inputs, when their config does not record it")
    p.add_argument("--format", help="diffusion OFT files: read them as this format (lycoris, kohya, onetrainer; default: detected)")
    p.set_defaults(func=_cmd_inspect)
