"""oftmerge.engine: the output guard and atomic commit, the process group of one, prefetch and thread counts,
and the streaming model writer against ShardedWriter's bytes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from oftmerge.engine import distributed
from oftmerge.engine.commit import atomic_directory, check_output, output_directory, remove_stale_partials
from oftmerge.engine.distributed import LOCAL, LocalGroup, is_main, process_group
from oftmerge.engine.model import write_model
from oftmerge.engine.threads import Prefetch, torch_threads
from oftmerge.errors import OftMergeError, OutputExistsError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.shards import ShardedWriter, plan_model

from helpers import digests

# -- commit: check_output --------------------------------------------------------------------------------


def test_check_output_refuses_the_input_itself(tmp_path, monkeypatch):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(OftMergeError, match="would replace input adapter") as info:
        check_output(tmp_path / "adapter", [("input adapter", tmp_path / "adapter")])
    assert "\n" not in str(info.value)
    monkeypatch.chdir(tmp_path)  # relative and absolute spellings of one path are one path
    with pytest.raises(OftMergeError, match="the base model"):
        check_output("adapter", [("the base model", tmp_path / "adapter")])
    with pytest.raises(OftMergeError):
        check_output(tmp_path / "adapter", [("input adapter", "./adapter/")])


def test_check_output_refuses_a_directory_that_holds_an_input(tmp_path):
    with pytest.raises(OftMergeError, match="would replace input adapter"):
        check_output(tmp_path / "models", [("other", tmp_path / "x"), ("input adapter", tmp_path / "models" / "a" / "adapter")])


def test_check_output_accepts_siblings_and_returns_the_absolute_path(tmp_path, monkeypatch):
    inputs = [("input adapter", tmp_path / "adapter"), ("the base model", tmp_path / "base")]
    for name in ("merged", "adapter-merged", "adapte", "base2"):  # name prefixes are not parents
        assert check_output(tmp_path / name, inputs) == tmp_path / name
    monkeypatch.chdir(tmp_path)
    out = check_output("merged", inputs)
    assert out.is_absolute() and out == tmp_path / "merged"
    assert check_output(tmp_path / "merged", ()) == tmp_path / "merged"


def test_check_output_refuses_the_input_spelled_with_dotdot(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "x").mkdir()
    with pytest.raises(OftMergeError):
        check_output(tmp_path / "x" / ".." / "adapter", [("input adapter", tmp_path / "adapter")])


def test_check_output_refuses_a_symlink_to_the_input(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "adapter")
    with pytest.raises(OftMergeError):
        check_output(tmp_path / "link", [("input adapter", tmp_path / "adapter")])


def test_check_output_resolves_every_spelling(tmp_path):
    a = tmp_path / "adapter"
    (a / "sub").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "la").symlink_to(a)
    (tmp_path / "parent-link").symlink_to(tmp_path)
    (tmp_path / "x" / "deep").symlink_to(tmp_path / "x")  # x/deep/.. is x's parent only once resolved
    cases = {
        a: "would replace input adapter",
        tmp_path / "x" / ".." / "adapter": "would replace input adapter",
        tmp_path / "parent-link" / "adapter": "would replace input adapter",  # a symlinked parent
        tmp_path / "la": "would replace input adapter",  # the output is a link to the input
        tmp_path / "x" / "deep" / ".." / "adapter": "would replace input adapter",
        tmp_path: r"would replace input adapter .*\(it holds",  # holds the input
        a / "sub": "is inside input adapter",
        a / "new": "is inside input adapter",  # not there yet, still inside
        tmp_path / "la" / "new": "is inside input adapter",
    }
    for out, message in cases.items():
        for spelling in (a, tmp_path / "la", f"{tmp_path}/x/../adapter"):  # the input spelled any way too
            with pytest.raises(OftMergeError, match=message):
                check_output(out, [("input adapter", spelling)])


def test_check_output_compares_devices_and_inodes(tmp_path, monkeypatch):
    """A bind mount is another path of the same directory: realpath cannot see it, (st_dev, st_ino) can."""
    from oftmerge.engine import guard

    a, mount = tmp_path / "adapter", tmp_path / "mnt"
    a.mkdir()
    mount.mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # `mnt` is a bind mount of `adapter`
        p = Path(path)
        return real_stat(a / p.relative_to(mount) if p.is_relative_to(mount) else p, *args, **kwargs)

    monkeypatch.setattr(guard.os, "stat", stat)
    with pytest.raises(OftMergeError, match="would replace input adapter"):
        check_output(mount, [("input adapter", a)])
    (a / "sub").mkdir()
    with pytest.raises(OftMergeError, match="is inside input adapter"):
        check_output(mount / "sub", [("input adapter", a)])


def test_check_output_protects_the_files_an_input_links_to(tmp_path):
    """A Hub snapshot's files are links to ../../blobs: replacing the blobs directory would empty the input."""
    blobs, snap = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "123").write_bytes(b"weights")
    (snap / "adapter_model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "123")
    with pytest.raises(OftMergeError, match=r"would replace the adapter .*\(it holds .*blobs/123\)"):
        check_output(blobs, [("the adapter", snap)])
    assert check_output(tmp_path / "repo" / "other", [("the adapter", snap)]) == tmp_path / "repo" / "other"


def test_check_output_refuses_an_output_that_is_a_symlink(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    for link in ("out", "dangling"):
        with pytest.raises(OftMergeError, match=r"is a symbolic link .*neither writes through a link nor replaces one") as info:
            check_output(tmp_path / link, [])
        assert "\n" not in str(info.value)
    with pytest.raises(OftMergeError, match="symbolic link"):
        with output_directory(tmp_path / "out", overwrite=True):
            pytest.fail("the block must not run")
    assert (tmp_path / "out").is_symlink() and _entries(tmp_path) == ["dangling", "elsewhere", "out"]


# -- commit: output_directory ------------------------------------------------------------------------------


def _entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_output_directory_commits_on_success(tmp_path):
    parent = tmp_path / "parent"  # created on demand
    with output_directory(parent / "out") as tmp:
        assert tmp.parent == parent and tmp.name.startswith(".out.partial-") and tmp.is_dir()
        marker = tmp.with_name(tmp.name + ".pid")
        assert marker.read_text().split() == [str(os.getpid()), socket.gethostname()]  # names the writer while it writes
        assert not (parent / "out").exists()  # nothing at the output until the commit
        (tmp / "a.txt").write_text("A")
        (tmp / "b.bin").write_bytes(b"\0\1")
    assert _entries(parent) == ["out"]  # no partial, no marker
    assert _entries(parent / "out") == ["a.txt", "b.bin"] and (parent / "out" / "a.txt").read_text() == "A"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_output_directory_leaves_nothing_on_error(tmp_path, error):
    (tmp_path / "neighbour").write_text("kept")
    with pytest.raises(error):
        with output_directory(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise error("stop")
    assert _entries(tmp_path) == ["neighbour"]
    assert not list(tmp_path.glob(".out.partial-*")) and not list(tmp_path.glob("*.pid"))


def test_output_directory_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "oftmerge.json").write_text("old")  # an earlier output
    with pytest.raises(OutputExistsError, match="already exists"):
        with output_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _entries(out) == ["oftmerge.json"] and _entries(tmp_path) == ["out"]
    with output_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert _entries(out) == ["oftmerge.json"]  # replaced only once the new one is complete
    assert _entries(out) == ["new.txt"] and (out / "new.txt").read_text() == "new"
    assert _entries(tmp_path) == ["out"]  # the old output moved aside and deleted


@pytest.mark.parametrize("kind", ["file", "data directory"])
def test_overwrite_replaces_only_an_earlier_output(tmp_path, kind):
    from oftmerge.engine.adapter import write_adapter
    from oftmerge.formats.writer import PEFT_OFT

    out = tmp_path / "out"
    if kind == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "table.csv").write_text("data")
    with pytest.raises(OftMergeError, match="not an earlier output"):
        write_adapter(out, PEFT_OFT, {}, {"peft_type": "OFT"}, overwrite=True)
    assert (out.read_text() if kind == "file" else (out / "table.csv").read_text()) in ("notes", "data")
    assert _entries(tmp_path) == ["out"]


def test_output_directory_guards_inputs_before_writing(tmp_path):
    (tmp_path / "base").mkdir()
    with pytest.raises(OftMergeError, match="would replace the base model"):
        with output_directory(tmp_path / "base", overwrite=True, inputs=[("the base model", tmp_path / "base")]):
            pytest.fail("the block must not run")
    assert _entries(tmp_path) == ["base"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _partial(parent: Path, target: str, suffix: str, pid: int | str) -> Path:
    tmp = parent / f".{target}.partial-{suffix}"
    tmp.mkdir(parents=True)
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half")
    tmp.with_name(tmp.name + ".pid").write_text(str(pid))
    return tmp


def test_remove_stale_partials_dead_and_alive(tmp_path):
    dead = _partial(tmp_path, "out", "dead", _dead_pid())
    alive = _partial(tmp_path, "out", "alive", os.getpid())
    garbled = _partial(tmp_path, "out", "garbled", "not a pid")
    other = _partial(tmp_path, "other", "dead", _dead_pid())  # another output's leftovers are not ours to judge
    remove_stale_partials(tmp_path / "out")
    assert not dead.exists() and not dead.with_name(dead.name + ".pid").exists()
    for kept in (alive, garbled, other):
        assert kept.is_dir() and kept.with_name(kept.name + ".pid").is_file()
    remove_stale_partials(tmp_path / "missing-parent" / "out")  # no parent: nothing to do


def test_output_directory_cleans_up_after_a_killed_run(tmp_path):
    dead = _partial(tmp_path, "out", "killed", _dead_pid())
    with output_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not dead.exists()
    assert _entries(tmp_path) == ["out"]


def _output(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "adapter_model.safetensors").write_text(text)
    return path


def _journal(tmp_path: Path, jid: str, pid: int | str, new: str, new_id: Path | None = None, old: str | None = None) -> Path:
    journal = tmp_path / f".out.old-{jid}.journal"
    ident = [os.lstat(new_id).st_dev, os.lstat(new_id).st_ino] if new_id is not None else [0, 0]
    record = {"pid": pid, "host": socket.gethostname(), "old": old or f".out.old-{jid}", "new": new, "new_id": ident}
    journal.write_text(json.dumps(record))
    return journal


def test_recovery_puts_the_old_output_back_when_killed_between_the_renames(tmp_path):
    """(a) done, (b) not: nothing at the output, the old one aside, the complete new one in its partial directory."""
    pid = _dead_pid()
    _output(tmp_path / f".out.old-{pid}-ab", "old")
    new = _partial(tmp_path, "out", f"{pid}-cd", pid)
    _journal(tmp_path, f"{pid}-ab", pid, new.name, new_id=new)
    remove_stale_partials(tmp_path / "out")
    assert _entries(tmp_path) == ["out"] and (tmp_path / "out" / "adapter_model.safetensors").read_text() == "old"


def test_recovery_keeps_the_new_output_once_it_is_in_place(tmp_path):
    pid = _dead_pid()
    _output(tmp_path / f".out.old-{pid}-ab", "old")
    new = _output(tmp_path / "out", "new")
    _journal(tmp_path, f"{pid}-ab", pid, f".out.partial-{pid}-cd", new_id=new)
    (tmp_path / f".out.partial-{pid}-cd.pid").write_text(f"{pid} {socket.gethostname()}\n")
    with output_directory(tmp_path / "other"):  # another output's run leaves `out` alone
        pass
    assert len(_entries(tmp_path)) == 5
    remove_stale_partials(tmp_path / "out")
    assert _entries(tmp_path) == ["other", "out"] and (tmp_path / "out" / "adapter_model.safetensors").read_text() == "new"


def test_recovery_after_an_exchange_deletes_the_old_output_at_the_partial_name(tmp_path):
    pid = _dead_pid()
    new = _output(tmp_path / "out", "new")
    old_at_partial = _output(tmp_path / f".out.partial-{pid}-cd", "old")
    _journal(tmp_path, f"{pid}-ab", pid, old_at_partial.name, new_id=new)
    with output_directory(tmp_path / "out", overwrite=True) as tmp:  # the next run recovers first
        assert _entries(tmp_path) == sorted(["out", tmp.name, tmp.name + ".pid"])
        (tmp / "adapter_model.safetensors").write_text("newer")
    assert _entries(tmp_path) == ["out"] and (tmp_path / "out" / "adapter_model.safetensors").read_text() == "newer"


def test_recovery_leaves_a_live_run_and_foreign_paths_alone(tmp_path):
    _output(tmp_path / "out", "old")
    live = _partial(tmp_path, "out", f"{os.getpid()}-cd", os.getpid())
    mine = _journal(tmp_path, f"{os.getpid()}-ab", os.getpid(), live.name, new_id=live)
    victim = _output(tmp_path / "victim", "an input")
    dead = _dead_pid()
    evil = tmp_path / f".out.old-{dead}-ef.journal"  # a journal may only name entries of `out`'s own
    evil.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "old": "victim", "new": "../victim", "new_id": [0, 0]}))
    garbled = tmp_path / f".out.old-{dead}-gh.journal"
    garbled.write_text('{"pid": ')  # killed while writing it: written before any rename, so nothing moved
    remove_stale_partials(tmp_path / "out")
    assert live.is_dir() and mine.is_file() and (victim / "adapter_model.safetensors").read_text() == "an input"
    assert not evil.exists() and not garbled.exists()
    assert (tmp_path / "out" / "adapter_model.safetensors").read_text() == "old"


