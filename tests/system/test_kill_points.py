"""Fault injection: SIGKILL before the Nth ``os.replace`` / ``os.rename`` / ``os.fsync`` / ``renameat2`` of merge, fold,
merge --fold-into and decouple, with and without an output already there (``--overwrite``), with ``renameat2`` and
without it (the lock-file fallback).

After each kill the output path holds the old output or the new one, complete, byte for byte (with ``renameat2``
at once; without it, once the next run recovered), never a half one, never none when one was there; ``$TMPDIR``
is empty; and the next run on the path (``oftmerge merge A B -o OUT``, no ``--overwrite``) recovers and leaves no
``.OUT.*`` behind: it fails with "already exists" over the old or new output, or writes its own where none was.

Runs are forked from one warm Python process (:data:`ZYGOTE`), so a kill costs a fork, not an interpreter start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ADAPTERS, ROOT, save_full_expert

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill helper forks")

#: the warm process: reads one job (JSON) per line, forks a child that runs it and answers how the child ended
ZYGOTE = r"""
import json, os, signal, sys, tempfile, traceback
import torch
torch.set_num_threads(1)
from oftmerge.cli import main
from oftmerge.engine import fsops

POINTS = {"replace": (os, "replace"), "rename": (os, "rename"), "fsync": (os, "fsync"), "renameat2": (fsops, "renameat2")}

