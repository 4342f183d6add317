"""The output guard: an output may not be, hold or lie inside an input, however either is spelled.

:func:`check_output` is called by :func:`oftmerge.engine.commit.output_directory` (every command's
output) and, early, by commands that do a long pass before writing::

    target = check_output("out", [("input adapter", "adapters/oft-upper"), ("the base model", "base")])

Paths are compared fully resolved (``os.path.realpath``: ``..`` after links, a linked parent, a link
as the output or as an input), existing directories also by ``(st_dev, st_ino)`` (a bind mount), and
the files an input directory links to count as the input (a Hub snapshot's ``../../blobs``). An output
that is itself a symbolic link is refused. Every refusal is one :class:`~oftmerge.errors.OftMergeError`
line (``docs/safety.md``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from oftmerge.errors import OftMergeError

__all__ = ["Inputs", "check_output", "check_replaceable_file", "output_location"]

#: (what the input is, its path), e.g. ("input adapter", "adapters/oft-upper")
Inputs = Iterable[tuple[str, "str | os.PathLike[str]"]]

#: entries of an input directory (and of each subdirectory) looked at for links to files elsewhere
_MAX_LINKED = 4096


def check_output(out: str | os.PathLike[str], inputs: Inputs) -> Path:
    """Where ``out`` will be (its parent resolved); raises when writing it would replace, hold or enter one of ``inputs``.

    Also refused: an empty path, and the working directory, one that holds it, the home directory
    or ``/`` (an output replaces its path as a whole).
    """
    target = output_location(check_nonempty(out))
    through = Path(os.path.realpath(target))  # where a link at `target` leads; `target` itself otherwise
    around = {ident: p for p in (target, *target.parents) if (ident := _identity(p)) is not None}
    own = _identity(through)
    for role, path in inputs:
        for src in _real_paths(path):
            how = _clash(target, through, src, own, around)
            if how == "inside":
                raise OftMergeError(
                    f"{target}: the output is inside {role} {path}{_via(path, src)}; inputs are never modified, "
                    "nothing is written into them. Choose an output directory outside it."
                )
            if how is not None:
                raise OftMergeError(
                    f"{target}: the output would replace {role} {path}{_via(path, src, how)}; inputs are never modified. Choose another output directory."
                )
    cwd, home = Path(os.path.realpath(os.getcwd())), Path(os.path.realpath(Path.home()))
    if target == cwd or target in cwd.parents or target in (home, Path(target.anchor)):
        raise OftMergeError(
            f"{target}: is the working directory, a directory that holds it, the home directory or the root; an output "
            "replaces its path as a whole, so oftmerge writes only into a directory of its own. Choose a new directory (-o DIR)."
        )
    if os.path.islink(target):
        raise OftMergeError(
            f"{target}: is a symbolic link (to {os.readlink(target)}); oftmerge neither writes through a link nor replaces "
            f"one. Give the directory itself (-o {through}) or remove the link."
        )
    return target


#: what marks a directory as an earlier output (of oftmerge, PEFT or transformers), which ``overwrite`` may replace
_OUTPUT_MARKS = ("oftmerge.json", "adapter_config.json", "config.json")


def check_nonempty(out: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``out``, unless it is an empty string (``Path("")`` would be the working directory)."""
    if isinstance(out, str) and not out.strip():
        raise OftMergeError("the output path is empty; give the directory to write (-o DIR)")
    return out


def check_replaceable(target: Path) -> None:
    """Refuse to replace (``overwrite``) something at ``target`` that is not an earlier output.

    ``--overwrite`` replaces a previous result: an empty directory, or one holding ``oftmerge.json``,
    ``adapter_config.json`` or ``config.json`` (an adapter or a model). A file, or a directory
    with none of these (someone's data), is never deleted by oftmerge.
    """
    if not os.path.lexists(target) or os.path.islink(target):
        return
    if target.is_dir():
        names = set(os.listdir(target))
        if not names or names & set(_OUTPUT_MARKS):
            return
        what = f"a directory with {len(names)} entries and none of {', '.join(_OUTPUT_MARKS)}"
    else:
        what = "a file"
    raise OftMergeError(
        f"{target}: exists and is {what}, not an earlier output; --overwrite replaces only outputs (adapters, models). "
        "Remove it yourself if it is meant to go, or choose another output path."
    )


def check_replaceable_file(target: Path) -> None:
    """``overwrite`` replaces a file only when it is an earlier output: a safetensors file whose metadata has ``oftmerge``."""
    from oftmerge.formats.checkpoint import read_safetensors_header

    try:
        meta = read_safetensors_header(target)[1].get("__metadata__") or {}
    except Exception:  # noqa: BLE001  (anything unreadable is not an earlier output)
        meta = {}
    if os.path.islink(target) or "oftmerge" not in meta:
        raise OftMergeError(
            f"{target}: exists and is not an earlier oftmerge output (no 'oftmerge' entry in its safetensors metadata); --overwrite "
            "replaces only outputs. Remove it yourself if it is meant to go, or choose another output path."
        )


def output_location(out: str | os.PathLike[str]) -> Path:
    """Where ``out`` is: absolute, its parent fully resolved, its last component kept (a link there is not followed)."""
    p = Path(os.getcwd(), out)
    if p.name in ("", ".", ".."):
        return Path(os.path.realpath(p))
    return Path(os.path.realpath(p.parent)) / p.name


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _real_paths(path: str | os.PathLike[str]) -> Iterator[Path]:
    """An input resolved, then the files it links to (a Hub snapshot's entries are links to ``../../blobs``)."""
    real = Path(os.path.realpath(path))
    yield real
    dirs = [real]
    for d in dirs:
        try:
            with os.scandir(d) as it:
                for k, entry in enumerate(it):
                    if k >= _MAX_LINKED:
                        break
                    if entry.is_symlink():
                        yield Path(os.path.realpath(entry.path))
                    elif d == real and entry.is_dir(follow_symlinks=False):
                        dirs.append(Path(entry.path))  # one level of subfolders
        except OSError:
            continue


def _clash(target: Path, through: Path, src: Path, own: tuple[int, int] | None, around: dict[tuple[int, int], Path]) -> str | None:
    """How writing ``target`` meets input ``src``: "same", "holds" (replace it), "inside" (write into it), or None."""
    for o in (target, through):
        if o == src:
            return "same"
        if src.is_relative_to(o):
            return "holds"
        if o.is_relative_to(src):
            return "inside"
    ident = _identity(src)
    if ident is not None and ident in around:  # another name of the same directory (a bind mount)
        return "same" if around[ident] == target else "inside"
    if own is not None:
        for p in src.parents:
            if _identity(p) == own:
                return "holds"
    return None


def _via(given: str | os.PathLike[str], src: Path, how: str = "") -> str:
    """A note on how the paths meet, when the spelling given does not show it."""
    if how == "holds":
        return f" (it holds {src})"
    return "" if Path(os.path.abspath(given)) == src else f" (that is {src})"