def test_recovery_of_partials_without_a_marker_and_of_an_older_oftmergess_old_output(tmp_path):
    dead = _dead_pid()
    nameless = tmp_path / f".out.partial-{dead}-zz"  # killed between mkdtemp and its marker: the pid is in its name
    nameless.mkdir()
    legacy = _output(tmp_path / ".out.old-k2j4h5g6", "old")  # no journal, no pid: an older oftmerge's, killed between renames
    orphan = tmp_path / f".out.partial-{dead}-yy.pid"  # a marker whose directory was deleted already
    orphan.write_text(str(dead))
    remove_stale_partials(tmp_path / "out")
    assert _entries(tmp_path) == ["out"] and (tmp_path / "out" / "adapter_model.safetensors").read_text() == "old"
    assert not legacy.exists()


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    """Two runs to one new output: the second to commit fails and leaves the first one's output as it is."""
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        with output_directory(tmp_path / "out") as tmp:
            (tmp / "mine").write_text("second")
            with output_directory(tmp_path / "out") as other:
                (other / "theirs").write_text("first")
    assert _entries(tmp_path) == ["out"] and _entries(tmp_path / "out") == ["theirs"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "lock-file"])
def test_concurrent_overwrites_commit_one_after_the_other(tmp_path, monkeypatch, renameat2):
    from oftmerge.engine import fsops

    if not renameat2:
        monkeypatch.setattr(fsops, "RENAMEAT2", None)
    _output(tmp_path / "out", "old")
    with output_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "adapter_model.safetensors").write_text("A")
        if renameat2:  # the other run commits first; this one then replaces it whole
            with output_directory(tmp_path / "out", overwrite=True) as other:
                (other / "adapter_model.safetensors").write_text("B")
        else:  # without renameat2 the lock is held for the whole run: the other run is refused at once
            assert (tmp_path / ".out.lock").read_text().split()[0] == str(os.getpid())
            with pytest.raises(OftMergeError, match=r"another oftmerge run \(pid \d+\) is writing this output \(lock .out.lock\)"):
                with output_directory(tmp_path / "out", overwrite=True):
                    pytest.fail("the block must not run")
    assert _entries(tmp_path) == ["out"] and (tmp_path / "out" / "adapter_model.safetensors").read_text() == "A"


