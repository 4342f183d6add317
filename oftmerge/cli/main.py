"""The ``oftmerge`` command line: argument parsing only; everything else is the Python API.

Exit codes (docs/cli.md, "Exit codes"; :mod:`oftmerge.cli.failures`): 0 success; 1 an internal
error; 2 a bad input or a refused operation (argparse's own usage errors too); 3 the file system
(no space, no permission, read-only); 4 the Hugging Face Hub; 130 interrupted. A failure prints
one ``oftmerge: error:`` line on stderr; ``-v`` adds the log and the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from oftmerge._version import __version__
from oftmerge.cli.common import attach_negative_values
from oftmerge.cli.failures import explain

__all__ = ["build_parser", "main"]

log = logging.getLogger("oftmerge")

#: Modules that add subcommands: each has ``register(subparsers)`` (kept apart so each stays small).
SUBCOMMAND_MODULES: list[str] = [
    "oftmerge.cli.merge",
    "oftmerge.cli.inspect",
    "oftmerge.cli.demo",
    "oftmerge.cli.fold",
    "oftmerge.cli.decouple",
    "oftmerge.cli.run",
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
    args = parser.parse_args(attach_negative_values(sys.argv[1:] if argv is None else argv))  # --weights -1,-1
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:  # every failure: one line and its exit code (cli/failures.py)
        code, message = explain(exc, getattr(args, "output", None))
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"oftmerge: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
