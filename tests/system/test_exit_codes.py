"""Every failure of the command line is one ``oftmerge: error:`` line with a documented exit code; ``-v`` adds the traceback.

(The bad inputs themselves, one per row: tests/bad_inputs/errors.py. Here: the mapping of each kind
of exception to its code, what ``-v`` shows, disk-full simulated where no tmpfs can be mounted, and
the table in docs/cli.md.)
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from oftmerge.cli import main
from oftmerge.cli.failures import EXIT_INTERNAL, EXIT_INTERRUPTED, explain
from oftmerge.errors import AdapterFormatError, FileSystemError, HubError, OftMergeError

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ROOT / "adapters"


def _hub_error() -> Exception:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")


def _safetensors_error(text: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(text)


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda: AdapterFormatError("a/adapter_config.json: r is 'eight'"), 2, r"^a/adapter_config\.json: r is 'eight'$"),
        (lambda: HubError("cannot push x"), 4, r"^cannot push x$"),
        (lambda: FileSystemError("out: no space"), 3, r"^out: no space$"),
        (lambda: OSError(errno.ENOSPC, "No space left on device", "/d/model.safetensors"), 3,
         r"^/d/model\.safetensors: no space left on the device; free space there, or write the output elsewhere \(another -o\)$"),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), 3, r"^/data/out: no space left on the device"),  # no file name: the output
        (lambda: OSError(errno.EACCES, "Permission denied", "/data/.out.partial-1-x"), 3, r"^/data/out: permission denied; "),  # its temporary sibling
        (lambda: OSError(errno.EROFS, "Read-only file system", "/mnt/x"), 3, r"^/mnt/x: read-only file system; write the output elsewhere"),
        (lambda: OSError(errno.EPERM, "Operation not permitted", "/d/x"), 3, r"^/d/x: operation not permitted \(the directory is immutable, chattr \+i"),
        (lambda: OSError(errno.ENOENT, "No such file or directory", "/proc/.oftmerge-x"), 3,
         r"^/proc/\.oftmerge-x: cannot be created: /proc is on a virtual file system"),
        (lambda: OSError(errno.ENOENT, "No such file or directory", "/nonexistent/dir/file"), 3,
         r"^/nonexistent/dir/file: no such file or directory; check the path$"),
        (lambda: MemoryError(), 3, r"^out of memory; "),
        (lambda: _wrapped(OftMergeError("x: cannot write the output there"), OSError(errno.EROFS, "ro")), 3, r"^x: cannot write the output there$"),
        (lambda: _wrapped(AdapterFormatError("bad"), OSError(errno.EIO, "io")), 2, r"^bad$"),  # a subclass keeps its own code
        (lambda: _safetensors_error("Error while serializing: I/O error: No space left on device (os error 28)"), 3,
         r"^/data/out: no space left on the device"),
        (lambda: _safetensors_error("File does not contain tensor x"), 2, r"^a safetensors file could not be read \(File does not contain tensor x\)"),
        (_hub_error, 4, r"^the Hugging Face Hub: OfflineModeIsEnabled: Cannot reach .*; check the network connection, HF_HUB_OFFLINE and HF_TOKEN$"),
        (lambda: json.JSONDecodeError("Expecting value", "x", 0), 2, r"^a file that should be JSON text is not"),
        (lambda: KeyboardInterrupt(), 130, r"^interrupted"),
        (lambda: KeyError("lm_head.weight"), 1, r"^internal error: KeyError: 'lm_head\.weight' \(a bug in oftmerge .*run again with -v for the traceback"),
        (lambda: ValueError("a plain one"), 1, r"^internal error: ValueError: a plain one"),
    ],
)
def test_each_kind_of_failure_has_its_code_and_one_line(make, code, message):
    got, line = explain(make(), "/data/out")
    assert got == code and re.search(message, line), (got, line)
    assert "\n" not in line


def _wrapped(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


def test_file_system_error_is_also_the_os_error():
    err = FileSystemError.from_os_error(OSError(errno.EDQUOT, "Disk quota exceeded", "/home/me/out"))
    assert isinstance(err, OSError) and isinstance(err, OftMergeError) and isinstance(err, ValueError)
    assert (err.errno, err.filename, err.exit_code) == (errno.EDQUOT, "/home/me/out", 3)
    assert str(err).startswith("/home/me/out: disk quota exceeded; ")
    assert FileSystemError.from_os_error(err) is err
    assert HubError.exit_code == 4 and issubclass(HubError, OftMergeError)


@pytest.fixture()
def pair(tmp_path):
    for name in ("oft-upper", "oft-reverse"):
        shutil.copytree(ADAPTERS / name, tmp_path / name)
    return tmp_path / "oft-upper", tmp_path / "oft-reverse"


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("oftmerge: error:")]


def test_verbose_shows_the_traceback_then_the_one_line(pair, tmp_path, capsys):
    a, b = pair
    config = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**config, "oft_block_size": "sixteen"}))
    argv = ["merge", str(a), str(b), "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_errors(err)) == 1 and "oft_block_size is 'sixteen'" in err
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "AdapterFormatError" in err
    assert len(_errors(err)) == 1 and err.rstrip().splitlines()[-1] == _errors(err)[0]  # the line comes last


def test_an_internal_error_is_one_line_with_code_1(pair, tmp_path, capsys, monkeypatch):
    import oftmerge.ops.merge

    def broken(*args, **kwargs):
        raise KeyError("model.layers.0.mlp.up_proj")

    monkeypatch.setattr(oftmerge.ops.merge, "run_merge", broken)
    a, b = pair
    argv = ["merge", str(a), str(b), "-o", str(tmp_path / "out")]
    assert main(argv) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.fullmatch(
        r"oftmerge: error: internal error: KeyError: 'model\.layers\.0\.mlp\.up_proj' \(a bug in oftmerge \S+; run again with -v "
        r"for the traceback, and please report it\)",
        err.strip(),
    )
    assert main(["-v", *argv]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err and len(_errors(err)) == 1


def test_ctrl_c_is_130(pair, tmp_path, capsys, monkeypatch):
    import oftmerge.ops.merge

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(oftmerge.ops.merge, "run_merge", interrupted)
    a, b = pair
    assert main(["merge", str(a), str(b), "-o", str(tmp_path / "out")]) == EXIT_INTERRUPTED
    assert _errors(capsys.readouterr().err)[0].startswith("oftmerge: error: interrupted")


def _no_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out."))


def test_disk_full_in_the_adapter_writer_simulated(pair, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError (``os error 28``): exit 3, the output named, nothing left (no tmpfs needed)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    a, b = pair
    out = tmp_path / "out"
    assert main(["merge", str(a), str(b), "-o", str(out), "-q"]) == 3
    (line,) = _errors(capsys.readouterr().err)
    assert line == f"oftmerge: error: {out}: no space left on the device; free space there, or write the output elsewhere (another -o)"
    assert not out.exists() and not _no_leftovers(tmp_path)


def test_disk_full_in_the_shard_writer_simulated(pair, tmp_path, capsys, monkeypatch):
    """A fold whose shard write fails with ENOSPC (a plain ``write``: no file name): exit 3, the output named, nothing left."""
    import oftmerge.formats.shards

    calls, write = [], oftmerge.formats.shards._write_tensor

    def full(f, tensor):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(f, tensor)

    monkeypatch.setattr(oftmerge.formats.shards, "_write_tensor", full)
    a, _ = pair
    out = tmp_path / "out"
    assert main(["fold", str(a), "--base", str(ADAPTERS / "base"), "-o", str(out), "-q"]) == 3
    (line,) = _errors(capsys.readouterr().err)
    assert line.startswith(f"oftmerge: error: {out}: no space left on the device; ")
    assert calls and not out.exists() and not _no_leftovers(tmp_path)


def test_docs_list_every_exit_code():
    """docs/cli.md's "Exit codes" table names exactly the codes the command line uses."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| `(\d+)` \|", section, flags=re.M)}
    used = {0, EXIT_INTERNAL, OftMergeError.exit_code, FileSystemError.exit_code, HubError.exit_code, EXIT_INTERRUPTED}
    assert documented == used, (documented, used)
