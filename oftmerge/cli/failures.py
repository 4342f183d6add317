"""How a failed command ends: one ``oftmerge: error: <what, where, what to do>`` line and an exit code.

=====  ==================================================================================
code   meaning
=====  ==================================================================================
0      success
1      internal error: a bug in oftmerge (``-v`` shows the traceback; please report it)
2      bad input or refused operation (also argparse's usage errors)
3      the file system: no space, no permission, a read-only or virtual file system
4      the Hugging Face Hub: offline, no network, no permission
130    interrupted (Ctrl-C)
=====  ==================================================================================

Errors oftmerge raises itself carry their code (:attr:`oftmerge.errors.OftMergeError.exit_code`;
a plain ``OftMergeError`` raised from an ``OSError`` other than ``FileExistsError`` is a file-system error, 3);
:func:`explain` is the last line of defence for what escaped them: an ``OSError``, a
``safetensors`` or ``huggingface_hub`` error, anything else (an internal error).

>>> import errno
>>> explain(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"))
(3, '/mnt/ro/x: read-only file system; write the output elsewhere (another -o), on a writable file system')
>>> explain(KeyError("lm_head.weight"))[0]
1
"""

from __future__ import annotations

import json
import os
import re

from oftmerge._version import __version__
from oftmerge.errors import FileSystemError, HubError, OftMergeError

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "explain"]

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def explain(exc: BaseException, output: str | os.PathLike[str] | None = None) -> tuple[int, str]:
    """``(exit code, the error line without its "oftmerge: error: " prefix)`` for ``exc``.

    ``output`` is the command's output path (``-o``): an ``OSError`` on one of its hidden
    temporary siblings (``.OUT.partial-*``) is reported for the output itself, and an ``OSError``
    without a file name (a failed ``write``) for the output.
    """
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C); an output that was not complete was not put in place (run the command again)"
    if isinstance(exc, OftMergeError):
        if type(exc) is OftMergeError and isinstance(exc.__cause__, OSError) and not isinstance(exc.__cause__, FileExistsError):
            # a plain OftMergeError raised from the file system's refusal (a subclass keeps its own code)
            return FileSystemError.exit_code, str(exc)
        return exc.exit_code, str(exc)
    module = type(exc).__module__.split(".")[0]
    first = _first_line(exc)
    if module in ("huggingface_hub", "requests", "urllib3") or module.startswith(("httpx", "httpcore")):
        return HubError.exit_code, (
            f"the Hugging Face Hub: {type(exc).__name__}: {first}; check the network connection, HF_HUB_OFFLINE and HF_TOKEN"
        )
    if isinstance(exc, OSError):
        return FileSystemError.exit_code, str(FileSystemError.from_os_error(_for_output(exc, output), output))
    if isinstance(exc, MemoryError):
        return FileSystemError.exit_code, "out of memory; free memory, use fewer --threads, or run on a machine with more memory"
    if module == "safetensors":
        found = _OS_ERROR.search(str(exc))
        if found:  # an I/O error inside safetensors' Rust code: on saving, a write to the output
            code = int(found.group(1))
            return explain(OSError(code, os.strerror(code)), output if "while serializing" in str(exc) else None)
        return OftMergeError.exit_code, f"a safetensors file could not be read ({first}); check that the files are complete (download or save them again)"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return OftMergeError.exit_code, f"a file that should be JSON text is not ({first}); run with -v to see which"
    return EXIT_INTERNAL, (
        f"internal error: {type(exc).__name__}: {first} (a bug in oftmerge {__version__}; run again with -v for the traceback, and please report it)"
    )


def _for_output(exc: OSError, output: str | os.PathLike[str] | None) -> OSError:
    """``exc`` about ``output`` when its file is one of the output's hidden temporary siblings."""
    if output is None or exc.filename is None:
        return exc
    out = os.path.abspath(output)
    name = os.path.abspath(os.fspath(exc.filename))
    if os.path.dirname(name) == os.path.dirname(out) and os.path.basename(name).startswith(f".{os.path.basename(out)}."):
        return OSError(exc.errno, exc.strerror, os.fspath(output))
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