def test_a_stale_lock_is_removed_and_a_held_one_waited_for(tmp_path, monkeypatch):
    from oftmerge.engine import fsops

    (tmp_path / ".out.lock").write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # killed while holding it
    with output_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert _entries(tmp_path) == ["out"]
    held = fsops.Lock(tmp_path / "out")
    assert held.acquire()
    monkeypatch.setattr(fsops, "LOCK_WAIT", 0.2)
    with pytest.raises(OftMergeError, match=f"another oftmerge run \\(pid {os.getpid()}\\) is writing this output"):
        with output_directory(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "f").write_text("y")
    held.release()
    assert _entries(tmp_path) == ["out"] and (tmp_path / "out" / "f").read_text() == "x"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_the_output_gets_the_modes_the_umask_gives(tmp_path, umask):
    import tempfile

    from oftmerge.engine import fsops

    old = os.umask(umask)
    try:
        assert fsops.umask() == umask
        with output_directory(tmp_path / "out") as tmp:
            assert tmp.stat().st_mode & 0o777 == 0o700  # private while it is written
            fd, _ = tempfile.mkstemp(dir=tmp)  # 0600, like safetensors' and mkstemp's files
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    for p in (tmp_path / "out").rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p


def test_atomic_directory_replaces_a_link_itself_never_its_target(tmp_path):
    target = _output(tmp_path / "elsewhere", "kept")
    (tmp_path / "out").symlink_to(target)
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "f").write_text("new")
    assert not (tmp_path / "out").is_symlink() and _entries(tmp_path / "out") == ["f"]
    assert _entries(tmp_path) == ["elsewhere", "out"] and (target / "adapter_model.safetensors").read_text() == "kept"


