"""Upload to the Hugging Face Hub through ``huggingface_hub`` (model cards: :mod:`oftmerge.integrations.cards`).

:func:`push_folder` uploads a directory: one ``HfApi.create_commit`` with every file (after
``create_repo(..., exist_ok=True)``). ``dry_run=True`` only lists what would be uploaded
(:class:`PushPlan`: repo id, files, sizes) and touches no network. A push that fails (offline,
no network, no login, no write access) raises :class:`~oftmerge.errors.HubError`, one line.

>>> plan = push_folder("folded", "me/my-model", dry_run=True)  # doctest: +SKIP
>>> print(plan.describe())                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oftmerge._version import __version__
from oftmerge.errors import HubError, OftMergeError
from oftmerge.formats.sources import _offline

__all__ = ["PushPlan", "hub_progress_bars", "push_folder"]


@dataclass(frozen=True)
class PushPlan:
    """What :func:`push_folder` uploads: the repository and every file with its size."""

    repo_id: str
    folder: Path
    files: tuple[tuple[str, int], ...]  #: (path in the repo, bytes), sorted
    private: bool
    revision: str | None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        lines = [
            f"push {self.folder} -> https://huggingface.co/{self.repo_id}"
            + (f" (revision {self.revision})" if self.revision else "")
            + (" [private]" if self.private else ""),
        ]
        lines += [f"  {size:>14,d}  {name}" for name, size in self.files]
        lines.append(f"  {self.total_bytes:>14,d}  bytes in {len(self.files)} files")
        return "\n".join(lines)


def _plan_push(folder: Path, repo_id: str, private: bool, revision: str | None) -> PushPlan:
    if not folder.is_dir():
        raise OftMergeError(f"{folder}: not a directory; push the directory that fold/merge wrote")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise OftMergeError(f"repo id {repo_id!r}: expected NAMESPACE/NAME, e.g. my-user/my-model")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache, temporary directories
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(root) / name
                files.append((path.relative_to(folder).as_posix(), path.stat().st_size))
    if not files:
        raise OftMergeError(f"{folder}: nothing to upload")
    return PushPlan(repo_id, folder, tuple(sorted(files)), private, revision)


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    progress: bool | None = None,
) -> Any:
    """Upload ``folder`` to Hub repository ``repo_id`` (created if missing); return the ``CommitInfo``.

    Hidden files and directories are not uploaded. With ``dry_run`` nothing is
    sent: the :class:`PushPlan` (files and sizes) is returned instead. ``progress=False`` hides
    ``huggingface_hub``'s upload bars (bytes, ETA) for this push; by default its own setting
    decides (``HF_HUB_DISABLE_PROGRESS_BARS``).
    """
    plan = _plan_push(Path(folder), repo_id, private, revision)
    if dry_run:
        return plan
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:
        raise OftMergeError("pushing needs huggingface_hub: pip install 'oftmerge[hub]'") from None
    where = f"cannot push {plan.folder} to https://huggingface.co/{repo_id}"
    if _offline():  # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment now decides
        raise HubError(f"{where}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE and run again with network access")
    try:
        with hub_progress_bars(progress is not False):
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.folder / name)) for name, _ in plan.files]
            return api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload {plan.folder.name} with oftmerge {__version__}",
                revision=revision,
                repo_type="model",
            )
    except Exception as exc:  # offline, no network, no login, no permission: one line (HubError), not huggingface_hub's traceback
        raise HubError(f"{where}: {_push_failure(exc)}") from exc


@contextlib.contextmanager
def hub_progress_bars(shown: bool) -> Iterator[None]:
    """``huggingface_hub``'s progress bars hidden inside the block unless ``shown``, its setting restored after.

    Bars are never turned on (the user's ``HF_HUB_DISABLE_PROGRESS_BARS=1`` wins); without
    ``huggingface_hub`` nothing changes.
    """
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:
        shown = True
    if shown or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _push_failure(exc: Exception) -> str:
    """What went wrong in a push, and what to do about it."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    name = type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if name == "OfflineModeIsEnabled":
        return "offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE and run again with network access"
    if status == 401 or name == "LocalTokenNotFoundError":
        return f"not logged in, or the token is not valid ({first}); run `hf auth login` or set HF_TOKEN to a token with write access"
    if status == 403:
        return f"no write access ({first}); use a token with write access to that namespace (HF_TOKEN, `hf auth login`)"
    if isinstance(status, int):
        return f"the Hub answered HTTP {status} ({first}); run again later, or check the repository id and revision"
    from huggingface_hub import constants

    return f"the Hub at {constants.ENDPOINT} could not be reached ({name}: {first}); check the network connection (and HF_ENDPOINT) and run again"
