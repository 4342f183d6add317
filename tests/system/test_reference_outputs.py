"""Every output byte of a fixed set of CLI runs equals the record made before the redesign.

The record (tests/fixtures/reference_outputs.json) holds the SHA-256 of each file that merge,
convert, fold, merge --fold-into and decouple wrote for 39 runs on the bundled adapters, made with
the code before the plan/kernel/engine redesign (scripts/reference_outputs.py --write). A change
that alters one byte of one output fails here. Re-record only on purpose.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("reference_outputs", ROOT / "scripts" / "reference_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_outputs_are_byte_identical_to_the_record():
    script = _script()
    record = json.loads(script.RECORD.read_text(encoding="utf-8"))
    now = script.run_cases()
    assert set(now) == set(record)
    changed = {case: sorted(f for f in set(files) | set(now[case]) if files.get(f) != now[case].get(f)) for case, files in record.items()}
    changed = {case: files for case, files in changed.items() if files}
    assert not changed, f"outputs differ from the record: {changed}"
    assert sum(len(files) for files in record.values()) > 100  # the record is not empty


def test_the_record_covers_every_command():
    script = _script()
    record = json.loads(script.RECORD.read_text(encoding="utf-8"))
    kinds = {case.split("-")[0] for case, files in record.items() if "refused" not in files}
    assert kinds == {"merge", "fold", "decouple", "convert"}
