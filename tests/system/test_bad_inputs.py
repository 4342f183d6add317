"""Every bad input and fault of the table in ``tests/bad_inputs`` (see its docstring for what each case asserts)."""

from __future__ import annotations

import pytest

from bad_inputs import diffusion, errors, numerics, outputs, run_case

CASES = [*outputs.CASES, *errors.CASES, *numerics.CASES, *diffusion.CASES]


def test_the_table_covers_every_class():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    for module in (outputs, errors, numerics, diffusion):
        assert any(c.code == 0 for c in module.CASES) or module is numerics, f"{module.__name__}: needs a good control"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, capsys, monkeypatch)
