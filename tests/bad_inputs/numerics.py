"""Bad-input cases: numerics (see the package docstring)."""

from __future__ import annotations

from bad_inputs import Case

CASES: list[Case] = [
    Case("numerics-good-merge", lambda ws: ["merge", ws / "a", ws / "b", "-o", ws / "out", "-q"], code=0),
]
