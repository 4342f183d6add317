"""Bad inputs and faults, as a table: each :class:`Case` builds its input in a fresh workspace and names what must happen.

The cases live in this package, one module per class of failure (``outputs``: aliases, races and
replacement of outputs; ``errors``: what must be one line instead of a traceback; ``numerics``:
non-finite results and lax parsing). ``tests/system/test_bad_inputs.py`` runs every case through
:func:`run_case`, which asserts, whatever the case:

* the exit code, and for a failure exactly one ``oftmerge: error: ...`` line on stderr matching
  ``message``, and no traceback anywhere;
* every file that was in the workspace before the run has the same SHA-256 afterwards (inputs are
  never modified), except under ``changes`` (the output an ``--overwrite`` control replaces);
* nothing is left beside any output: no ``.*.partial-*``, ``.*.old-*``, ``*.pid`` or lock file, and
  the run's ``$TMPDIR`` is empty;
* for a good control (``code=0``), the output is complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ROOT / "adapters"

#: names a run may never leave behind (beside an output, or anywhere in the workspace)
LEFTOVER = re.compile(r"^\..*\.(partial|old)-|\.pid$|\.lock$")


class Workspace:
    """A temporary directory with copies of the bundled adapters and base: ``a`` (oft-upper), ``b`` (oft-reverse),
    ``c`` (oft-sort), ``base``; ``tmp`` is the run's ``$TMPDIR``. ``ws / "x"`` is a path in it."""

    def __init__(self, root: Path):
        self.root = root
        for name, src in (("a", "oft-upper"), ("b", "oft-reverse"), ("c", "oft-sort"), ("base", "base")):
            shutil.copytree(ADAPTERS / src, root / name)
        self.tmp = root / "tmp"
        self.tmp.mkdir()

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    def __str__(self) -> str:
        return str(self.root)


Argv = Callable[[Workspace], Sequence[str]]


@dataclass(frozen=True)
class Case:
    """One bad input (or good control): ``argv(ws)`` are the CLI arguments after ``oftmerge``."""

    id: str
    argv: Argv
    code: int = 2  #: expected exit code
    message: str | None = None  #: regex that the single error line must match (failures)
    setup: Callable[[Workspace], None] | None = None  #: builds the bad input in the workspace
    env: dict[str, str] = field(default_factory=dict)
    output: str | None = "out"  #: the output path (relative); a good control must leave it complete
    changes: tuple[str, ...] = ()  #: workspace paths (relative) that may change (an overwritten output)
    skip: Callable[[Workspace], str | None] | None = None  #: a reason to skip here (no tmpfs, root, ...)
    check: Callable[[Workspace], None] | None = None  #: further assertions on the workspace after the run
    cwd: str | None = None  #: the working directory of the run (relative; created), else the workspace


def digests(root: Path, exclude: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` (symlinks by their target text), ``exclude`` left out."""
    out = {}
    for p in sorted(root.rglob("*")):
        if exclude in p.parents or p == exclude:
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if LEFTOVER.search(p.name))


def complete(path: Path) -> bool:
    """An output that a reader would take as finished: an adapter or a model directory with its config, or a readable
    ``.safetensors`` file with tensors (a diffusion OFT file)."""
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys())) > 0
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    adapter = {"adapter_config.json", "adapter_model.safetensors"} <= names
    model = "config.json" in names and any(n.endswith(".safetensors") for n in names)
    return adapter or model


def run_case(case: Case, root: Path, capsys, monkeypatch) -> None:
    """Run ``case`` in a new workspace below ``root`` and assert everything the module docstring lists."""
    import pytest

    from oftmerge.cli import main

    ws = Workspace(root)
    if case.skip is not None and (reason := case.skip(ws)):
        pytest.skip(reason)
    if case.setup is not None:
        case.setup(ws)
    cwd = ws.root / case.cwd if case.cwd else ws.root
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)  # never the repository: an output path relative to it must not reach the checkout
    before = digests(ws.root, ws.tmp)
    monkeypatch.setattr(tempfile, "tempdir", str(ws.tmp))
    monkeypatch.setenv("TMPDIR", str(ws.tmp))
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    argv = [str(a) for a in case.argv(ws)]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - the point: a traceback is a failure of the case
        raise AssertionError(f"{case.id}: `oftmerge {' '.join(argv)}` raised {type(exc).__name__}: {exc}") from exc
    err = capsys.readouterr().err
    assert "Traceback" not in err, f"{case.id}: traceback on stderr:\n{err}"
    assert code == case.code, f"{case.id}: exit code {code}, expected {case.code}; stderr:\n{err}"
    if case.code != 0:
        lines = [line for line in err.splitlines() if line.startswith("oftmerge: error:") or line.startswith("usage:") or ": error:" in line]
        errors = [line for line in lines if ": error:" in line]
        assert len(errors) == 1, f"{case.id}: expected one error line, got:\n{err}"
        if case.message is not None:
            assert re.search(case.message, errors[0]), f"{case.id}: {errors[0]!r} does not match {case.message!r}"
    after = digests(ws.root, ws.tmp)
    changed = [p for p, h in before.items() if after.get(p) != h and not any(p == c or p.startswith(c.rstrip("/") + "/") for c in case.changes)]
    assert not changed, f"{case.id}: inputs modified or removed: {changed[:5]}"
    assert not leftovers(ws.root), f"{case.id}: left behind: {leftovers(ws.root)}"
    left = sorted(p.name for p in ws.tmp.iterdir() if not p.name.startswith("torchinductor_"))  # torch's own cache
    assert not left, f"{case.id}: left in $TMPDIR: {left}"
    if case.code == 0 and case.output is not None:
        assert complete(ws / case.output), f"{case.id}: output {case.output} is not complete"
    elif case.output is not None and (ws / case.output).exists() and not any(case.output == c for c in case.changes):
        assert (ws / case.output).is_symlink() or case.output in {p.split("/")[0] for p in before}, (
            f"{case.id}: a failed run left an output at {case.output}"
        )
    if case.check is not None:
        case.check(ws)
