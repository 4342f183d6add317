"""Scale ``merge``, ``fold`` and ``decouple`` out over several processes launched by ``accelerate``.

Run the usual commands under ``accelerate launch`` and the work is split between
the processes; the output is the same bytes as a single-process run::

    accelerate launch --num_processes 2 -m oftmerge merge A B C D E -o merged
    accelerate launch --num_processes 8 -m oftmerge fold ADAPTER --base BASE -o OUT --shard-size 2GB
    accelerate launch --num_processes 4 -m oftmerge decouple --base BASE A B C -o OUT --shard-size 500MB --threads 1

* :func:`current` returns a :class:`Group` when the process was started by a
  launcher with ``WORLD_SIZE`` > 1 (``accelerate launch``, ``torchrun``), else
  ``None`` and nothing changes. The process group is
  ``accelerate.PartialState``'s (gloo on CPU, NCCL on GPUs); objects are
  exchanged over a gloo group in any case, since they live on the CPU.
* Work is planned before it is split: every process builds the same plan from
  the same inputs (the merge's module list, :func:`~oftmerge.formats.shards.plan_model`'s
  shards) and takes its share with :func:`Group.share`, a deterministic
  greedy balance by cost.
* Merge: each process merges its modules; the results are gathered to every
  process and put back in plan order; only the main process writes the one
  ``adapter_model.safetensors`` PEFT needs.
* Fold: :func:`write_model` — the main process creates the temporary output
  directory, each process writes its whole shards into it under their final
  names, the main process writes the index, config and other files, fsyncs and
  renames the directory into place. The others wait for it, so every process
  returns only once the output exists (or every process raises).
* Decouple: the same, with shards balanced by the cost of their solves, and the
  per-tensor reports gathered (``after_shards``) before the main process writes
  ``oftmerge.json``.

A failure in any process is reported to all of them (:meth:`Group.check`), so
none is left waiting at a barrier and the temporary directory is removed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from oftmerge.errors import OftMergeError

__all__ = ["DistributedError", "Group", "current", "on_main", "write_model"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(OftMergeError):
    """Another process of a distributed run failed; its message is included."""


class Group:
    """The processes of one launched run: rank, size, and the few collectives oftmerge needs."""

    def __init__(self, rank: int, size: int, object_group: Any):
        self.rank = rank
        self.size = size
        self._group = object_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, costs: Sequence[float]) -> list[int]:
        """Indices of the items this process handles: a deterministic greedy balance of ``costs``.

        Items are taken largest first (ties by index) and given to the least
        loaded process (ties by rank); the returned indices are in item order.
        """
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += max(float(costs[i]), 1.0)
        return [i for i, r in enumerate(owner) if r == self.rank]

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order, on every process (pickled over gloo)."""
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast(self, obj: T | None) -> T:
        """The main process's ``obj`` on every process."""
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self._group)
        return box[0]  # type: ignore[return-value]

    def check(self, error: BaseException | None) -> None:
        """Exchange failures: raise here if this or any other process failed (all processes must call it)."""
        text = None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip()
        failed = [(r, t) for r, t in enumerate(self.gather(text)) if t is not None]
        if error is not None:
            raise error
        if failed:
            r, t = failed[0]
            raise DistributedError(f"process {r} of {self.size} failed: {t}")

    @contextmanager
    def checked(self) -> Iterator[None]:
        """Run a block; afterwards every process learns whether any of them failed in it."""
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - re-raised by check
            self.check(exc)
        else:
            self.check(None)


@functools.cache
def _group(rank: int, size: int) -> Group:
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes != size or state.process_index != rank:  # pragma: no cover - launcher mismatch
        raise OftMergeError(f"accelerate reports process {state.process_index} of {state.num_processes}, the environment {rank} of {size}")
    backend = torch.distributed.get_backend()
    objects = None if backend == "gloo" else torch.distributed.new_group(backend="gloo")
    log.info("distributed: process %d of %d (%s)", rank, size, backend)
    return Group(rank, size, objects)


