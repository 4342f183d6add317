"""Recovery after a killed run: what a writer of an output leaves beside it, and how the next run settles it.

Every name a run writing ``OUT`` creates starts with ``.OUT.`` and carries its pid:

=====================================  =====================================================
``.OUT.partial-<pid>-XXXXXXXX``        the output being written (then, after an exchange, the old one)
``.OUT.partial-<pid>-XXXXXXXX.pid``    its marker: ``"PID HOST"``
``.OUT.old-<pid>-<id>.journal``        a replacement: the writer, the old and new names, the new inode
``.OUT.old-<pid>-<id>``                the old output, moved aside (without ``renameat2``)
``.OUT.lock``                          held while recovering or committing (:class:`~oftmerge.engine.fsops.Lock`)
=====================================  =====================================================

:func:`recover` (with the lock held; :func:`remove_stale_partials` takes it) settles what a process
that is gone left: a journalled replacement is finished (the new output was in place: the old one is
deleted) or undone (the old output is put back), partial directories and markers are deleted, and an
old output without a journal (an older oftmerge's) is put back when nothing is at ``OUT``. Anything
whose writer is alive, runs on another host or cannot be told is left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oftmerge.engine import fsops
from oftmerge.engine.guard import output_location
from oftmerge.formats.io import fsync_dir

__all__ = ["discard_old", "locked", "marker", "recover", "remove", "remove_stale_partials"]

log = logging.getLogger(__name__)


def marker(tmp: Path) -> Path:
    """The file beside a temporary output directory that names the process writing it (``"PID HOST"``)."""
    return tmp.with_name(tmp.name + ".pid")


@contextlib.contextmanager
def locked(target: Path, wait: float) -> Iterator[bool]:
    """Hold ``target``'s lock for a block if it can be taken within ``wait`` seconds; yields whether it was."""
    lock = fsops.Lock(target)
    try:
        got = lock.acquire(wait)
    except OSError:  # a read-only directory: nothing to recover there either
        got = False
    try:
        yield got
    finally:
        lock.release()


