"""What every ``oftmerge`` subcommand shares: argument helpers, the progress bars, the one report printer."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from oftmerge.engine.distributed import is_main
from oftmerge.errors import OftMergeError

__all__ = [
    "EXIT_CODES", "ProgressBars", "add_report_arguments", "attach_negative_values", "finite_json", "json_report", "parse_options",
    "parse_weights", "print_report", "progress_bars", "require_output",
]  # fmt: skip

log = logging.getLogger(__name__)

#: the last line of every subcommand's ``--help`` (docs/cli.md, "Exit codes"; :mod:`oftmerge.cli.failures`)
EXIT_CODES = "exit codes: 0 success, 1 internal error (a bug), 2 bad input or refused operation, 3 file system, 4 Hugging Face Hub, 130 interrupted"


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


class ProgressBars:
    """A ``progress(done, total, name, nbytes=None)`` callback drawn as ``tqdm`` bars on stderr, one per phase.

    A phase starts when ``done`` goes back to 1 or ``total`` changes (``merge --fold-into``: the
    merge's modules, then the fold's); ``descriptions`` name the phases in order (the last one
    repeats). ``nbytes``, when the library knows it (the bytes of the module or tensor just
    done), is summed and shown after the bar.
    """

    def __init__(self, tqdm: Any, descriptions: Sequence[str], unit: str):
        self._tqdm, self._descriptions, self._unit = tqdm, list(descriptions), unit
        self._bar: Any = None
        self._phase = 0
        self._bytes = 0

    def __call__(self, done: int, total: int, name: str, nbytes: int | None = None) -> None:
        if self._bar is not None and (done <= self._bar.n or total != self._bar.total):
            self.close()
        if self._bar is None:
            desc = self._descriptions[min(self._phase, len(self._descriptions) - 1)]
            self._bar = self._tqdm(total=total, desc=desc, unit=self._unit, file=sys.stderr, dynamic_ncols=True, leave=True)
            self._phase += 1
            self._bytes = 0
        if nbytes is not None:
            self._bytes += nbytes
            self._bar.set_postfix_str(self._tqdm.format_sizeof(self._bytes, "B", 1024), refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        """End the current bar (left on screen), so that what follows starts on a line of its own."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def progress_bars(args: argparse.Namespace, descriptions: Sequence[str], unit: str = "module") -> Iterator[ProgressBars | None]:
    """The command's ``progress`` callback: :class:`ProgressBars` when stderr is a terminal, without ``-q``,
    on the main process and with ``tqdm`` installed; else None (nothing drawn). The bar is closed on leaving, also
    on an error. (``--json`` keeps the bars: they go to stderr, the report to stdout.)"""
    bars = None
    if _bars_shown(args):
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed; a lazy, optional import
        except ImportError:  # tqdm comes with the peft, hub and diffusion extras; a core install draws no bars
            log.debug("tqdm is not installed: no progress bars")
        else:
            bars = ProgressBars(tqdm, descriptions, unit)
    try:
        yield bars
    finally:
        if bars is not None:
            bars.close()


def hub_bars(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """``huggingface_hub``'s own upload bars (bytes, ETA) only where ours would be drawn (see :func:`progress_bars`)."""
    from oftmerge.integrations.hub import hub_progress_bars

    return hub_progress_bars(_bars_shown(args))


def _bars_shown(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty() and is_main()


def json_report(args: argparse.Namespace, data: dict[str, Any], *, output: Any = None, dry_run: bool = False) -> dict[str, Any]:
    """``data`` with the keys every ``--json`` report has (docs/cli.md, "JSON reports"): ``command``, ``tool``,
    ``versions``, ``output`` (a path or None), ``dry_run`` and ``warnings``; keys ``data`` has are kept."""
    from oftmerge.provenance import library_versions

    out = dict(data)
    out.setdefault("command", getattr(args, "command", None))
    out.setdefault("tool", "oftmerge")
    out.setdefault("versions", library_versions(()))
    out.setdefault("output", None if output is None else str(output))
    out.setdefault("dry_run", bool(dry_run))
    out.setdefault("warnings", [])
    return out


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
