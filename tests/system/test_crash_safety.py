"""Crash safety: a fold killed with SIGKILL (in a child process) at each stage leaves nothing that looks complete,
and the next run cleans up after it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from oftmerge.ops.fold import fold_adapter

from helpers import digests

_CRASH_CHILD = r"""
import os, signal, sys
from oftmerge.engine import commit
from oftmerge.formats import shards

point, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def kill_after(obj, attr):
    orig = getattr(obj, attr)
    def wrapper(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(obj, attr, wrapper)

if point == "tensor":      # after n tensors reached the shard files
    kill_after(shards.ShardedWriter, "_write_planned")
elif point == "close":     # shards renamed and index written, small files not yet copied
    kill_after(shards.ShardedWriter, "close")
elif point == "finalize":  # everything written and fsynced, just before the rename into place
    kill_after(commit, "fsync_dir")
from oftmerge.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("point", "n"), [("tensor", 1), ("tensor", 3), ("close", 1), ("finalize", 1)])
def test_killed_fold_leaves_nothing_that_looks_complete(llama, tmp_path, point, n):
    adapter, base = llama["adapters"]["neumann"], llama["bases"]["f32-sharded"]
    reference = fold_adapter(adapter, base, tmp_path / "reference", shard_size="60KB").out_dir
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD)
    cmd = [sys.executable, str(script), point, str(n), "fold", str(adapter), "--base", str(base), "-o", str(out), "--shard-size", "60KB", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -9, stderr[-2000:]
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and p.is_dir()]
    assert len(partial) == 1 and partial[0].name.startswith(".out.partial-")  # clearly partial: hidden, named so
    assert (tmp_path / (partial[0].name + ".pid")).read_text().split()[0] == str(proc.pid)  # the dead writer's pid
    assert not (partial[0] / "README.md").exists() or point == "finalize"
    fold_adapter(adapter, base, out, shard_size="60KB")  # the re-run removes the dead run's directory
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert digests(out) == digests(reference)
