"""The file-system steps of the atomic commit: a no-replace rename and an exchange, the umask, the lock file.

:mod:`oftmerge.engine.commit` builds on these; nothing here knows about adapters or models.

* :func:`rename` renames without ever replacing what is at the destination (``renameat2`` with
  ``RENAME_NOREPLACE`` on Linux, called through ``ctypes``); :func:`exchange` swaps two paths in
  one step (``RENAME_EXCHANGE``). Both raise :class:`Unsupported` where the platform or the file
  system lacks the flag (then the caller uses :class:`Lock` instead), ``FileExistsError`` when the
  destination exists::

      try:
          fsops.rename(tmp, out)        # atomic: fails if `out` appeared meanwhile
      except fsops.Unsupported:
          ...                           # hold a Lock for the whole run, then os.rename

* :func:`modes` is what ``mkdir``/``open`` give under the process umask (``0o777 & ~umask``,
  ``0o666 & ~umask``); :func:`umask` reads the umask without changing it where Linux says it
  (``/proc/self/status``), else once per process by setting it to ``0o077`` and back, under a lock
  (a file another thread creates meanwhile gets less access, never more).
* :class:`Lock` is ``.NAME.lock`` beside an output, created with ``O_EXCL`` and held with
  ``flock``: a lock whose holder died (its ``flock`` is free; where ``flock`` is missing, its pid is
  gone) is stale and removed by the next run that wants it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["HOST", "LOCK_WAIT", "Lock", "Unsupported", "alive", "exchange", "modes", "owner_alive", "rename", "umask"]

#: this machine's name, written in markers, journals and locks: a run on another host is never judged dead
HOST = socket.gethostname()

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: what renameat2 answers where the kernel or the file system lacks a flag
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class Unsupported(OSError):
    """This platform or file system has no atomic no-replace rename (or exchange)."""


def _load_renameat2() -> object | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


#: libc's renameat2, or None; a test sets it to None to run the fallback
RENAMEAT2: object | None = _load_renameat2()


def renameat2(src: str | os.PathLike[str], dst: str | os.PathLike[str], flags: int) -> None:
    """``renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags)``; raises the ``OSError`` of its errno, :class:`Unsupported` where missing."""
    fn = RENAMEAT2
    if fn is None:
        raise Unsupported(errno.ENOSYS, "renameat2 is not available here", str(src))
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:  # type: ignore[operator]
        code = ctypes.get_errno()
        cls = Unsupported if code in _UNSUPPORTED else OSError
        raise cls(code, os.strerror(code), str(src), None, str(dst))


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` in one step, never replacing ``dst``: ``FileExistsError`` if it exists (``EEXIST``)."""
    try:
        renameat2(src, dst, _RENAME_NOREPLACE)
    except Unsupported:
        raise
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Swap ``a`` and ``b`` in one step (both must exist); ``FileNotFoundError`` if one is missing."""
    renameat2(a, b, _RENAME_EXCHANGE)


# -- permissions -----------------------------------------------------------------------------------

_umask_lock = threading.Lock()
_umask_cache: int | None = None


def umask() -> int:
    """The process umask, read without a window of a wider one (see the module docstring)."""
    global _umask_cache
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:  # Linux < 4.7, other systems: once per process
        if _umask_cache is None:
            old = os.umask(0o077)
            os.umask(old)
            _umask_cache = old
        return _umask_cache


def modes() -> tuple[int, int]:
    """(directory mode, file mode) that ``mkdir`` and ``open`` give under the umask: ``0o777 & ~u``, ``0o666 & ~u``."""
    u = umask()
    return 0o777 & ~u, 0o666 & ~u


# -- owners ----------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal counts as alive)."""
    if pid <= 0:
        return True  # unknown: never judged dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def owner_alive(text: str) -> bool | None:
    """Whether the owner ``"PID [HOST]"`` (a marker's or lock's text) runs; None if the text names none.

    An owner on another host is alive: this machine cannot tell.
    """
    parts = text.split()
    if not parts or not parts[0].isdigit():
        return None
    if len(parts) > 1 and parts[1] != HOST:
        return True
    return alive(int(parts[0]))


def owner_text() -> str:
    """What a marker or lock of this process says: ``"PID HOST"``."""
    return f"{os.getpid()} {HOST}\n"


# -- the lock file ---------------------------------------------------------------------------------

#: seconds a run waits for another run's commit of the same output (a few renames) before it gives up
LOCK_WAIT = 30.0
#: seconds a lock whose owner has not yet written its name is given before it is judged stale
_UNNAMED_GRACE = 10.0


class Lock:
    """``.NAME.lock`` beside ``target``: one oftmerge run at a time commits (or recovers) ``target``.

    :meth:`acquire` creates it with ``O_EXCL``, takes its ``flock`` and writes ``"PID HOST"``;
    :meth:`release` deletes it. A lock left by a killed run is stale: its ``flock`` is free (the
    kernel released it with the process), or, where ``flock`` is unavailable, its pid is gone; the
    next :meth:`acquire` removes it. Not reentrant.
    """

    def __init__(self, target: Path):
        self.path = target.with_name(f".{target.name}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> str:
        """The holder as written in the lock (``"PID HOST"``), or ``""``."""
        try:
            return self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return ""

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait`` seconds for a live holder; False if it is still held then."""
        assert self._fd is None, "Lock is not reentrant"
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                if self._remove_stale():
                    continue
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
                continue
            try:
                _flock(fd, blocking=True)  # nobody else holds a file this new for long (see _remove_stale)
                os.write(fd, owner_text().encode("ascii"))
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            self._fd = fd
            return True

    def release(self) -> None:
        """Delete the lock (while still holding its ``flock``, so nobody takes a file that is going away)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(self.path, fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _remove_stale(self) -> bool:
        """Delete the lock file if its holder is gone; True if it was deleted (or vanished)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            free = _flock(fd, blocking=False)
            if free is False:
                return False  # held by a live process
            if not _same_file(self.path, fd):
                return True  # replaced or removed meanwhile: look again
            text = os.pread(fd, 256, 0).decode("ascii", "replace")
            owner = owner_alive(text)
            if owner is None:  # created, not yet named (or its creator died right then): judged by age
                if time.time() - os.fstat(fd).st_mtime < _UNNAMED_GRACE:
                    return False
            elif free is None and owner:  # no flock here: the pid decides
                return False
            elif free is True and owner and len(text.split()) > 1 and text.split()[1] != HOST:
                return False  # flock across hosts is not to be trusted (NFS): a remote holder is alive
            self.path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)


def _flock(fd: int, *, blocking: bool) -> bool | None:
    """``flock(LOCK_EX)`` on ``fd``: True when taken, False when another holds it, None where flock is unavailable."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP: a file system without flock
    return True


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
