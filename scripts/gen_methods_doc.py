"""Write docs/methods.md: the table of every merge method and its options, from the registry.

    .venv/bin/python scripts/gen_methods_doc.py            # (re)write docs/methods.md
    .venv/bin/python scripts/gen_methods_doc.py --check    # exit 1 if docs/methods.md is out of date

The page is :func:`oftmerge.methods.methods_table` under a short header. ``tests/unit/test_methods_doc.py``
compares the stored page with :func:`render`, so a method or option added to the registry without
regenerating the page fails the suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "methods.md"

HEADER = """# Merge methods

Every merge method oftmerge offers, with its options and defaults: the so(d) methods of
`oftmerge merge --method` (and `oftmerge decouple --orthogonal`), and the Euclidean methods of
`oftmerge decouple --euclidean`. Options are given as `--option KEY=VALUE` (`oftmerge merge`, and
the Euclidean method of `oftmerge decouple`) or `--orthogonal-option KEY=VALUE` (the so(d) method
of `oftmerge decouple`); in the Python API as `method_options=`, `euclidean_options=` and
`orthogonal_options=`. Values are checked strictly: a boolean is true/false, yes/no or 1/0 (any
case), an integer a whole number (`1.7` is refused, not truncated), a float a finite number, each
within the range its row states; anything else is a one-line error. This page is generated from the
method registry (`oftmerge.methods.methods_table()`) by `scripts/gen_methods_doc.py`; do not edit
it by hand. `oftmerge methods` prints the same list. The formulas and the decisions behind them:
[algorithm.md](algorithm.md) (so(d) methods) and
[decoupling.md](decoupling.md#the-euclidean-methods-oftmergemethodseuclideanpy) (Euclidean methods).

"""


def render() -> str:
    """The text of docs/methods.md for the methods registered now."""
    from oftmerge.methods import methods_table

    return HEADER + methods_table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/methods.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else None
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run scripts/gen_methods_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
