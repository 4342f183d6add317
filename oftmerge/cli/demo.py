"""``oftmerge demo``: merge the bundled adapters, reload them with PEFT, print the score table."""

from __future__ import annotations

import argparse

from oftmerge.cli.common import EXIT_CODES


def _cmd_demo(args: argparse.Namespace) -> int:
    from oftmerge.demo.run import run_demo

    run_demo(args.adapters, out_dir=args.out, n_per_task=args.n, methods=args.methods, parts=args.only or ("llm", "diffusion"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="merge the bundled tiny OFT adapters, reload with PEFT, and score base, experts and merges",
        description=(
            "Merge the OFT experts in adapters/ with OrthoMerge and baselines, save each merged adapter, "
            "reload it with stock PEFT, and print exact-match accuracy and answer loss on every task."
        ),
        epilog=EXIT_CODES,
    )
    p.add_argument("--adapters", help="directory with base/ and oft-*/ (default: the repository's adapters/)")
    p.add_argument("--out", help="keep the merged adapters here (default: a temporary directory)")
    p.add_argument("-n", type=int, default=200, help="test prompts per task (default: %(default)s)")
    p.add_argument("--methods", nargs="+", help="merge methods to compare (default: orthomerge mean_q sequential)")
    p.add_argument("--only", nargs="+", choices=("llm", "diffusion"),
                   help="run only these parts: the tiny Llama's PEFT experts (llm), the tiny U-Net's LyCORIS and PEFT experts (diffusion)")
    p.set_defaults(func=_cmd_demo)
