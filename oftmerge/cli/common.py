"""What every ``oftmerge`` subcommand shares: argument helpers, the progress line, the one report printer."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from oftmerge.engine.distributed import is_main
from oftmerge.errors import OftMergeError

__all__ = ["add_report_arguments", "attach_negative_values", "finite_json", "parse_options", "parse_weights", "print_report", "progress_line", "require_output"]


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise OftMergeError(f"--weights expects comma-separated numbers, e.g. 1,1,0.5; got {text!r}") from None


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict of strings; the method's registry entry coerces and checks each value
    (:meth:`oftmerge.methods.MethodOption.coerce`: ``per_block=maybe`` is refused, not taken as true)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise OftMergeError(f"--option expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


#: options whose value is a number (or a list of numbers) that may be negative
NUMERIC_FLAGS = ("--weights", "--scale", "--max-rotation", "--threads", "--show")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|infinity|nan)"
_NEGATIVE_LIST = re.compile(rf"-(?:{_NUMBER})(?:\s*,\s*(?:{_NUMBER}))*\s*,?", re.IGNORECASE)


def attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--weights -1,-1`` as ``--weights=-1,-1``: argparse takes a value that starts with ``-`` for an option
    unless it is a plain negative number, so it refuses ``-1,-1`` and ``-1e3`` with "expected one argument".

    Only the values of :data:`NUMERIC_FLAGS` that look like (lists of) numbers are attached, and
    nothing after ``--``.

    >>> attach_negative_values(["merge", "A", "B", "--weights", "-1,-1", "--scale", "-2e-1", "-o", "out"])
    ['merge', 'A', 'B', '--weights=-1,-1', '--scale=-2e-1', '-o', 'out']
    """
    out: list[str] = []
    items = list(argv)
    k = 0
    while k < len(items):
        item = items[k]
        if item == "--":
            out += items[k:]
            break
        if item in NUMERIC_FLAGS and k + 1 < len(items) and _NEGATIVE_LIST.fullmatch(items[k + 1]):
            out.append(f"{item}={items[k + 1]}")
            k += 2
            continue
        out.append(item)
        k += 1
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
        print(json.dumps(finite_json(data()), indent=2, sort_keys=True, allow_nan=False))
    elif not getattr(args, "quiet", False):
        print(text())


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that it is valid JSON (``null``).

    A report may carry a non-finite number (``inspect`` of a broken adapter: an orthogonality error
    that is NaN); bare ``NaN`` is not JSON and breaks every strict parser (``jq``, browsers).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
