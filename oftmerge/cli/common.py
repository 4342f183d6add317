"""What every ``oftmerge`` subcommand shares: argument helpers, the progress line, the one report printer."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from oftmerge.engine.distributed import is_main
from oftmerge.errors import OftMergeError

__all__ = ["add_report_arguments", "parse_options", "parse_weights", "print_report", "progress_line", "require_output"]


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise OftMergeError(f"--weights expects comma-separated numbers, e.g. 1,1,0.5; got {text!r}") from None


def parse_options(items: Sequence[str]) -> dict[str, Any]:
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


def progress_line(enabled: bool) -> Callable[[int, int, str], None] | None:
    """A ``progress(done, total, name)`` that rewrites one stderr line, when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None

    def report(done: int, total: int, name: str) -> None:
        sys.stderr.write(f"\r  merged {done}/{total} modules  {name[-50:]:<50}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def print_report(args: argparse.Namespace, *, data: Callable[[], dict[str, Any]], text: Callable[[], str]) -> None:
    """Print a command's report: JSON with ``--json``, else the text unless ``-q``; only the main process of a launched run."""
    if not is_main():  # under accelerate launch only the main process reports
        return
    if getattr(args, "json", False):
        print(json.dumps(data(), indent=2, sort_keys=True))
    elif not getattr(args, "quiet", False):
        print(text())