def remove(path: Path) -> None:
    """Delete a directory tree, a file or a link (the link itself)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_partials(target: str | os.PathLike[str]) -> None:
    """Clean up after killed runs writing ``target``: finish or undo their replacements, delete their partial directories.

    Only what a process that is gone left (a marker's, journal's or name's pid); waits up to
    :data:`~oftmerge.engine.fsops.LOCK_WAIT` seconds for a run committing ``target`` right now, and does nothing if the
    directory is not there or another run holds the lock longer.
    """
    target = output_location(target)
    if not target.parent.is_dir():
        return
    with locked(target, wait=fsops.LOCK_WAIT) as got:
        if got:
            recover(target)


def recover(target: Path) -> None:
    """Everything :func:`remove_stale_partials` does, with ``target``'s lock held."""
    parent, stem = target.parent, re.escape(f".{target.name}.")
    journal_re = re.compile(stem + r"old-(?:(\d+)-)?\w+\.journal$")
    partial_re = re.compile(stem + r"partial-(?:(\d+)-)?\w+$")
    old_re = re.compile(stem + r"old-(?:(\d+)-)?\w+$")
    marker_re = re.compile(stem + r"partial-(?:(\d+)-)?\w+\.pid$")
    for name in _names(parent):  # 1. replacements stopped between their renames
        if m := journal_re.match(name):
            _recover_replacement(target, parent / name, None if m.group(1) is None else int(m.group(1)))
    for name in _names(parent):  # 2. partial directories, 3. old outputs no journal speaks for
        if m := partial_re.match(name):
            _remove_if_dead(parent / name, _partial_owner(parent / name, m.group(1)))
        elif (m := old_re.match(name)) and not os.path.lexists(parent / (name + ".journal")):
            if m.group(1) is None or not fsops.alive(int(m.group(1))):  # None: an older oftmerge's, without a journal
                _settle_old(target, parent / name)
    for name in _names(parent):  # 4. markers whose directory is gone
        if (m := marker_re.match(name)) and not os.path.lexists(parent / name.removesuffix(".pid")):
            if _owner_of(parent / name) is False:
                (parent / name).unlink(missing_ok=True)


def _names(parent: Path) -> list[str]:
    try:
        return sorted(os.listdir(parent))
    except OSError:
        return []


def _owner_of(marker: Path) -> bool | None:
    try:
        return fsops.owner_alive(marker.read_text(encoding="ascii", errors="replace"))
    except OSError:
        return None


def _partial_owner(tmp: Path, pid: str | None) -> bool | None:
    """Whether the writer of partial directory ``tmp`` runs (its marker, else the pid in its name); None if unknown."""
    if os.path.lexists(marker(tmp)):
        return _owner_of(marker(tmp))
    return None if pid is None else fsops.alive(int(pid))


def _remove_if_dead(tmp: Path, owner: bool | None) -> None:
    if owner is not False:  # alive, or unknown (a garbled marker, an older oftmerge's name): not ours to judge
        return
    log.info("removing %s, left by a run that was killed", tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.lexists(tmp):
        marker(tmp).unlink(missing_ok=True)


def _read_journal(journal: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _recover_replacement(target: Path, journal: Path, pid: int | None) -> None:
    """Finish or undo the replacement ``journal`` describes, if its writer is gone (``pid``: the one in its name)."""
    record = _read_journal(journal)
    if record is not None and isinstance(record.get("pid"), int):
        owner = fsops.owner_alive(f"{record['pid']} {record.get('host') or fsops.HOST}")
    else:
        owner = None if pid is None else fsops.alive(pid)
    if owner is not False:  # alive, or unknown: not ours to judge
        return
    if record is None:  # written before any rename and never completed: nothing was moved
        journal.unlink(missing_ok=True)
        return
    old, new = _named(target, record.get("old")), _named(target, record.get("new"))
    new_id = record.get("new_id")
    if isinstance(new_id, list) and lidentity(target) == tuple(new_id):
        log.info("%s: a killed run had put its output in place; deleting the old one", target)
        discard_old(target, journal, record)
        return
    if not os.path.lexists(target):  # stopped between (a) and (b): put the old output back (else the complete new one)
        back = next((p for p in (old, new) if p is not None and os.path.lexists(p)), None)
        if back is not None:
            log.warning("%s: restoring the output from %s (a run was killed while replacing it)", target, back.name)
            _rename_back(back, target)
    for leftover in (new, old):  # what is not at `target` now is the abandoned new output or a replaced old one
        if leftover is not None and os.path.lexists(leftover):
            with contextlib.suppress(OSError):
                remove(leftover)
    if new is not None:
        marker(new).unlink(missing_ok=True)
    if not any(p is not None and os.path.lexists(p) for p in (old, new)):
        journal.unlink(missing_ok=True)
        fsync_dir(target.parent)


def _named(target: Path, name: object) -> Path | None:
    """A path a journal names: only an entry of ``target``'s own beside it (``.NAME.…``), never anything else."""
    if not isinstance(name, str) or "/" in name or os.sep in name or not name.startswith(f".{target.name}.") or name.endswith(".journal"):
        return None
    return target.with_name(name)


def discard_old(target: Path, journal: Path, record: dict[str, Any]) -> None:
    """The new output is in place: delete the old one (wherever the replacement left it), then the journal."""
    for path in (_named(target, record.get("old")), _named(target, record.get("new"))):  # after an exchange: at the partial's name
        if path is not None and os.path.lexists(path):
            try:
                remove(path)
            except OSError as exc:
                log.warning("%s: could not delete the replaced output %s (%s); the next run retries", target, path.name, exc)
                return
    journal.unlink(missing_ok=True)
    fsync_dir(target.parent)


def _settle_old(target: Path, old: Path) -> None:
    """An old output with no journal (an older oftmerge's): put back if nothing is at ``target``, else delete it."""
    if not os.path.lexists(target):
        log.warning("%s: restoring the output from %s (a run was killed while replacing it)", target, old.name)
        _rename_back(old, target)
    else:
        with contextlib.suppress(OSError):
            remove(old)


def _rename_back(src: Path, target: Path) -> None:
    try:
        fsops.rename(src, target)
    except fsops.Unsupported:
        os.rename(src, target)
    except FileExistsError:
        return
    fsync_dir(target.parent)


def lidentity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
