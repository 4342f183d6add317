"""The one way outputs reach the disk: the output guard and the atomic commit of a directory.

Every command (``merge``, ``convert``, ``fold``, ``merge --fold-into``, ``decouple``) writes its
output through :func:`output_directory`::

    with output_directory(out, overwrite=False, inputs=[("input adapter", a), ("the base model", b)]) as tmp:
        ...write files into tmp...
    # here `out` exists, complete, or the block raised and nothing was left behind

* :func:`check_output` refuses an output that would replace one of the inputs (or hold one):
  inputs are never modified.
* The files are written in a temporary directory beside the output (``.<name>.partial-*``, same
  file system), fsynced, and renamed into place at the end. An existing output raises
  :class:`~oftmerge.errors.OutputExistsError` unless ``overwrite``; then it is replaced only once
  the new one is complete (moved aside, the new one renamed in, the old one deleted).
* A run that is killed (SIGKILL, power loss) cannot clean up: its temporary directory has a
  marker beside it with the writer's process id, and the next run to the same output deletes it
  once that process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from oftmerge.errors import OftMergeError, OutputExistsError
from oftmerge.formats.io import fsync_dir

__all__ = ["atomic_directory", "check_output", "output_directory", "remove_stale_partials"]

log = logging.getLogger(__name__)

#: (what the input is, its path), e.g. ("input adapter", "adapters/oft-upper")
Inputs = Iterable[tuple[str, "str | os.PathLike[str]"]]


def check_output(out: str | os.PathLike[str], inputs: Inputs) -> Path:
    """``out`` made absolute; raises when writing it would replace or contain one of ``inputs``."""
    target = Path(out).absolute()
    for role, path in inputs:
        src = Path(path).absolute()
        if target == src or src.is_relative_to(target):
            raise OftMergeError(
                f"{target}: the output would replace {role} {path}; inputs are never modified. "
                "Choose another output directory."
            )
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` on success (see the module docstring)."""
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target}: already exists; choose another output path or pass overwrite=True (--overwrite)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _marker(tmp: Path) -> Path:
    """The file beside a temporary output directory that names the process writing it."""
    return tmp.with_name(tmp.name + ".pid")


def remove_stale_partials(target: Path) -> None:
    """Delete temporary directories of earlier runs for ``target`` whose writer process is gone (killed)."""
    if not target.parent.is_dir():
        return
    for marker in target.parent.glob(f".{target.name}.partial-*.pid"):
        try:
            pid = int(marker.read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp = marker.with_name(marker.name[: -len(".pid")])
            log.info("removing %s, left by a run that was killed (pid %d)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)
            marker.unlink(missing_ok=True)
        except (OSError, ValueError):  # unreadable, or the process is alive (or not ours to signal)
            continue


@contextlib.contextmanager
def output_directory(out: str | os.PathLike[str], *, overwrite: bool = False, inputs: Inputs = ()) -> Iterator[Path]:
    """Guard, clean up after killed runs, and commit ``out`` atomically: yields the temporary directory."""
    target = check_output(out, inputs)
    remove_stale_partials(target)
    marker: Path | None = None
    try:
        with atomic_directory(target, overwrite=overwrite) as tmp:
            marker = _marker(tmp)
            marker.write_text(str(os.getpid()))
            yield tmp
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