def child(job):
    os.chdir(job["cwd"])
    os.environ["TMPDIR"] = tempfile.tempdir = job["tmpdir"]
    if job.get("fallback"):
        fsops.RENAMEAT2 = None
    counts = dict.fromkeys(POINTS, 0)
    for name, (mod, attr) in POINTS.items():
        def wrapper(*args, _orig=getattr(mod, attr), _name=name, **kwargs):
            counts[_name] += 1
            if _name == job.get("point") and counts[_name] == job.get("n"):
                os.kill(os.getpid(), signal.SIGKILL)  # before the call
            return _orig(*args, **kwargs)
        setattr(mod, attr, wrapper)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    out = os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)
    try:
        code = main(job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        traceback.print_exc()
        code = 99
    with open(job["counts"], "w") as f:
        json.dump(counts, f)
    sys.stderr.flush()
    os._exit(int(code or 0))

for line in sys.stdin:
    job = json.loads(line)
    if job.get("warm"):  # run in this process: what the commands import lazily is then imported once, before any fork
        import threading
        os.chdir(job["cwd"])
        saved = os.dup(2)
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 2)
        try:
            code = main(job["argv"])
        finally:
            os.dup2(saved, 2)
        print(json.dumps({"signal": None, "code": code, "threads": threading.active_count()}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        child(job)
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    print(json.dumps({"signal": sig, "code": code}), flush=True)
"""


class Zygote:
    """The warm process; :meth:`run` runs ``argv`` (the CLI's) in a forked child, killed before call ``n`` of ``point``."""

    def __init__(self, root: Path):
        self.root = root
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def run(self, argv: list[str], cwd: Path, *, point: str | None = None, n: int = 0, fallback: bool = False, warm: bool = False) -> dict:
        tmpdir = cwd / "tmp"
        tmpdir.mkdir(exist_ok=True)
        job = {"argv": [str(a) for a in argv], "cwd": str(cwd), "tmpdir": str(tmpdir), "point": point, "n": n, "fallback": fallback, "warm": warm,
               "stderr": str(self.root / "stderr.txt"), "counts": str(self.root / "counts.json")}  # fmt: skip
        (self.root / "counts.json").unlink(missing_ok=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        result = json.loads(line)
        result["stderr"] = (self.root / "stderr.txt").read_text()
        counts = self.root / "counts.json"
        result["counts"] = json.loads(counts.read_text()) if counts.exists() else None
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory, inputs):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    warm = tmp_path_factory.mktemp("warm")
    for k, (argv, _) in enumerate(COMMANDS.values()):
        got = z.run([a.replace("{in}", str(inputs)) for a in argv] + ["-o", warm / f"out{k}", "-q"], warm, warm=True)
        assert got["code"] == 0, got["stderr"]
    assert got["threads"] == 1, f"threads left running in the zygote before it forks: {got['threads']}"
    yield z
    z.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Copies of the bundled adapters and base, and two full "experts" of the base (noise added), for decouple."""
    root = tmp_path_factory.mktemp("inputs")
    for name, src in (("a", "oft-upper"), ("b", "oft-reverse"), ("c", "oft-sort"), ("base", "base")):
        shutil.copytree(ADAPTERS / src, root / name)
    for k in (1, 2):
        save_full_expert(root / f"e{k}", root / "base", seed=k)
    return root


def _decouple(*experts: str) -> list[str]:
    return ["decouple", "--base", "{in}/base", *experts, "--orthogonal", "none", "--euclidean", "ta", "--shard-size", "1MB"]


#: command -> (the run that is killed, the one that wrote the output already there); "{in}" is the inputs' directory
COMMANDS = {
    "merge": (["merge", "{in}/a", "{in}/b"], ["merge", "{in}/a", "{in}/c"]),
    "fold": (["fold", "{in}/a", "--base", "{in}/base", "--shard-size", "1MB"], ["fold", "{in}/c", "--base", "{in}/base"]),
    "fold-into": (["merge", "{in}/a", "{in}/b", "--fold-into", "{in}/base", "--shard-size", "1MB"], ["merge", "{in}/a", "{in}/c"]),
    "decouple": (_decouple("{in}/e1", "{in}/e2"), _decouple("{in}/e2")),
}
POINTS = ("replace", "rename", "fsync", "renameat2")


def _digests(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out."))


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _kill_everywhere(zygote: Zygote, inputs: Path, work: Path, command: str, prior: bool, fallback: bool, limit: int | None) -> int:
    """Kill ``command`` before each call of each point in turn and check each aftermath; returns the kills.

    ``limit``: only the first and the last ``limit`` calls of each point (the writing, and the commit).
    """
    new_argv, old_argv = ([a.replace("{in}", str(inputs)) for a in argv] for argv in COMMANDS[command])
    out = work / "out"
    flags = ["-o", out, "-q"]
    untouched = _tree(inputs)
    old = None
    if prior:  # the output already there, kept aside to put back before each kill
        got = zygote.run([*old_argv, *flags], work)
        assert got["code"] == 0, got["stderr"]
        shutil.copytree(out, work / "template")
        old = _digests(out)
    run_flags = [*flags, "--overwrite"] if prior else flags
    ref = zygote.run([*new_argv, *run_flags], work, fallback=fallback)  # a complete run: the new output, and the counts
    assert ref["code"] == 0, ref["stderr"]
    new, counts = _digests(out), ref["counts"]
    assert new != old
    kills = 0
    for point in POINTS:
        total = counts[point]
        chosen = range(1, total + 1) if limit is None else sorted({*range(1, min(limit, total) + 1), *range(max(1, total - limit + 1), total + 1)})
        for n in chosen:
            shutil.rmtree(out, ignore_errors=True)
            if prior:
                shutil.copytree(work / "template", out)
            assert _leftovers(work) == []
            got = zygote.run([*new_argv, *run_flags], work, point=point, n=n, fallback=fallback)
            where = f"{command} {'over an existing output ' if prior else ''}killed before {point} #{n} ({'lock file' if fallback else 'renameat2'})"
            assert got["signal"] == 9 or got["code"] == 0, f"{where}: {got}"
            kills += got["signal"] == 9
            now = _digests(out)
            journalled = any(name.endswith(".journal") for name in _leftovers(work))
            if fallback and prior and now is None:  # between its two renames: the journal names the old output
                assert journalled, f"{where}: no output and no journal: {_leftovers(work)}"
            else:
                assert now in ((old, new) if prior else (None, new)), f"{where}: a half output at {out}: {sorted(now or {})}"
            left = [p.name for p in (work / "tmp").iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
            assert not left, f"{where}: left in $TMPDIR: {left}"
            after = zygote.run(["merge", inputs / "a", inputs / "b", *flags], work, fallback=fallback)  # the next run on the path
            if prior or now is not None:
                assert after["code"] == 2 and "already exists" in after["stderr"], f"{where}: next run: {after}"
                assert _digests(out) in (old, new), f"{where}: after recovery: {sorted(_digests(out) or {})}"
            else:
                assert after["code"] == 0, f"{where}: next run: {after}"
            assert "Traceback" not in after["stderr"], after["stderr"]
            assert _leftovers(work) == [], f"{where}: left behind after the next run: {_leftovers(work)}"
    assert _tree(inputs) == untouched, "an input changed"
    return kills


@pytest.mark.parametrize(("command", "prior", "fallback"), [("merge", True, False), ("merge", True, True), ("merge", False, False)])
def test_kill_at_every_point(zygote, inputs, tmp_path, command, prior, fallback):
    assert _kill_everywhere(zygote, inputs, tmp_path, command, prior, fallback, limit=None) > 5


@pytest.mark.parametrize(
    ("command", "prior", "fallback"), [("fold", True, False), ("fold", False, True), ("decouple", True, False), ("fold-into", True, True)]
)
def test_kill_at_the_first_and_last_points(zygote, inputs, tmp_path, command, prior, fallback):
    assert _kill_everywhere(zygote, inputs, tmp_path, command, prior, fallback, limit=2) > 3


@pytest.mark.slow
@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock-file"])
@pytest.mark.parametrize("prior", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_at_every_point_of_every_command(zygote, inputs, tmp_path, command, prior, fallback):
    assert _kill_everywhere(zygote, inputs, tmp_path, command, prior, fallback, limit=None) > 3
