"""Where an input comes from: a local directory, or a Hugging Face Hub repository resolved to a local snapshot.

Every command names its inputs (adapters, ``--base``, ``--fold-into``, decoupling experts) by a
string; :func:`resolve_source` turns one into a :class:`ResolvedSource`, a local directory plus,
for a Hub input, the repository, the revision asked for and the commit it resolved to:

* an existing local path always wins, whatever it looks like (``adapters/oft-upper``,
  ``./a/b``, ``ns/name`` when a directory of that name exists);
* else a Hub id, ``name`` or ``namespace/name`` with an optional ``@revision`` (a branch, tag
  or commit hash), is resolved with ``huggingface_hub.snapshot_download`` into the Hub cache
  (``HF_HUB_CACHE``), offline when ``HF_HUB_OFFLINE=1`` (or ``local_only=True``), with
  ``HF_TOKEN`` for private and gated repositories. Only the files oftmerge reads are fetched
  (configs, safetensors or else ``.bin`` weights, tokenizer files, ``README.md``; top level only);
* anything else is returned as the path it is, and the reader that opens it says what is missing.

A failed resolution is one :class:`~oftmerge.errors.AdapterFormatError` line that says what was
looked for (repository, revision), where (the cache directory; offline or not) and what to do::

    >>> resolve_source("adapters/oft-upper", "adapter").repo_id is None     # doctest: +SKIP
    True
    >>> src = resolve_source("my-org/oft-upper@v1", "adapter")              # doctest: +SKIP
    >>> src.repo_id, src.revision, src.commit[:7], src.path.parent.name     # doctest: +SKIP
    ('my-org/oft-upper', 'v1', '0123abc', 'snapshots')

``huggingface_hub`` (the ``hub`` extra) is imported only when a Hub id is resolved.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oftmerge.errors import AdapterFormatError

__all__ = [
    "ResolvedSource",
    "configured_base",
    "describe_record",
    "describe_source",
    "hub_cache_dir",
    "is_hub_id",
    "parse_hub_id",
    "resolve_source",
    "source_record",
]

log = logging.getLogger(__name__)

#: ``name`` or ``namespace/name`` (the Hub's characters), an optional ``@revision``
_HUB_ID = re.compile(r"(?P<repo>(?:[\w.-]+/)?[\w.-]+)(?:@(?P<rev>[\w.\-/]+))?", re.ASCII)
#: the Hub's limit on a repository id
_MAX_REPO_ID = 96
#: what oftmerge reads of a repository (top level only): configs, indexes, tokenizer files, the card, weights
_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py", "README.md"]
#: weights of repositories without safetensors, fetched only then
_BIN_FILES = ["*.bin"]
_SUBFOLDERS = ["*/*"]


@dataclass(frozen=True)
class ResolvedSource:
    """An input as a local directory; for a Hub input, also the repository, the revision asked for and its commit."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  #: the revision asked for (None: the default branch)
    commit: str | None = None  #: the commit hash of the snapshot

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` reads as a Hub id (``name``, ``ns/name``, ``...@rev``), else None."""
    if not spec or spec[0] in "./~" or "\\" in spec:
        return None
    m = _HUB_ID.fullmatch(spec)
    if m is None:
        return None
    repo = m["repo"]
    if len(repo) > _MAX_REPO_ID or "--" in repo or ".." in repo or any(p[0] in ".-" or p[-1] in ".-" for p in repo.split("/")):
        return None
    return repo, m["rev"]


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hub id (it may still name an existing local directory, which wins)."""
    return parse_hub_id(spec) is not None


def hub_cache_dir() -> Path:
    """The Hub cache, from the environment as it is now (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``)."""
    for var, sub in (("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""), ("HF_HOME", "hub")):
        value = os.environ.get(var)
        if value:
            return Path(os.path.expandvars(os.path.expanduser(value))) / sub
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path("~/.cache/huggingface/hub").expanduser()
    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as the environment says now; huggingface_hub reads it at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def resolve_source(spec: Any, what: str, *, local_only: bool = False) -> ResolvedSource:
    """The local directory of input ``spec`` (``what`` names it in errors: ``"adapter"``, ``"base model"``, ...).

    ``spec`` is a path (``str`` or ``os.PathLike``), a Hub id string, or an already resolved
    :class:`ResolvedSource` (returned as it is, so a run resolves each input once). A path object
    is always taken as a path. ``local_only`` never downloads: a Hub id resolves only when it is
    already in the Hub cache (as with ``HF_HUB_OFFLINE=1``).
    """
    if isinstance(spec, ResolvedSource):
        return spec
    path = Path(spec)
    if path.exists() or not isinstance(spec, str):
        return ResolvedSource(path)
    parsed = parse_hub_id(spec)
    if parsed is None:  # not a Hub id: the reader says what is missing there
        return ResolvedSource(path)
    repo_id, revision = parsed
    return _snapshot(spec, what, repo_id, revision, local_only=local_only or _offline())


def _snapshot(spec: str, what: str, repo_id: str, revision: str | None, *, local_only: bool) -> ResolvedSource:
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise AdapterFormatError(f"{spec}: no such {what} directory; to read it as a Hub id, install huggingface_hub: pip install 'oftmerge[hub]'") from None
    cache = hub_cache_dir()
    where = f"the Hub cache {cache}" + (" (offline: HF_HUB_OFFLINE=1)" if _offline() else " (local files only)" if local_only else "")
    asked = f"Hub repo {repo_id}" + (f" at revision {revision}" if revision else "")

    def download(patterns: list[str], rev: str | None) -> Path:
        try:
            return Path(huggingface_hub.snapshot_download(
                repo_id, revision=rev, cache_dir=cache, local_files_only=local_only, allow_patterns=patterns,
                ignore_patterns=_SUBFOLDERS,
            ))  # fmt: skip
        except hub_errors.LocalEntryNotFoundError as exc:
            partial = getattr(exc, "snapshot_path", None)  # IncompleteSnapshotError: cached, some files missing
            if partial is not None:  # e.g. a model cached by transformers without its README; the readers check what they need
                log.info("%s: using the incomplete cached snapshot %s (%s)", spec, partial, str(exc).splitlines()[0])
                return Path(partial)
            raise

    try:
        folder = download(_FILES, revision)
        if not any(folder.glob("*.safetensors")):  # no safetensors weights: the .bin ones, of the same commit
            folder = download(_FILES + _BIN_FILES, folder.name if folder.parent.name == "snapshots" else revision)
    except hub_errors.GatedRepoError:
        raise AdapterFormatError(
            f"{spec}: {asked} is gated; accept its terms on https://huggingface.co/{repo_id} and set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise AdapterFormatError(
            f"{spec}: no such {what} directory, and no Hub repo {repo_id} (it does not exist, or it is private: set HF_TOKEN or run `hf auth login`)"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise AdapterFormatError(f"{spec}: Hub repo {repo_id} has no revision {revision!r} (a branch, tag or commit hash)") from None
    except hub_errors.LocalEntryNotFoundError:
        missing = _cache_miss(cache, repo_id, revision)
        raise AdapterFormatError(f"{spec}: no such {what} directory, and {missing} is not in {where}; {_what_to_do(local_only)}") from None
    except hub_errors.HFValidationError as exc:
        raise AdapterFormatError(f"{spec}: not a {what} directory nor a valid Hub id ({_first_line(exc)})") from None
    except Exception as exc:  # a network or disk failure inside huggingface_hub: one line, not its traceback
        raise AdapterFormatError(f"{spec}: downloading {asked} into {cache} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    commit = folder.name if folder.parent.name == "snapshots" else None
    log.info("%s: %s (commit %s) at %s", spec, asked, commit, folder)
    return ResolvedSource(folder, repo_id, revision, commit)


def _cache_miss(cache: Path, repo_id: str, revision: str | None) -> str:
    """What the cache lacks: the repository, or one revision of it (with the revisions it has)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    if not (repo_dir / "snapshots").is_dir():
        return f"Hub repo {repo_id}"
    refs = sorted(p.relative_to(repo_dir / "refs").as_posix() for p in (repo_dir / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name[:12] for p in (repo_dir / "snapshots").iterdir() if p.is_dir())
    return f"revision {revision or 'main'} of Hub repo {repo_id} (cached: {', '.join(refs + commits) or 'no snapshot'})"


def _what_to_do(local_only: bool) -> str:
    if _offline():
        return "download it first with network access (HF_HUB_OFFLINE unset), or give a local directory"
    if local_only:
        return "download it first, or give a local directory"
    return "the Hub could not be reached: check the connection, or give a local directory"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def source_record(src: ResolvedSource | None) -> dict[str, Any] | None:
    """The provenance of a Hub input (``repo_id``, ``revision`` asked for, ``commit``); None for a local one."""
    if src is None or not src.is_hub:
        return None
    return {"repo_id": src.repo_id, "revision": src.revision, "commit": src.commit}


def describe_source(src: ResolvedSource) -> str:
    """One line for reports: the path, or ``ns/name@revision (commit 0123abc..., /cache/.../snapshots/...)``."""
    return describe_record(str(src.path), source_record(src))


def describe_record(path: str, hub: Mapping[str, Any] | None) -> str:
    """:func:`describe_source` from a provenance record: the path, and :func:`source_record`'s ``hub`` if any."""
    if not hub:
        return path
    rev = f"@{hub['revision']}" if hub.get("revision") else ""
    commit = f"commit {hub['commit'][:12]}, " if hub.get("commit") else ""
    return f"{hub['repo_id']}{rev} ({commit}{path})"


def configured_base(adapters: Any) -> str | None:
    """The ``base_model_name_or_path`` the adapters' configs agree on (None when they name none or differ).

    ``adapters`` are resolved sources, adapter directories, or objects with a ``base_model``
    (an :class:`~oftmerge.formats.OftAdapter`) or a ``config`` mapping (a ``MergeResult``).
    """
    names = set()
    for a in adapters:
        name: Any
        if hasattr(a, "base_model"):
            name = a.base_model
        elif isinstance(getattr(a, "config", None), Mapping):
            name = a.config.get("base_model_name_or_path")
        else:
            path = a.path if isinstance(a, ResolvedSource) else Path(a)
            config = path / "adapter_config.json" if path.is_dir() else path.parent / "adapter_config.json"
            try:
                name = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                name = None
        names.add(name if isinstance(name, str) and name else None)
    return names.pop() if len(names) == 1 else None
