"""Bad-input cases: outputs (see the package docstring).

Issue 16, items 1-3 and 7 (permissions, symlinked outputs): an output that is another spelling of an input
(a link, ``x/../A``, a linked parent, a Hub snapshot's blobs), holds one or lies inside one, for every command
(``merge``, ``convert``, ``fold``, ``merge --fold-into``, ``decouple``); an output that exists; an output that
is a link; leftovers of a killed run (a partial directory, a journalled replacement, a stale lock) that the
next run cleans up or puts back; and good controls (``--overwrite`` over a plain existing output replaces it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable

from bad_inputs import Case, Workspace

Setup = Callable[[Workspace], None]


def _all(*steps: Setup) -> Setup:
    def setup(ws: Workspace) -> None:
        for step in steps:
            step(ws)

    return setup


def _link(name: str, to: str) -> Setup:
    """``ws/name`` -> ``ws/to`` (``"."``: the workspace itself)."""

    def setup(ws: Workspace) -> None:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).symlink_to(ws.root if to == "." else ws / to)

    return setup


def _dirs(*names: str) -> Setup:
    def setup(ws: Workspace) -> None:
        for name in names:
            (ws / name).mkdir(parents=True, exist_ok=True)

    return setup


def _text(name: str) -> Setup:
    def setup(ws: Workspace) -> None:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text("someone's data\n")

    return setup


def _copy(src: str, dst: str) -> Setup:
    return lambda ws: shutil.copytree(ws / src, ws / dst, symlinks=True) and None


def _experts(*names: str) -> Setup:
    """Full "finetunes" of the base (its weights plus seeded noise), for decouple."""

    def setup(ws: Workspace) -> None:
        from helpers import save_full_expert

        for k, name in enumerate(names, start=1):
            save_full_expert(ws / name, ws / "base", seed=k)

    return setup


def _lora(name: str) -> Setup:
    def setup(ws: Workspace) -> None:
        from helpers import save_lora_expert

        save_lora_expert(ws / name, ws / "base", seed=1)

    return setup


def _hub_snapshot(ws: Workspace) -> None:
    """``repo/snapshots/abc``: adapter ``a`` laid out as the Hub cache does, every file a link to ``../../blobs/<sha>``."""
    blobs, snap = ws / "repo" / "blobs", ws / "repo" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted((ws / "a").iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / sha)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", sha))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_partial(ws: Workspace) -> None:
    """What a run killed while writing leaves: a partial directory with half a shard, its marker naming a dead pid."""
    tmp = ws / ".out.partial-x"
    tmp.mkdir()
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    (ws / ".out.partial-x.pid").write_text(f"{_dead_pid()} {socket.gethostname()}\n")


def _killed_replacement(*, in_place: bool) -> Setup:
    """A replacement killed between its renames: the old output (a copy of ``c``) aside at ``.out.old-x``, its journal;
    ``in_place``: the new one (a copy of ``b``) already at ``out``."""

    def setup(ws: Workspace) -> None:
        shutil.copytree(ws / "c", ws / ".out.old-x")
        new_id = [0, 0]
        if in_place:
            shutil.copytree(ws / "b", ws / "out")
            st = os.lstat(ws / "out")
            new_id = [st.st_dev, st.st_ino]
        record = {"pid": _dead_pid(), "host": socket.gethostname(), "old": ".out.old-x", "new": ".out.partial-y", "new_id": new_id}
        (ws / ".out.old-x.journal").write_text(json.dumps(record) + "\n")

    return setup


def _stale_lock(ws: Workspace) -> None:
    (ws / ".out.lock").write_text(f"{_dead_pid()} {socket.gethostname()}\n")


def _same_as(out: str, src: str) -> Callable[[Workspace], None]:
    """A check: ``out`` holds exactly the files of ``src`` as the workspace had it (a restored or kept output)."""

    def check(ws: Workspace) -> None:
        from bad_inputs import ADAPTERS

        bundled = {"a": "oft-upper", "b": "oft-reverse", "c": "oft-sort"}[src]
        got = {p.name: p.read_bytes() for p in (ws / out).iterdir()}
        assert got == {p.name: p.read_bytes() for p in (ADAPTERS / bundled).iterdir()}, f"{out} is not {src}"

    return check


def _merged(out: str) -> Callable[[Workspace], None]:
    def check(ws: Workspace) -> None:
        assert (ws / out / "oftmerge.json").is_file(), f"{out} is not oftmerge's output"

    return check


def _umask_modes(ws: Workspace) -> None:
    from oftmerge.engine.fsops import modes

    dir_mode, file_mode = modes()
    assert (ws / "out").stat().st_mode & 0o777 == dir_mode
    for p in (ws / "out").iterdir():
        assert p.stat().st_mode & 0o777 == file_mode, f"{p.name}: {oct(p.stat().st_mode & 0o777)}, the umask gives {oct(file_mode)}"


def _root(ws: Workspace) -> str | None:
    return "running as root, which ignores directory permissions" if os.geteuid() == 0 else None


def _read_only(name: str) -> Setup:
    return lambda ws: (ws / name).mkdir(mode=0o555) or None


A, B = "a", "b"
MERGE = lambda ws: ["merge", ws / A, ws / B]  # noqa: E731
FOLD = lambda ws: ["fold", ws / A, "--base", ws / "base"]  # noqa: E731
FOLD_INTO = lambda ws: ["merge", ws / A, ws / B, "--fold-into", ws / "base"]  # noqa: E731
FAST_DECOUPLE = ["--orthogonal", "none", "--euclidean", "ta"]
REPLACE_ADAPTER = "would replace input adapter"
REPLACE_BASE = "would replace the base model"

CASES: list[Case] = [
    Case("outputs-good-merge", lambda ws: ["merge", ws / "a", ws / "b", "-o", ws / "out", "-q"], code=0),
    # -- item 1: another spelling of an input, for every command ------------------------------------------------
    Case("outputs-merge-input-through-a-link", lambda ws: ["merge", ws / "la", ws / B, "-o", ws / A, "--overwrite"],
         message=REPLACE_ADAPTER, setup=_link("la", A), output=None),
    Case("outputs-merge-output-is-a-link-to-an-input", lambda ws: [*MERGE(ws), "-o", ws / "la", "--overwrite"],
         message=REPLACE_ADAPTER, setup=_link("la", A), output="la"),
    Case("outputs-merge-dotdot", lambda ws: [*MERGE(ws), "-o", f"{ws}/x/../b", "--overwrite"],
         message=REPLACE_ADAPTER, setup=_dirs("x"), output=None),
    Case("outputs-merge-dotdot-through-a-linked-directory", lambda ws: [*MERGE(ws), "-o", f"{ws}/d/../../a", "--overwrite"],
         message=REPLACE_ADAPTER, setup=_all(_dirs("deep/dir"), _link("d", "deep/dir")), output=None),  # lexically ../a
    Case("outputs-merge-linked-parent", lambda ws: [*MERGE(ws), "-o", ws / "lws" / A, "--overwrite"],
         message=REPLACE_ADAPTER, setup=_link("lws", "."), output=None),
    Case("outputs-merge-base-through-a-link", lambda ws: [*MERGE(ws), "--base", ws / "lbase", "-o", ws / "base", "--overwrite"],
         message=REPLACE_BASE, setup=_link("lbase", "base"), output=None),
    Case("outputs-merge-output-holds-the-inputs", lambda ws: [*MERGE(ws), "-o", ws.root, "--overwrite"],
         message=REPLACE_ADAPTER + r" .*\(it holds", output=None),
    Case("outputs-merge-output-inside-an-input", lambda ws: [*MERGE(ws), "-o", ws / A / "merged"],
         message="is inside input adapter", output=None),
    Case("outputs-merge-hub-snapshot-blobs", lambda ws: ["merge", ws / "repo/snapshots/abc", ws / B, "-o", ws / "repo/blobs", "--overwrite"],
         message=REPLACE_ADAPTER + r" .*\(it holds .*blobs", setup=_hub_snapshot, output=None),
    Case("outputs-convert-output-is-a-link-to-the-input", lambda ws: ["convert", ws / A, "-o", ws / "la", "--overwrite"],
         message=REPLACE_ADAPTER, setup=_link("la", A), output="la"),
    Case("outputs-convert-dotdot", lambda ws: ["convert", ws / "la", "-o", f"{ws}/x/../a", "--overwrite"],
         message=REPLACE_ADAPTER, setup=_all(_dirs("x"), _link("la", A)), output=None),
    Case("outputs-fold-over-its-adapter", lambda ws: [*FOLD(ws), "-o", ws / A, "--overwrite"],
         message="would replace the adapter", output=None),
    Case("outputs-fold-base-through-a-link", lambda ws: ["fold", ws / A, "--base", ws / "lbase", "-o", ws / "base", "--overwrite"],
         message=REPLACE_BASE, setup=_link("lbase", "base"), output=None),
    Case("outputs-fold-linked-parent", lambda ws: [*FOLD(ws), "-o", ws / "lws" / "base", "--overwrite"],
         message=REPLACE_BASE, setup=_link("lws", "."), output=None),
    Case("outputs-fold-inside-the-base", lambda ws: [*FOLD(ws), "-o", ws / "base" / "folded"],
         message="is inside the base model", output=None),
    Case("outputs-fold-into-over-an-adapter", lambda ws: [*FOLD_INTO(ws), "-o", f"{ws}/x/../b", "--overwrite"],
         message=REPLACE_ADAPTER, setup=_dirs("x"), output=None),
    Case("outputs-fold-into-base-through-a-link", lambda ws: ["merge", ws / A, ws / B, "--fold-into", ws / "lbase", "-o", ws / "base", "--overwrite"],
         message=REPLACE_BASE, setup=_link("lbase", "base"), output=None),
    Case("outputs-fold-into-inside-the-base", lambda ws: [*FOLD_INTO(ws), "-o", ws / "lbase" / "sub"],
         message="is inside the base model", setup=_link("lbase", "base"), output=None),
    Case("outputs-decouple-over-an-expert", lambda ws: ["decouple", "--base", ws / "base", ws / "e1", ws / "e2", "-o", ws / "e2", "--overwrite"],
         message="would replace expert", setup=_experts("e1", "e2"), output=None),
    Case("outputs-decouple-output-is-a-link-to-an-expert",
         lambda ws: ["decouple", "--base", ws / "base", ws / "e1", "-o", ws / "le1", "--overwrite"],
         message="would replace expert", setup=_all(_experts("e1"), _link("le1", "e1")), output="le1"),
    Case("outputs-decouple-base-dotdot", lambda ws: ["decouple", "--base", ws / "base", ws / "e1", "-o", f"{ws}/e1/../base", "--overwrite"],
         message=REPLACE_BASE, setup=_experts("e1"), output=None),
    Case("outputs-decouple-inside-an-expert", lambda ws: ["decouple", "--base", ws / "base", ws / "e1", "-o", ws / "e1" / "merged"],
         message="is inside expert", setup=_experts("e1"), output=None),
    Case("outputs-decouple-over-a-lora-expert", lambda ws: ["decouple", "--base", ws / "base", ws / "l1", "-o", f"{ws}/x/../l1", "--overwrite"],
         message="would replace expert", setup=_all(_dirs("x"), _lora("l1")), output=None),
    # -- an output that exists, or is a link ------------------------------------------------------------------------
    Case("outputs-exists-without-overwrite", lambda ws: [*MERGE(ws), "-o", ws / "out"],
         message="out: already exists; choose another output path or pass .*--overwrite", setup=_copy("c", "out"), check=_same_as("out", "c")),
    Case("outputs-fold-exists-without-overwrite", lambda ws: [*FOLD(ws), "-o", ws / "out"],
         message="already exists", setup=_copy("c", "out"), check=_same_as("out", "c")),
    Case("outputs-output-is-a-symlink", lambda ws: [*MERGE(ws), "-o", ws / "out", "--overwrite"],
         message="is a symbolic link .*neither writes through a link nor replaces one", setup=_all(_copy("c", "elsewhere"), _link("out", "elsewhere"))),
    Case("outputs-read-only-parent", lambda ws: [*MERGE(ws), "-o", ws / "ro" / "out"],
         code=3, message="ro: permission denied; write the output elsewhere", setup=_read_only("ro"), output=None, skip=_root),  # 3: the file system
    # -- paths that would replace what is not an output ---------------------------------------------------------
    Case("outputs-empty-path", lambda ws: [*MERGE(ws), "-o", ""], message="the output path is empty", output=None),
    Case("outputs-working-directory", lambda ws: [*MERGE(ws), "-o", ".", "--overwrite"], cwd="work",
         message="is the working directory", setup=_dirs("work"), output=None),
    Case("outputs-parent-of-the-working-directory", lambda ws: [*MERGE(ws), "-o", "..", "--overwrite"], cwd="work/sub",
         message="is the working directory, a directory that holds it", setup=_dirs("work/sub"), output=None),
    Case("outputs-overwrite-a-file", lambda ws: [*MERGE(ws), "-o", ws / "notes.txt", "--overwrite"], output="notes.txt",
         message="notes.txt: exists and is a file, not an earlier output", setup=_text("notes.txt")),
    Case("outputs-overwrite-someones-data", lambda ws: [*FOLD(ws), "-o", ws / "data", "--overwrite"], output="data",
         message="data: exists and is a directory with 1 entries and none of", setup=_text("data/table.csv")),
    # -- good controls ----------------------------------------------------------------------------------------------
    Case("outputs-good-overwrite", lambda ws: [*MERGE(ws), "-o", ws / "out", "--overwrite", "-q"], code=0,
         setup=_copy("c", "out"), changes=("out",), check=_merged("out")),
    Case("outputs-good-fold-overwrite", lambda ws: [*FOLD(ws), "-o", ws / "out", "--overwrite", "-q"], code=0,
         setup=_copy("c", "out"), changes=("out",), check=_merged("out")),
    Case("outputs-good-overwrite-an-empty-directory", lambda ws: [*MERGE(ws), "-o", ws / "empty", "--overwrite", "-q"], code=0,
         output="empty", setup=_dirs("empty"), changes=("empty",)),
    Case("outputs-good-fold-into", lambda ws: [*FOLD_INTO(ws), "-o", ws / "out", "-q"], code=0),
    Case("outputs-good-convert", lambda ws: ["convert", ws / A, "-o", ws / "out"], code=0),
    Case("outputs-good-decouple", lambda ws: ["decouple", "--base", ws / "base", ws / "e1", ws / "e2", *FAST_DECOUPLE, "-o", ws / "out", "-q"],
         code=0, setup=_experts("e1", "e2")),
    Case("outputs-good-modes-follow-the-umask", lambda ws: [*MERGE(ws), "-o", ws / "out", "-q"], code=0, check=_umask_modes),
    Case("outputs-good-output-beside-a-linked-input", lambda ws: ["merge", ws / "la", ws / B, "-o", ws / "lws" / "out", "-q"], code=0,
         setup=_all(_link("la", A), _link("lws", ".")), check=_merged("out")),
    # -- leftovers of a killed run: the next run cleans up, or puts the old output back ---------------------------
    Case("outputs-killed-partial-removed", lambda ws: [*MERGE(ws), "-o", ws / "out", "-q"], code=0,
         setup=_killed_partial, changes=(".out.partial-x", ".out.partial-x.pid")),
    Case("outputs-killed-replacement-restored", lambda ws: [*MERGE(ws), "-o", ws / "out"], message="already exists",
         setup=_killed_replacement(in_place=False), changes=("out", ".out.old-x", ".out.old-x.journal"), check=_same_as("out", "c")),
    Case("outputs-killed-replacement-restored-then-replaced", lambda ws: [*FOLD(ws), "-o", ws / "out", "--overwrite", "-q"], code=0,
         setup=_killed_replacement(in_place=False), changes=("out", ".out.old-x", ".out.old-x.journal"), check=_merged("out")),
    Case("outputs-killed-replacement-completed", lambda ws: [*MERGE(ws), "-o", ws / "out"], message="already exists",
         setup=_killed_replacement(in_place=True), changes=(".out.old-x", ".out.old-x.journal"), check=_same_as("out", "b")),
    Case("outputs-killed-older-oftmerge-restored", lambda ws: [*MERGE(ws), "-o", ws / "out"], message="already exists",
         setup=_copy("c", ".out.old-k2j4h5g6"), changes=("out", ".out.old-k2j4h5g6"), check=_same_as("out", "c")),
    Case("outputs-stale-lock-removed", lambda ws: [*MERGE(ws), "-o", ws / "out", "-q"], code=0, setup=_stale_lock, changes=(".out.lock",)),
]  # fmt: skip
