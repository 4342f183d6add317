"""Scale-out under ``accelerate launch``: 2 CPU processes give the same bytes as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oftmerge.cli import main
from oftmerge.engine import distributed

from helpers import ADAPTERS, ROOT

LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "oftmerge",
]  # fmt: skip


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(LAUNCH + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_share_is_a_deterministic_balanced_partition():
    costs = [5, 1, 1, 3, 3, 2, 0]
    parts = [distributed.Group(r, 3, None).share(costs) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    assert parts == [distributed.Group(r, 3, None).share(costs) for r in range(3)]
    loads = [sum(max(costs[i], 1) for i in p) for p in parts]
    assert max(loads) - min(loads) <= 1


def test_not_launched_means_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.current() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current() is None


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(tmp_path):
    inputs = [str(ADAPTERS / n) for n in ("oft-upper", "oft-reverse", "oft-add", "oft-sort")]
    base = str(ADAPTERS / "base")
    cases = {
        "merge": ["merge", *inputs, "-q"],
        "fold": ["fold", inputs[0], "--base", base, "--shard-size", "300KB", "-q"],  # 14 shards
        "merge-fold": ["merge", *inputs[:2], "--fold-into", base, "-q"],
    }
    for name, args in cases.items():
        assert main([*args, "-o", str(tmp_path / f"{name}-1")]) == 0
        proc = _launch([*args, "-o", f"{name}-2"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        one, two = _files(tmp_path / f"{name}-1"), _files(tmp_path / f"{name}-2")
        assert list(one) == list(two), name
        for f in one:
            assert one[f] == two[f], f"{name}: {f} differs between 1 and 2 processes"
        if name == "merge":  # the bundled adapters mix rotation maps: a warning, said by the main process only
            assert proc.stderr.count("inputs use different rotation maps") == 1, proc.stderr[-2000:]
    assert len([f for f in _files(tmp_path / "fold-2") if f.endswith(".safetensors")]) == 14
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers

    # every process fails cleanly (none waits at a barrier) when the output exists
    proc = _launch(cases["fold"] + ["-o", "fold-2"], tmp_path)
    assert proc.returncode != 0 and "already exists" in proc.stderr


def _finetune(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A "full finetune" of the bundled tiny model: every tensor plus seeded noise, saved like save_pretrained."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(base / "model.safetensors")
    noisy = {k: (t.float() + torch.randn(t.shape, generator=g) * scale * float(t.float().std())).to(t.dtype) for k, t in tensors.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


@pytest.mark.slow
def test_two_processes_decouple_to_the_same_bytes(tmp_path):
    """decouple under accelerate launch: tensors split by shard (balanced by their solves), reports gathered into
    oftmerge.json, the model-wide TIES trim's histograms summed over processes: every file equal to one process's
    with the same thread count (LAPACK may round differently on more threads: --threads pins it)."""
    base = ADAPTERS / "base"
    experts = [str(_finetune(base, tmp_path / f"full{i}", seed=i)) for i in range(2)]
    common = ["decouple", "--base", str(base), *experts, "--shard-size", "400KB", "--threads", "1", "-q"]
    cases = {"ortho": common, "ties-model": [*common, "--orthogonal", "none", "--option", "trim=model"]}
    for name, args in cases.items():
        assert main([*args, "-o", str(tmp_path / f"{name}-1")]) == 0
        proc = _launch([*args, "-o", f"{name}-2"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        one, two = _files(tmp_path / f"{name}-1"), _files(tmp_path / f"{name}-2")
        assert list(one) == list(two) and len([f for f in one if f.endswith(".safetensors")]) >= 3, name
        for f in one:
            assert one[f] == two[f], f"{name}: {f} differs between 1 and 2 processes"
    report = json.loads((tmp_path / "ortho-2" / "oftmerge.json").read_text())
    assert report["totals"]["decoupled"] > 0 and len(report["layers"]) == report["totals"]["tensors"]
    assert proc.stderr.count("fell back") <= 1  # warnings are said once, by the main process
