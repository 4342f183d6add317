"""The one report printer of the CLI (oftmerge.cli.common.print_report): JSON, text or nothing, and only on the
main process; ``oftmerge decouple --json`` prints valid JSON (in-process, a LoRA expert of the bundled base)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

import oftmerge.cli.common as common
from oftmerge.cli import main
from oftmerge.cli.common import print_report

from helpers import ADAPTERS, save_lora_expert

DATA = {"b": [1, 2], "a": {"x": None, "y": 0.5}}
TEXT = "merged 3 modules\nwrote out"


class Calls:
    def __init__(self):
        self.data = self.text = 0

    def get_data(self):
        self.data += 1
        return DATA

    def get_text(self):
        self.text += 1
        return TEXT


def test_print_report_text(capsys):
    calls = Calls()
    print_report(argparse.Namespace(json=False, quiet=False), data=calls.get_data, text=calls.get_text)
    assert capsys.readouterr().out == TEXT + "\n"
    assert (calls.data, calls.text) == (0, 1)
    print_report(argparse.Namespace(), data=calls.get_data, text=calls.get_text)  # a command without the flags
    assert capsys.readouterr().out == TEXT + "\n"


def test_print_report_json(capsys):
    calls = Calls()
    print_report(argparse.Namespace(json=True, quiet=False), data=calls.get_data, text=calls.get_text)
    out = capsys.readouterr().out
    assert json.loads(out) == DATA
    assert out == json.dumps(DATA, indent=2, sort_keys=True) + "\n"
    assert (calls.data, calls.text) == (1, 0)


def test_print_report_quiet(capsys):
    calls = Calls()
    print_report(argparse.Namespace(json=False, quiet=True), data=calls.get_data, text=calls.get_text)
    assert capsys.readouterr() == ("", "")
    assert (calls.data, calls.text) == (0, 0)


@pytest.mark.parametrize("json_flag", [False, True])
def test_print_report_nothing_off_the_main_process(capsys, monkeypatch, json_flag):
    monkeypatch.setattr(common, "is_main", lambda: False)
    calls = Calls()
    print_report(argparse.Namespace(json=json_flag, quiet=False), data=calls.get_data, text=calls.get_text)
    assert capsys.readouterr() == ("", "")
    assert (calls.data, calls.text) == (0, 0)  # not even computed


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-report")
    base = root / "base"
    shutil.copytree(ADAPTERS / "base", base)
    return base, save_lora_expert(root / "lora", base, seed=101)


def _decouple(base, expert, *extra):
    return ["decouple", "--base", str(base), str(expert), "--euclidean", "ta", "--threads", "1", *extra]


def test_decouple_json_is_valid_json(lora, tmp_path, capsys):
    base, expert = lora
    out = tmp_path / "out"
    assert main(_decouple(base, expert, "-o", str(out), "--json")) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # the whole stdout is one JSON document
    assert report["output"] == str(out.absolute()) and report["dry_run"] is False
    assert report["plan"] and set(report["plan"].values()) <= {"decouple", "euclidean"}
    assert (out / "model.safetensors").is_file() and (out / "oftmerge.json").is_file()
    assert report["totals"]["tensors"] == len(report["plan"]) == 12


def test_decouple_dry_run_json_is_valid_json(lora, capsys):
    base, expert = lora
    assert main(_decouple(base, expert, "--dry-run", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True and report["output"] is None
    assert len(report["plan"]) == 12


def test_decouple_text_and_quiet(lora, tmp_path, capsys):
    base, expert = lora
    assert main(_decouple(base, expert, "-o", str(tmp_path / "a"))) == 0
    text = capsys.readouterr().out
    assert text.strip() and f"wrote {(tmp_path / 'a').absolute()}" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert main(_decouple(base, expert, "-o", str(tmp_path / "b"), "-q")) == 0
    assert capsys.readouterr().out == ""


def test_decouple_reports_only_on_the_main_process(lora, tmp_path, capsys, monkeypatch):
    base, expert = lora
    monkeypatch.setattr(common, "is_main", lambda: False)
    out = tmp_path / "out"
    assert main(_decouple(base, expert, "-o", str(out), "--json")) == 0
    assert capsys.readouterr().out == ""
    assert (out / "model.safetensors").is_file()  # the work is done; only the report is left to the main process