def current() -> Group | None:
    """The :class:`Group` of this run when launched with ``WORLD_SIZE`` > 1, else None (a plain single process)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    if size <= 1:
        return None
    return _group(rank, size)


def is_main() -> bool:
    """Whether this process speaks for the run: a single process, or rank 0 of a launched one (logs, reports, pushes)."""
    group = current()
    return group is None or group.is_main


# -- fold: shards written by several processes ---------------------------------------------------


def write_model(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tensor_fn: Callable[[str, torch.Tensor], torch.Tensor | None],
    *,
    group: Group,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    extra_files: Mapping[str, bytes | str] | None = None,
    only: Callable[[str], bool] | None = None,
    untie: tuple[str, str] | None = None,
    config_updates: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cost: Callable[[str, tuple[int, ...]], float] | None = None,
    after_shards: Callable[[], None] | None = None,
) -> Path:
    """:func:`oftmerge.formats.shards.write_model`, each process writing its share of the shards; same bytes.

    Shards are balanced by the work ``tensor_fn`` must do (``cost(name, shape)`` of the tensors
    ``only`` selects; default: their bytes), then by all bytes. With fewer shards than processes
    some processes idle: choose ``shard_size`` so that there are at least as many shards as
    processes. ``after_shards()`` runs on every process once all shards are written and before the
    main process writes ``extra_files`` (a collective there, e.g. gathering per-tensor reports that
    go into those files, sees every process). ``progress`` counts this process's tensors.
    """
    from oftmerge.formats import shards as sh
    from oftmerge.formats.checkpoint import Checkpoint
    from oftmerge.formats.io import atomic_directory

    base_dir = Path(base_dir)
    ckpt = Checkpoint(base_dir)
    out = Path(out_dir).absolute()
    if out == base_dir.absolute() or base_dir.absolute().is_relative_to(out):
        raise OftMergeError(f"{out}: the output would replace the base model {base_dir}; choose another output directory")
    wanted: Callable[[str], bool] = only or (lambda name: True)
    plan = sh.plan_model(ckpt, shard_size, untie=untie)
    count = len(plan)
    names = [sh.SINGLE_FILE] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    work = (lambda e: float(e.nbytes)) if cost is None else (lambda e: float(cost(e.name, tuple(e.shape))))
    costs = [sum(work(e) for e in s if wanted(e.name)) * 1e3 + sum(e.nbytes for e in s) for s in plan]
    mine = group.share(costs)
    updates = dict(config_updates or {})
    if untie is not None:
        updates["tie_word_embeddings"] = False

    def write_mine(tmp: Path) -> None:
        for k in mine:
            part = tmp / f".rank-{group.rank}-shard-{k + 1:05d}"
            part.mkdir()
            # one planned shard alone is cut exactly as in the whole layout, so its header and bytes are the same
            sh._write_tensors(ckpt, part, plan[k], tensor_fn, wanted, untie, shard_size, metadata, progress)
            os.replace(part / sh.SINGLE_FILE, tmp / names[k])
            part.rmdir()

    # Three collectives, in this order on every process: (A) the main process broadcasts the temporary
    # directory (or its error), (B) every process reports whether it wrote its shards, (C) the main process
    # reports whether it renamed the output into place. A failure at A or B stops every process there.
    if not group.is_main:
        tmp_name, error = group.broadcast(None)
        if tmp_name is None:
            raise DistributedError(f"process 0 of {group.size} failed: {error}")
        with group.checked():  # B
            write_mine(Path(tmp_name))
        if after_shards is not None:
            after_shards()
        group.check(None)  # C: returns once the output exists
        return out

    pending = "A"  # the collective the other processes are waiting for
    marker: Path | None = None
    try:
        sh._remove_stale_partials(out)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            marker = sh._marker(tmp)
            marker.write_text(str(os.getpid()))
            group.broadcast((str(tmp), None))
            pending = "B"
            error: BaseException | None = None
            try:
                write_mine(tmp)
            except BaseException as exc:  # noqa: BLE001 - reported to every process, then re-raised
                error = exc
            pending = None
            group.check(error)
            if after_shards is not None:
                after_shards()
            pending = "C"
            if count > 1:
                weight_map = {e.name: names[k] for k, s in enumerate(plan) for e in s}
                index = {
                    "metadata": {
                        "total_parameters": sum(e.numel for s in plan for e in s),
                        "total_size": sum(e.nbytes for s in plan for e in s),
                    },
                    "weight_map": dict(sorted(weight_map.items())),
                }
                (tmp / sh.INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            sh._copy_small_files(base_dir, tmp, updates)
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    except BaseException as exc:
        if marker is not None:
            marker.unlink(missing_ok=True)
        if pending == "A":
            group.broadcast((None, "".join(traceback.format_exception_only(type(exc), exc)).strip()))
        elif pending == "C":
            group.check(exc)
        raise
    marker.unlink(missing_ok=True)
    group.check(None)  # C: the output is in place
    return out


def on_main(group: Group | None, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only (all of it when ``group`` is None); the others wait for it.

    Every process returns once ``fn`` finished, or raises if it failed (used
    to write an output that must exist once, e.g. the merged adapter).
    """
    if group is None:
        return fn()
    if not group.is_main:
        group.check(None)
        return None
    try:
        value = fn()
    except BaseException as exc:
        group.check(exc)
        raise
    group.check(None)
    return value
