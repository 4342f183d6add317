"""The ``oftmerge`` command line: argument parsing only; everything else is the Python API.

Exit codes: 0 success; 2 a bad input or a refused operation (one ``oftmerge: error:`` line on
stderr, ``-v`` for the log); argparse's own usage errors also exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from oftmerge._version import __version__
from oftmerge.errors import OftMergeError

__all__ = ["build_parser", "main"]

log = logging.getLogger("oftmerge")

#: Modules that add subcommands: each has ``register(subparsers)`` (kept apart so each stays small).
SUBCOMMAND_MODULES: list[str] = [
    "oftmerge.cli.merge",
    "oftmerge.cli.inspect",
    "oftmerge.cli.demo",
    "oftmerge.cli.fold",
    "oftmerge.cli.decouple",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oftmerge",
        description="Merge PEFT OFT adapters on the orthogonal group (OrthoMerge).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"oftmerge {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
