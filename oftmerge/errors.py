"""The exception family of oftmerge.

Every error a user can cause derives from :class:`OftMergeError` (itself a
``ValueError``), and its message says *what* is wrong, *where* (file, module,
shape) and *what to do*. Each class carries the ``exit_code`` the command line
ends with (docs/cli.md, "Exit codes"): 2 for a bad input or a refused operation,
3 for the file system (:class:`FileSystemError`), 4 for the Hub (:class:`HubError`).

>>> import errno
>>> err = FileSystemError.from_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"))
>>> print(err)
/data/out/model.safetensors: no space left on the device; free space there, or write the output elsewhere (another -o)
>>> isinstance(err, OSError), err.errno == errno.ENOSPC, err.exit_code
(True, True, 3)
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "OftMergeError",
    "AdapterFormatError",
    "FileSystemError",
    "HubError",
    "IncompatibleAdaptersError",
    "NumericalError",
    "OutputExistsError",
]


class OftMergeError(ValueError):
    """Base class of every error oftmerge raises on bad input."""

    exit_code = 2  #: the command line's exit status for this error


class AdapterFormatError(OftMergeError):
    """A file is missing, unreadable, or not a PEFT OFT adapter we understand."""


class IncompatibleAdaptersError(OftMergeError):
    """Adapters cannot be merged together (other base model, shapes, grids, sides)."""


class NumericalError(OftMergeError):
    """Inputs or results are not finite, or a map is used outside its domain."""


class OutputExistsError(OftMergeError):
    """The output path exists and ``overwrite`` was not given."""


class HubError(OftMergeError):
    """The Hugging Face Hub could not be reached or refused a request (offline, no network, no permission)."""

    exit_code = 4


#: errno -> (what happened, what to do), for :meth:`FileSystemError.from_os_error`
_OS_ADVICE: dict[int, tuple[str, str]] = {
    _errno.ENOSPC: ("no space left on the device", "free space there, or write the output elsewhere (another -o)"),
    _errno.EDQUOT: ("disk quota exceeded", "free space there, or write the output elsewhere (another -o)"),
    _errno.EACCES: ("permission denied", "write the output elsewhere (another -o), or make the directory writable for this user"),
    _errno.EPERM: (
        "operation not permitted (the directory is immutable, chattr +i, or not this user's)",
        "write the output elsewhere (another -o), or lift the restriction (chattr -i)",
    ),
    _errno.EROFS: ("read-only file system", "write the output elsewhere (another -o), on a writable file system"),
    _errno.EXDEV: ("the paths are on different file systems (no rename across devices)", "keep the output on one file system"),
    _errno.ENOTDIR: ("a component of the path is not a directory", "check the path"),
    _errno.EISDIR: ("is a directory", "check the path"),
    _errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    _errno.ENFILE: ("too many open files in the system", "close other programs' files, or raise the system's limit"),
    _errno.EIO: ("input/output error from the device (a failing disk, a lost network mount?)", "check the device and run again"),
    _errno.EFBIG: ("file too large for this file system", "use a smaller --shard-size, or another file system"),
    _errno.ENAMETOOLONG: ("file name too long", "choose a shorter output path"),
    _errno.ENOMEM: ("out of memory", "free memory, or use fewer --threads"),
    _errno.ETXTBSY: ("file busy", "stop the program using it and run again"),
    _errno.EPIPE: ("broken pipe: the program reading oftmerge's output stopped", "read the whole output, or redirect it to a file"),
}


class FileSystemError(OftMergeError, OSError):
    """A file or directory could not be read or written: no space, no permission, a read-only or virtual file system.

    Also an ``OSError`` (``errno`` and ``filename`` as the operating system reported them), so
    ``except OSError`` catches it as it caught the original error.
    """

    exit_code = 3

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.filename = filename
        self.strerror = os.strerror(errno) if errno is not None else None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    @classmethod
    def from_os_error(cls, exc: OSError, where: str | os.PathLike[str] | None = None) -> FileSystemError:
        """The one-line error for ``exc``: the path (``exc.filename``, else ``where``), what happened, what to do."""
        if isinstance(exc, FileSystemError):
            return exc
        path = exc.filename if exc.filename is not None else where
        code = exc.errno
        what, todo = _OS_ADVICE.get(code, (None, None)) if code is not None else (None, None)
        if code == _errno.ENOENT:
            parent = os.path.dirname(os.path.abspath(os.fspath(path))) if path is not None else None
            if parent is not None and _virtual(parent):  # the directory is there, yet refuses new entries
                what = f"cannot be created: {parent} is on a virtual file system (such as /proc or /sys) that takes no new files"
                todo = "write the output elsewhere (another -o)"
            else:
                what, todo = "no such file or directory", "check the path"
        if what is None:
            what, todo = (exc.strerror or str(exc) or type(exc).__name__).lower(), "check the path and the file system"
        if exc.filename2 is not None:
            path = f"{path} -> {exc.filename2}"
        prefix = f"{os.fspath(path)}: " if path is not None else ""
        return cls(f"{prefix}{what}; {todo}", code, None if exc.filename is None else os.fspath(exc.filename))


def _virtual(directory: str) -> bool:
    """Whether ``directory`` exists on a file system without storage (procfs, sysfs: no blocks at all)."""
    try:
        return os.path.isdir(directory) and os.statvfs(directory).f_blocks == 0
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False
