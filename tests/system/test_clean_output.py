"""Clean output: the demo prints no third-party warning or progress bar; every ``--json`` report is one JSON
document on stdout with the common keys (docs/cli.md, "JSON reports"); every ``--help`` lists the exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from oftmerge.cli import main
from oftmerge.cli.common import EXIT_CODES

from helpers import ADAPTERS, save_lora_expert

pytestmark = pytest.mark.skipif(not (ADAPTERS / "base").is_dir(), reason="bundled adapters missing")

DIFFUSION = ADAPTERS / "diffusion"
COMMON_KEYS = {"command", "tool", "versions", "output", "dry_run", "warnings"}


def test_demo_prints_no_third_party_warnings():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    parts = ["llm", "diffusion"] if (DIFFUSION / "base").is_dir() else ["llm"]
    run = subprocess.run([sys.executable, "-m", "oftmerge", "demo", "--only", *parts, "-n", "4"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "exact-match accuracy" in run.stdout
    assert not [line for line in run.stderr.splitlines() if "Warning" in line], run.stderr
    assert "Loading weights" not in run.stderr and "%|" not in run.stderr
    assert run.stderr == "", run.stderr  # nor LyCORIS's log lines, nor anything else


def _json(capfd, argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    report = json.loads(out)  # the whole stdout is one JSON document
    assert COMMON_KEYS <= set(report), sorted(report)
    assert report["command"] == argv[0] and report["tool"] == "oftmerge" and report["versions"]["oftmerge"]
    assert isinstance(report["warnings"], list) and isinstance(report["dry_run"], bool)
    return report


def test_json_reports_of_peft_adapters(tmp_path, capfd):
    upper, reverse, base = str(ADAPTERS / "oft-upper"), str(ADAPTERS / "oft-reverse"), str(ADAPTERS / "base")
    merged = _json(capfd, ["merge", upper, reverse, "-o", str(tmp_path / "m")])
    assert merged["output"] == str(tmp_path / "m") and merged["modules"]
    assert _json(capfd, ["merge", upper, reverse, "--dry-run"])["output"] is None
    folded = _json(capfd, ["fold", upper, "--base", base, "-o", str(tmp_path / "f")])
    assert folded["output"] == str(tmp_path / "f") and folded["shards"]
    assert _json(capfd, ["fold", upper, "--base", base, "--dry-run"])["dry_run"] is True
    assert _json(capfd, ["convert", upper, "-o", str(tmp_path / "c")])["output"] == str(tmp_path / "c")
    inspected = _json(capfd, ["inspect", upper, reverse])
    assert inspected["output"] is None and len(inspected["adapters"]) == 2
    pushed = _json(capfd, ["push", str(tmp_path / "m"), "me/merged", "--dry-run"])
    assert pushed["dry_run"] is True and pushed["files"]


def test_json_report_of_decouple(tmp_path, capfd):
    expert = save_lora_expert(tmp_path / "lora", ADAPTERS / "base", seed=1)
    out = tmp_path / "out"
    report = _json(capfd, ["decouple", "--base", str(ADAPTERS / "base"), str(expert), "--euclidean", "ta", "--threads", "1", "-o", str(out)])
    assert report["output"] == str(out.absolute()) and report["plan"]


@pytest.mark.skipif(not (DIFFUSION / "base").is_dir(), reason="bundled diffusion fixtures missing")
def test_json_reports_of_diffusion_files(tmp_path, capfd):
    a, b = str(DIFFUSION / "lycoris-diag-oft-stripes.safetensors"), str(DIFFUSION / "lycoris-diag-oft-constrained-diagonals.safetensors")
    assert _json(capfd, ["merge", a, b, "-o", str(tmp_path / "m.safetensors")])["output"] == str(tmp_path / "m.safetensors")
    assert _json(capfd, ["fold", a, "--base", str(DIFFUSION / "base"), "-o", str(tmp_path / "f")])["output"] == str(tmp_path / "f")
    kohya = str(DIFFUSION / "lycoris-kohya-diag-oft-diagonals.safetensors")  # LyCORIS names, sd-scripts layout
    assert _json(capfd, ["convert", kohya, "--to", "lycoris", "-o", str(tmp_path / "c.safetensors")])["output"] == str(tmp_path / "c.safetensors")
    assert len(_json(capfd, ["inspect", a, b])["files"]) == 2


@pytest.mark.parametrize("command", ["merge", "convert", "methods", "inspect", "demo", "fold", "push", "decouple"])
def test_help_lists_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert " ".join(EXIT_CODES.split()) in " ".join(capsys.readouterr().out.split())
