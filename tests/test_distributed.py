"""Scale-out under ``accelerate launch``: 2 CPU processes give the same bytes as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from oftmerge import distributed
from oftmerge.cli import main

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "adapters"
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
    assert len([f for f in _files(tmp_path / "fold-2") if f.endswith(".safetensors")]) == 14
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers

    # every process fails cleanly (none waits at a barrier) when the output exists
    proc = _launch(cases["fold"] + ["-o", "fold-2"], tmp_path)
    assert proc.returncode != 0 and "already exists" in proc.stderr
