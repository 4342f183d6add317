"""Recipes (issue 19, item 1): a YAML file runs a merge, a fold, a merge folded into a base or a decoupled merge, as the CLI would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ADAPTERS

A, B, BASE = ADAPTERS / "oft-upper", ADAPTERS / "oft-reverse", ADAPTERS / "base"


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oftmerge", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_merge_recipe_gives_the_cli_bytes(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "m.yaml", f"oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [{A}, {B}]\n  weights: [1, 0.5]\noutput: from-recipe\n")
    assert _cli("run", recipe, "-q", cwd=tmp_path).returncode == 0
    assert _cli("merge", A, B, "--weights", "1,0.5", "-o", "direct", "-q", cwd=tmp_path).returncode == 0
    assert (tmp_path / "from-recipe" / "adapter_model.safetensors").read_bytes() == (tmp_path / "direct" / "adapter_model.safetensors").read_bytes()


def test_fold_and_merge_fold_recipes(tmp_path: Path) -> None:
    fold = _write(tmp_path / "f.yaml", f"oftmerge: 1\ncommand: fold\nconfig:\n  adapter: {A}\n  base: {BASE}\nrun:\n  shard_size: 1MB\n")
    assert _cli("run", fold, "-o", "folded", "-q", cwd=tmp_path).returncode == 0
    assert _cli("fold", A, "--base", BASE, "-o", "direct", "--shard-size", "1MB", "-q", cwd=tmp_path).returncode == 0
    ours = sorted(p.name for p in (tmp_path / "folded").glob("*.safetensors"))
    assert ours and ours == sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    for name in ours:
        assert (tmp_path / "folded" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    both = _write(tmp_path / "mf.yaml", f"oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [{A}, {B}]\n  base: {BASE}\n  output: model\n")
    assert _cli("run", both, "-o", "merged-model", "-q", cwd=tmp_path).returncode == 0
    assert (tmp_path / "merged-model" / "config.json").is_file()


@pytest.mark.parametrize(("text", "needle"), [
    ("oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [A]\n  wieghts: [1]\n", r"key config.wieghts (line 5): unknown key for merge"),
    ("oftmerge: 1\ncommand: blend\nconfig: {}\n", r"key command (line 2): 'blend' is not a command"),
    ("oftmerge: 2\ncommand: merge\nconfig: {}\n", r"key oftmerge (line 1): recipe version 2"),
    ("oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [a\n", r"not valid YAML at line 5"),
    ("oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [A]\nrun:\n  threads: 0\n", r"key run (line 5): threads must be a whole number"),
    ("oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [A]\nrun:\n  overwrite: true\n", r"key run.overwrite (line 6): unknown key"),
    ("oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [A]\nextra: 1\n", r"key extra (line 5): unknown key"),
    ("- a\n- b\n", r"a recipe is a mapping"),
])  # fmt: skip
def test_bad_recipes_name_the_key_and_line(tmp_path: Path, text: str, needle: str) -> None:
    proc = _cli("run", _write(tmp_path / "r.yaml", text), "-o", "out", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_checks_input_hashes(tmp_path: Path) -> None:
    import shutil

    from oftmerge.ops.recipe import fingerprint

    a = tmp_path / "a"
    shutil.copytree(A, a)
    recipe = _write(tmp_path / "r.yaml", f"oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [{a}]\ninputs:\n  {a}: {fingerprint(a)}\n")
    assert _cli("run", recipe, "-o", "ok", "-q", cwd=tmp_path).returncode == 0
    (a / "adapter_model.safetensors").write_bytes((B / "adapter_model.safetensors").read_bytes())
    proc = _cli("run", recipe, "-o", "changed", cwd=tmp_path)
    assert proc.returncode == 2 and "changed (SHA-256" in proc.stderr and "--on-changed warn" in proc.stderr
    assert not (tmp_path / "changed").exists()
    proc = _cli("run", recipe, "-o", "changed", "--on-changed", "warn", cwd=tmp_path)
    assert proc.returncode == 0 and "changed (SHA-256" in proc.stdout


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "m.yaml", f"oftmerge: 1\ncommand: merge\nconfig:\n  adapters: [{A}, {B}]\noutput: out\n")
    proc = _cli("run", recipe, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0 and "dry run" in proc.stdout
    assert not (tmp_path / "out").exists()


def _tensor_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors"}


def test_every_output_holds_the_recipe_that_reruns_it(tmp_path: Path) -> None:
    from helpers import save_lora_expert

    lora = save_lora_expert(tmp_path / "lora", BASE, seed=3)
    runs = {
        "merged": ["merge", A, B, "--weights", "1,2", "-o", "merged"],
        "folded": ["fold", A, "--base", BASE, "-o", "folded"],
        "merged-model": ["merge", A, B, "--fold-into", BASE, "-o", "merged-model"],
        "decoupled": ["decouple", "--base", BASE, lora, "-o", "decoupled", "--euclidean", "ta", "--orthogonal", "orthomerge"],
    }
    for out, argv in runs.items():
        assert _cli(*argv, "-q", cwd=tmp_path).returncode == 0, out
        recipe = tmp_path / out / "oftmerge.yaml"
        assert recipe.is_file(), out
        again = _cli("run", recipe, "-o", f"{out}-again", "-q", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert _tensor_files(tmp_path / out) == _tensor_files(tmp_path / f"{out}-again"), out
        assert (tmp_path / f"{out}-again" / "oftmerge.yaml").read_text() == recipe.read_text()
