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
* Fold: :func:`oftmerge.engine.model.write_model` — the main process creates the temporary output
  directory, each process writes its whole shards into it under their final
  names, the main process writes the index, config and other files, fsyncs and
  renames the directory into place. The others wait for it, so every process
  returns only once the output exists (or every process raises). A single
  process runs the same code with :data:`LOCAL`, a group of one.
* Decouple: the same, with shards balanced by the cost of their solves, and the
  per-tensor reports gathered (``after_shards``) before the main process writes
  ``oftmerge.json``.

A failure in any process is reported to all of them (:meth:`Group.check`), so
none is left waiting at a barrier and the temporary directory is removed.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from oftmerge.errors import OftMergeError

__all__ = ["LOCAL", "DistributedError", "Group", "LocalGroup", "current", "is_main", "process_group"]

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

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on the main process only; the others wait for it.

        Every process returns once ``fn`` finished, or raises if it failed (used to write an
        output that must exist once, e.g. the merged adapter).
        """
        if not self.is_main:
            self.check(None)
            return None
        try:
            value = fn()
        except BaseException as exc:
            self.check(exc)
            raise
        self.check(None)
        return value

    @contextmanager
    def checked(self) -> Iterator[None]:
        """Run a block; afterwards every process learns whether any of them failed in it."""
        try:
            yield
        except BaseException as exc:  # noqa: BLE001 - re-raised by check
            self.check(exc)
        else:
            self.check(None)


class LocalGroup(Group):
    """A single process: it does all the work and is the main process; the collectives are trivial."""

    def __init__(self) -> None:
        super().__init__(0, 1, None)

    def gather(self, obj: T) -> list[T]:
        return [obj]

    def broadcast(self, obj: T | None) -> T:
        return obj  # type: ignore[return-value]

    def check(self, error: BaseException | None) -> None:
        if error is not None:
            raise error


#: The group of a run that was not launched with several processes.
LOCAL = LocalGroup()


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


def process_group() -> Group:
    """:func:`current`, or :data:`LOCAL` for a plain single process: the streaming engine runs one code path."""
    return current() or LOCAL


def is_main() -> bool:
    """Whether this process speaks for the run: a single process, or rank 0 of a launched one (logs, reports, pushes)."""
    group = current()
    return group is None or group.is_main