def test_commit_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OftMergeError, match=r"/file: is a file, not a directory, so the output cannot be created below it") as info:
        with output_directory(tmp_path / "file" / "out"):
            pytest.fail("the block must not run")
    assert "\n" not in str(info.value)


def test_an_unwritable_parent_is_one_line(tmp_path, monkeypatch):
    """What a read-only or full directory gives (root ignores permissions, so the refusal is simulated)."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OftMergeError, match=r": permission denied; write the output elsewhere \(another -o\)") as info:
        with output_directory(tmp_path / "out"):
            pytest.fail("the block must not run")
    assert "\n" not in str(info.value) and isinstance(info.value.__cause__, PermissionError)  # exit code 3: the file system
    assert _entries(tmp_path) == []

# -- distributed: the group of one ------------------------------------------------------------------------


def test_local_group_collectives():
    assert isinstance(LOCAL, LocalGroup) and LOCAL.rank == 0 and LOCAL.size == 1 and LOCAL.is_main
    assert LOCAL.share([]) == []
    assert LOCAL.share([5.0, 0.0, 1e9, 2.0, 2.0]) == [0, 1, 2, 3, 4]
    obj = {"a": [1, 2]}
    assert LOCAL.gather(obj) == [obj] and LOCAL.gather(obj)[0] is obj
    assert LOCAL.broadcast(obj) is obj
    LOCAL.check(None)
    err = ValueError("boom")
    with pytest.raises(ValueError) as info:
        LOCAL.check(err)
    assert info.value is err
    calls = []
    assert LOCAL.on_main(lambda: calls.append(1) or "done") == "done" and calls == [1]
    with pytest.raises(ZeroDivisionError):
        LOCAL.on_main(lambda: 1 / 0)
    with pytest.raises(KeyError):
        with LOCAL.checked():
            raise KeyError("k")
    with LOCAL.checked():
        pass


@pytest.mark.parametrize("world_size", [None, "1"])
def test_process_group_is_local_without_a_launcher(monkeypatch, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.current() is None
    assert process_group() is LOCAL
    assert is_main()


# -- threads -----------------------------------------------------------------------------------------------


def test_prefetch_yields_items_in_order_with_results():
    with Prefetch(lambda x: (x, x * x), range(20), ahead=3) as reads:
        got = list(reads)
    assert got == [(i, (i, i * i)) for i in range(20)]
    with Prefetch(lambda x: x, [], ahead=2) as reads:
        assert list(reads) == []


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_prefetch_loads_at_most_ahead_beyond_the_consumer(ahead):
    n = 8
    lock = threading.Lock()
    started: list[int] = []
    loaded = [threading.Event() for _ in range(n)]

    def load(i: int) -> int:
        with lock:
            started.append(i)
        loaded[i].set()
        return -i

    with Prefetch(load, range(n), ahead=ahead) as reads:
        for item, result in reads:
            assert result == -item
            last = min(item + ahead, n - 1)
            assert loaded[last].wait(10), f"item {last} not loaded ahead while the consumer holds {item}"
            time.sleep(0.02)  # time for a loader that would run further ahead
            with lock:
                assert max(started) <= item + ahead, (item, sorted(started))
    assert started == list(range(n))  # each item loaded once, in order


def test_prefetch_reraises_a_load_error_at_its_item():
    def load(i: int) -> int:
        if i == 3:
            raise ValueError(f"item {i} is broken")
        return i

    seen = []
    with pytest.raises(ValueError, match="item 3 is broken"):
        with Prefetch(load, range(10), ahead=2) as reads:
            for _item, result in reads:
                seen.append(result)
    assert seen == [0, 1, 2]


def test_torch_threads_restores_the_count():
    old = torch.get_num_threads()
    n = 1 if old != 1 else 2
    with torch_threads(n):
        assert torch.get_num_threads() == n
    assert torch.get_num_threads() == old
    with pytest.raises(RuntimeError):
        with torch_threads(n):
            assert torch.get_num_threads() == n
            raise RuntimeError("fail")
    assert torch.get_num_threads() == old
    with torch_threads(None):
        assert torch.get_num_threads() == old
    assert torch.get_num_threads() == old


# -- model: write_model --------------------------------------------------------------------------------------


def _base_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    t: dict[str, torch.Tensor] = {}
    for i in range(6):  # 100 bytes each
        t[f"w{i}"] = torch.randn(5, 5, generator=g) if i % 2 == 0 else torch.randn(10, 5, generator=g).to(torch.bfloat16)
    t["ids"] = torch.arange(12)  # 96 bytes
    return t


@pytest.fixture
def tiny_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    writer = ShardedWriter(base)
    for k, v in _base_tensors().items():
        writer.add(k, v)
    writer.close()
    (base / "config.json").write_text('{"model_type": "toy"}')
    (base / "tokenizer.json").write_text("{}")
    return base


SELECTED = {"w0", "w3", "w4"}


@pytest.mark.parametrize("shard_size, shards", [("1MB", 1), (200, 4), (300, 3)])
def test_write_model_bytes_equal_sharded_writer(tmp_path, tiny_base, shard_size, shards):
    ckpt = Checkpoint(tiny_base)
    assert len(plan_model(ckpt, shard_size)) == shards
    order = ckpt.keys_in_file_order()
    base = _base_tensors()
    calls: list[tuple[int, int, str]] = []
    seen: list[str] = []

    def double(name: str, t: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return t * 2

    out = write_model(tiny_base, tmp_path / "out", double, shard_size=shard_size, only=SELECTED, progress=lambda *a: calls.append(a))
    assert seen == [k for k in order if k in SELECTED]

    expected = tmp_path / "expected"
    expected.mkdir()
    writer = ShardedWriter(expected, max_shard_bytes=shard_size)
    for k in order:
        writer.add(k, base[k] * 2 if k in SELECTED else base[k])
    writer.close()
    weights = {k: v for k, v in digests(out).items() if k.endswith((".safetensors", ".index.json"))}
    assert weights == digests(expected)
    n_files = shards + (shards > 1)
    assert len(weights) == n_files
    assert {k for k in digests(out)} == set(weights) | {"config.json", "tokenizer.json"}

    got = Checkpoint(out)
    assert got.keys_in_file_order() == order
    for k in order:
        want = base[k] * 2 if k in SELECTED else base[k]
        assert got.get(k).dtype == want.dtype and torch.equal(got.get(k), want), k

    # progress: every tensor once, in order, with one total across the shards
    assert [c[0] for c in calls] == list(range(1, len(order) + 1))
    assert {c[1] for c in calls} == {len(order)}
    assert [c[2] for c in calls] == order
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_model_copies_unselected_tensors_byte_for_byte(tmp_path, tiny_base):
    out = write_model(tiny_base, tmp_path / "out", lambda n, t: None, shard_size="1MB")
    assert digests(out) == digests(tiny_base)  # None keeps the tensor: the same file


def test_write_model_refuses_to_replace_its_base(tmp_path, tiny_base):
    before = digests(tiny_base)
    with pytest.raises(OftMergeError, match="would replace the base model"):
        write_model(tiny_base, tiny_base, lambda n, t: t, overwrite=True)
    assert digests(tiny_base) == before
