"""Progress bars (tqdm) on a terminal, none otherwise: ``oftmerge merge`` and ``fold`` on the bundled adapters,
with stderr a pseudo-terminal, a pipe, and with ``-q``; and the ``progress`` callback API of the library."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from oftmerge.cli.common import ProgressBars
from oftmerge.engine.model import report_progress

from helpers import ADAPTERS

pytestmark = pytest.mark.skipif(not (ADAPTERS / "base").is_dir(), reason="bundled adapters missing")

#: a finished bar: "28/28 [00:00<00:00, 910.58module/s, 131kB]"
FINISHED = re.compile(r"100%\|[^|]*\| (\d+)/\1 \[[^\]]*module/s, [\d.]+[kMG]?B\]")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}


def _on_terminal(*argv: str) -> tuple[int, str, str]:
    """Run ``oftmerge ARGV`` with stderr a pseudo-terminal (stdout a pipe); ``(code, stdout, stderr)``."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "oftmerge", *argv], stdout=subprocess.PIPE, stderr=slave, env=_env())
    finally:
        os.close(slave)
    err = b""
    while True:  # read while it runs, so that a full terminal buffer never blocks it
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read() if proc.stdout is not None else b""
    code = proc.wait()
    os.close(master)
    return code, out.decode(), err.decode().replace("\r\n", "\n")


def _piped(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oftmerge", *argv], capture_output=True, text=True, env=_env())


def test_merge_draws_a_bar_on_a_terminal(tmp_path):
    code, out, err = _on_terminal("merge", str(ADAPTERS / "oft-upper"), str(ADAPTERS / "oft-reverse"), "-o", str(tmp_path / "m"))
    assert code == 0, err
    bars = FINISHED.findall(err)
    assert len(bars) == 1 and int(bars[0]) > 0, err
    assert err.lstrip("\r").startswith("merge: ")
    assert "%|" not in out and f"wrote {tmp_path / 'm'}" in out  # the bar goes to stderr, the report to stdout


def test_fold_draws_a_bar_on_a_terminal(tmp_path):
    code, out, err = _on_terminal("fold", str(ADAPTERS / "oft-upper"), "--base", str(ADAPTERS / "base"), "-o", str(tmp_path / "f"))
    assert code == 0, err
    bars = FINISHED.findall(err)
    assert len(bars) == 1, err
    assert "fold: " in err and "%|" not in out


def test_merge_fold_into_draws_one_bar_per_phase(tmp_path):
    code, _, err = _on_terminal(
        "merge", str(ADAPTERS / "oft-upper"), str(ADAPTERS / "oft-reverse"), "--fold-into", str(ADAPTERS / "base"), "-o", str(tmp_path / "f")
    )
    assert code == 0, err
    assert len(FINISHED.findall(err)) == 2 and "merge: " in err and "fold: " in err


def test_quiet_draws_nothing_on_a_terminal(tmp_path):
    code, out, err = _on_terminal("fold", str(ADAPTERS / "oft-upper"), "--base", str(ADAPTERS / "base"), "-o", str(tmp_path / "f"), "-q")
    assert (code, out, err) == (0, "", "")


def test_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    folded = _piped("fold", str(ADAPTERS / "oft-upper"), "--base", str(ADAPTERS / "base"), "-o", str(tmp_path / "f"))
    assert folded.returncode == 0 and folded.stderr == ""  # the report alone
    assert folded.stdout.rstrip().endswith(f"wrote {tmp_path / 'f'}")
    merged = _piped("merge", str(ADAPTERS / "oft-upper"), str(ADAPTERS / "oft-reverse"), "-o", str(tmp_path / "m"))
    assert merged.returncode == 0 and "\r" not in merged.stderr and "%|" not in merged.stderr
    assert all(line.startswith("WARNING oftmerge.") for line in merged.stderr.splitlines())  # only oftmerge's own log


def test_report_progress_keeps_three_argument_callbacks():
    old: list[tuple] = []
    new: list[tuple] = []
    report_progress(lambda done, total, name: old.append((done, total, name)))(1, 2, "a", 10)
    report_progress(lambda done, total, name, nbytes=None: new.append((done, nbytes)))(1, 2, "a", 10)
    report_progress(lambda *a, **k: new.append(k["nbytes"]))(2, 2, "b", 20)
    assert old == [(1, 2, "a")] and new == [(1, 10), 20]
    assert report_progress(None) is None


def test_progress_bars_start_a_bar_per_phase():
    made: list[FakeBar] = []

    class FakeBar:
        def __init__(self, total, desc, **kw):
            self.total, self.desc, self.n, self.closed, self.postfix = total, desc, 0, False, None
            made.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s, refresh=True):
            self.postfix = s

        def close(self):
            self.closed = True

        @staticmethod
        def format_sizeof(n, suffix, divisor):
            return f"{n}{suffix}"

    bars = ProgressBars(FakeBar, ["merge", "fold"], "module")
    for k in range(1, 4):
        bars(k, 3, f"m{k}", nbytes=5)
    for k in range(1, 3):
        bars(k, 2, f"m{k}")
    assert [(b.desc, b.total, b.n, b.closed) for b in made] == [("merge", 3, 3, True), ("fold", 2, 2, True)]
    assert made[0].postfix == "15B" and made[1].postfix is None
