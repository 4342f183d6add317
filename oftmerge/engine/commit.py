"""The one way outputs reach the disk: the output guard, the atomic commit of a directory, recovery after a kill.

Every command (``merge``, ``convert``, ``fold``, ``merge --fold-into``, ``decouple``) writes its
output through :func:`output_directory`::

    with output_directory(out, overwrite=False, inputs=[("input adapter", a), ("the base model", b)]) as tmp:
        ...write files into tmp...
    # here `out` exists, complete, or the block raised and nothing was left behind

What it guarantees (``docs/safety.md`` says it for users):

* :func:`check_output` refuses an output that is an input, holds one or lies inside one, however
  it is spelled: paths are compared fully resolved (``..``, symbolic links, a linked parent), and
  existing directories also by ``(st_dev, st_ino)`` (bind mounts); the files an input directory
  links to (a Hub snapshot's blobs) count as the input. An output that is itself a symbolic link
  is refused: oftmerge neither writes through a link nor replaces one.
* The files are written in ``.<name>.partial-<pid>-*`` beside the output (same file system, mode
  0700 while written), fsynced, given the modes the umask gives (``0o777 & ~umask`` and
  ``0o666 & ~umask``), and renamed into place in one step that never replaces anything
  (``renameat2(RENAME_NOREPLACE)`` on Linux): an output that appeared meanwhile raises
  :class:`~oftmerge.errors.OutputExistsError` and is left as it is. Where that rename is
  missing, the lock ``.<name>.lock`` is held for the whole run instead.
* With ``overwrite`` an existing output is replaced only once the new one is complete, after a
  journal ``.<name>.old-<id>.journal`` names both: in one exchange (``RENAME_EXCHANGE``), else
  by moving the old aside to ``.<name>.old-<id>`` and the new in. Commits to one output take
  ``.<name>.lock`` in turn, so of two runs with ``overwrite`` the later commit replaces the
  earlier, whole.
* A run that is killed (SIGKILL, power loss) cannot clean up. The next run to the same output
  (and :func:`remove_stale_partials`) does, once the writer's process is gone: it finishes or
  undoes a journalled replacement (the new output stays if it was in place, else the old one is
  put back), and deletes partial directories, markers and stale locks.

The guard is :mod:`oftmerge.engine.guard`, the recovery :mod:`oftmerge.engine.recovery`, the
renames, the umask and the lock file :mod:`oftmerge.engine.fsops`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oftmerge.engine import fsops
from oftmerge.engine.guard import Inputs, check_output, check_replaceable_file, output_location
from oftmerge.engine.recovery import discard_old, locked, marker, recover, remove, remove_stale_partials
from oftmerge.errors import FileSystemError, OftMergeError, OutputExistsError
from oftmerge.formats.io import fsync_dir

__all__ = ["Inputs", "atomic_directory", "check_output", "output_directory", "output_file", "remove_stale_partials"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` on success (see the module docstring).

    ``target`` is not guarded against inputs (:func:`output_directory` is); a link at ``target`` is
    replaced itself with ``overwrite``, never its target.
    """
    target = output_location(target)
    _prepare(target, overwrite=overwrite)
    tmp = _make_partial(target)
    lock = fsops.Lock(target)
    try:
        atomic = _renames_atomically(tmp)
        if not atomic and not lock.acquire(wait=0.0):  # without renameat2 the lock is held for the whole run
            raise _busy(target, lock)
        yield tmp
        _seal(tmp)
        if not lock.held and not lock.acquire(wait=fsops.LOCK_WAIT):
            raise _busy(target, lock)
        try:
            recover(target)
            replaced = _commit(tmp, target, overwrite=overwrite, atomic=atomic)
        finally:
            lock.release()
        if replaced is not None:  # (c): the new output is in place; delete the old one (a failure: the next run retries)
            with contextlib.suppress(OSError):
                discard_old(target, *replaced)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(tmp)
        raise
    finally:
        lock.release()
        marker(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def output_directory(out: str | os.PathLike[str], *, overwrite: bool = False, inputs: Inputs = ()) -> Iterator[Path]:
    """Guard, recover after killed runs, and commit ``out`` atomically: yields the temporary directory."""
    target = check_output(out, inputs)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        yield tmp


@contextlib.contextmanager
def output_file(out: str | os.PathLike[str], *, overwrite: bool = False, inputs: Inputs = (), suffix: str = ".safetensors") -> Iterator[Path]:
    """The single-file counterpart of :func:`output_directory` (diffusion OFT files): yields the path to write.

    The file is written in a partial directory beside ``out`` (the same names, marker and recovery
    as a directory output), fsynced, and put in place in one step: ``link`` (which never replaces:
    an output that appeared meanwhile raises :class:`~oftmerge.errors.OutputExistsError`) or, with
    ``overwrite``, ``rename`` over an earlier output (a file with oftmerge's metadata, see
    :func:`~oftmerge.engine.guard.check_replaceable_file`). A failed or killed run leaves no file at ``out``.
    """
    target = check_output(out, inputs)
    if target.suffix != suffix:
        raise OftMergeError(f"{target}: the output is one {suffix} file; give a path ending in {suffix} (-o NAME{suffix})")
    if target.is_dir():
        raise OftMergeError(f"{target}: is a directory; the output is one {suffix} file, give its path (-o {target / ('merged' + suffix)})")
    _prepare(target, overwrite=overwrite)
    if os.path.lexists(target):
        check_replaceable_file(target)
    tmp = _make_partial(target)
    try:
        yield tmp / target.name
        _seal(tmp)
        try:
            if overwrite:
                os.replace(tmp / target.name, target)
            else:
                os.link(tmp / target.name, target)
        except FileExistsError:
            raise _exists(target, meanwhile=True) from None
        except OSError as exc:
            raise FileSystemError.from_os_error(exc, target) from exc
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(OSError):
            remove(tmp)
        marker(tmp).unlink(missing_ok=True)


def _prepare(target: Path, *, overwrite: bool) -> None:
    """Before writing ``target``: its parent made, what killed runs left there recovered, an existing output refused unless ``overwrite``."""
    _make_parent(target.parent)
    with locked(target, wait=0.0) as got:
        if got:  # else another run commits right now: recovery waits for the commit
            recover(target)
    if os.path.lexists(target) and not overwrite:
        raise _exists(target)


def _make_parent(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a directory of the path should be
        where = exc.filename or str(parent)
        what = f"{where}: is a file, not a directory, so the output cannot be created below it; choose another output path"
        raise FileSystemError(what, exc.errno, where) from exc
    except OSError as exc:
        raise FileSystemError.from_os_error(exc, parent) from exc


def _make_partial(target: Path) -> Path:
    """The temporary directory beside ``target`` (mode 0700, named with this pid) and its marker naming this process."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-{os.getpid()}-"))
    except OSError as exc:
        raise FileSystemError.from_os_error(OSError(exc.errno, exc.strerror, str(target.parent)), target.parent) from exc
    try:
        marker(tmp).write_text(fsops.owner_text(), encoding="ascii")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        marker(tmp).unlink(missing_ok=True)
        raise FileSystemError.from_os_error(OSError(exc.errno, exc.strerror, str(target.parent)), target.parent) from exc
    return tmp


def _renames_atomically(tmp: Path) -> bool:
    """Whether this file system renames without replacing (``renameat2``), tried on a file inside ``tmp``."""
    a, b = tmp / ".oftmerge-probe-a", tmp / ".oftmerge-probe-b"
    try:
        a.touch()
    except OSError as exc:
        raise OftMergeError(f"{tmp.parent}: cannot write the output there ({exc.strerror or exc}); free some space or choose another output directory") from exc
    try:
        fsops.rename(a, b)
    except fsops.Unsupported:
        a.unlink()
        log.info("%s: no atomic no-replace rename on this file system; the lock file is held for the whole run", tmp.parent)
        return False
    b.unlink()
    return True


def _seal(tmp: Path) -> None:
    """fsync every file and directory below ``tmp`` and give them the modes the umask gives."""
    dir_mode, file_mode = fsops.modes()
    for root, dirs, files in os.walk(tmp):
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_nlink == 1:  # a file linked elsewhere too keeps its mode: it is not only ours
                os.chmod(path, file_mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        fsync_dir(Path(root))
    os.chmod(tmp, dir_mode)


def _commit(tmp: Path, target: Path, *, overwrite: bool, atomic: bool) -> tuple[Path, dict[str, Any]] | None:
    """Put ``tmp`` at ``target`` (under the lock); for a replacement returns its journal and record (the old output is still to delete)."""
    if not os.path.lexists(target):
        try:
            if atomic:
                fsops.rename(tmp, target)
            else:
                os.rename(tmp, target)
            fsync_dir(target.parent)
            return None
        except FileExistsError:
            if not overwrite:
                raise _exists(target, meanwhile=True) from None
    elif not overwrite:
        raise _exists(target, meanwhile=True)
    return _replace(tmp, target, atomic=atomic)


def _replace(tmp: Path, target: Path, *, atomic: bool) -> tuple[Path, dict[str, Any]]:
    """Replace ``target`` by ``tmp``, journalled: one exchange where possible, else (a) old aside, (b) new in."""
    jid = f"{os.getpid()}-{secrets.token_hex(4)}"
    old = target.with_name(f".{target.name}.old-{jid}")
    st = os.lstat(tmp)
    journal = old.with_name(old.name + ".journal")
    record = {"pid": os.getpid(), "host": fsops.HOST, "old": old.name, "new": tmp.name, "new_id": [st.st_dev, st.st_ino]}
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(target.parent)
        if atomic:
            fsops.exchange(tmp, target)  # now `tmp` holds the old output
            fsync_dir(target.parent)
            return journal, record
    except fsops.Unsupported:
        pass  # this file system renames without replacing but cannot exchange: the two renames below
    except BaseException:
        journal.unlink(missing_ok=True)
        raise
    os.rename(target, old)  # (a)
    fsync_dir(target.parent)
    try:
        if os.path.lexists(target):
            raise _exists(target, meanwhile=True)
        os.rename(tmp, target)  # (b)
    except BaseException:
        with contextlib.suppress(OSError):
            if not os.path.lexists(target):
                os.rename(old, target)
        journal.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return journal, record


def _exists(target: Path, *, meanwhile: bool = False) -> OutputExistsError:
    if meanwhile:
        return OutputExistsError(
            f"{target}: already exists: it appeared while this run was writing (another run to the same output?); nothing "
            "was replaced and this run's result was discarded; choose another output path or pass overwrite=True (--overwrite)"
        )
    return OutputExistsError(f"{target}: already exists; choose another output path or pass overwrite=True (--overwrite)")


def _busy(target: Path, lock: fsops.Lock) -> OftMergeError:
    owner = lock.owner().split()
    who = f"pid {owner[0]}" + (f" on {owner[1]}" if len(owner) > 1 and owner[1] != fsops.HOST else "") if owner else "another process"
    return OftMergeError(
        f"{target}: another oftmerge run ({who}) is writing this output (lock {lock.path.name}); wait for it to finish or choose another output path"
    )
