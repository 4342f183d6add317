"""The command line: a thin layer over the API."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from oftmerge.cli import main

from helpers import load_peft, make_oft_adapter


def test_merge_writes_a_loadable_adapter(tmp_path, capsys, ids):
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1)
    make_oft_adapter(b, seed=2)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--weights", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "method: orthomerge" in out and f"wrote {tmp_path / 'm'}" in out
    load_peft(tmp_path / "m")(ids)
    prov = json.loads((tmp_path / "m" / "oftmerge.json").read_text())
    assert {i["path"]: i["weight"] for i in prov["inputs"]} == {str(a): 1.0, str(b): 2.0}
    assert "lin_sq" in prov["modules"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "library_name: peft" in card and "orthomerge" in card


def test_dry_run_writes_nothing(tmp_path, capsys):
    a = tmp_path / "a"
    make_oft_adapter(a, seed=1)
    assert main(["merge", str(a), str(a), "--dry-run", "-o", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written" in out and "lin_wide" in out
    assert not (tmp_path / "m").exists()


def test_json_report(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1)
    make_oft_adapter(b, seed=2)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--json", "--method", "mean_q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "mean_q" and len(data["inputs"]) == 2 and set(data["modules"]) == {"lin_sq", "lin_wide", "lin_tall"}


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "missing"), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("oftmerge: error:") and "missing: not a directory" in err
    assert main(["merge", str(tmp_path / "missing")]) == 2
    assert "give an output directory with -o/--output" in capsys.readouterr().err


def test_option_parsing(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1)
    make_oft_adapter(b, seed=2)
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "m"), "--option", "per_block=true", "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "m" / "oftmerge.json").read_text())["options"]["per_block"] is True
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "n"), "--option", "per_block"]) == 2


@pytest.mark.slow
def test_module_entry_point_and_methods_listing():
    out = subprocess.run([sys.executable, "-m", "oftmerge", "methods"], capture_output=True, text=True, check=True).stdout
    for name in ("orthomerge", "mean_q", "mean_r", "sequential", "karcher", "ta", "ties", "dare", "tsv"):
        assert f"  {name} " in out
    helptext = subprocess.run([sys.executable, "-m", "oftmerge", "merge", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--dry-run" in helptext and "examples:" in helptext
