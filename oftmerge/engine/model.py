"""The streaming model writer: a copy of a base model directory with chosen tensors passed through a function.

One code path for one process and for several (``accelerate launch``): the process group
(:func:`oftmerge.engine.distributed.process_group`; a group of one for a plain run) only decides
which shards a process writes, and the main process finalises::

    from oftmerge.engine.model import write_model

    def tensor_fn(name, tensor):             # called once per selected tensor, in the checkpoint's order
        return tensor * 2

    write_model("base-model", "out-model", tensor_fn, shard_size="2GB",
                only=lambda name: name.endswith("mlp.down_proj.weight"))

* Every tensor of the base (:class:`~oftmerge.formats.checkpoint.Checkpoint`: one file,
  sharded, or ``.bin``) is written in the base's order (shard by shard, in file order),
  cut into shards by :func:`~oftmerge.formats.shards.plan_model`, in files named as the base's
  (``model*.safetensors``, or ``diffusion_pytorch_model*.safetensors`` for a ``diffusers`` model). ``tensor_fn`` must return a
  tensor of the same shape and dtype (the shard headers are planned from the base); ``None``
  keeps the tensor as it is.
* ``only`` (a predicate on names, or a collection of names) says which tensors ``tensor_fn``
  needs to see, and ``tensor_fn`` sees no other; every other tensor is copied byte for byte from
  the base's safetensors files, never decoded (from a ``.bin`` base, which has no byte ranges to
  copy, it is read and written unchanged).
* ``tensor_fn`` runs in the calling thread, once per tensor, in order; a reader thread loads the
  next two tensors meanwhile and a writer thread writes the previous result, so memory holds a
  few tensors, never a shard.
* Non-weight files of the base (config, generation config, tokenizer files, ...) are copied
  (:func:`~oftmerge.formats.shards.copy_model_files`); ``extra_files`` (name -> bytes or str)
  are written last and win; they are read only then, so a mapping may render them late.
* Tied embeddings: a caller that changes only one side of a tied pair passes
  ``untie=(source, target)``: ``target`` is added (after the base's tensors) as
  ``tensor_fn(target, <source as stored in the base>)`` and ``tie_word_embeddings`` is set to
  false in ``config.json``. (When the base stores both, pass
  ``config_updates={"tie_word_embeddings": False}`` instead.)
* The output goes through :func:`oftmerge.engine.commit.output_directory`: guarded against
  replacing the base or another input, atomic, cleaned up after a killed run.
* Several processes: shards are balanced by the work ``tensor_fn`` must do (``cost(name,
  shape)`` of the selected tensors; default their bytes), then by all bytes. The main process
  creates the temporary directory, each process writes its whole shards into it under their
  final names, ``after_shards()`` runs on every process (a collective there sees them all), the
  main process writes the index and the other files and commits; every process returns once the
  output exists, or every process raises.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from oftmerge.engine.commit import Inputs, output_directory
from oftmerge.engine.distributed import DistributedError, Group, process_group
from oftmerge.engine.guard import check_nonempty, check_output, check_replaceable
from oftmerge.engine.threads import Prefetch
from oftmerge.errors import OftMergeError
from oftmerge.formats.checkpoint import Checkpoint, RawTensor
from oftmerge.formats.shards import (
    ShardedWriter,
    TensorInfo,
    copy_model_files,
    plan_model,
    shard_index,
    shard_names,
    write_index,
)

__all__ = ["report_progress", "write_model"]

#: tensors read ahead of the one being computed
READ_AHEAD = 2
#: shards are flushed to disk (fdatasync) every this many bytes, in the writer thread, so that the
#: final fsync of the commit has little left to do
SYNC_EVERY = 256 * 2**20

TensorFn = Callable[[str, torch.Tensor], "torch.Tensor | None"]
Progress = Callable[[int, int, str], None]


def report_progress(progress: Callable[..., None] | None) -> Callable[[int, int, str, int | None], None] | None:
    """``progress`` as ``report(done, total, name, nbytes)``: ``nbytes`` (the bytes of the module or tensor just done,
    or None) is passed on as a keyword only to a callback that takes one (``nbytes=None`` or ``**kwargs``), so a plain
    ``progress(done, total, name)`` keeps working.

    >>> seen = []
    >>> report_progress(lambda done, total, name: seen.append((done, total, name)))(1, 2, "a", 64)
    >>> report_progress(lambda done, total, name, nbytes=None: seen.append(nbytes))(2, 2, "b", 64)
    >>> seen
    [(1, 2, 'a'), 64]
    """
    if progress is None:
        return None
    try:
        params = inspect.signature(progress).parameters.values()
        takes = any(p.name == "nbytes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):  # a builtin or extension callable without a signature
        takes = False
    if takes:
        return lambda done, total, name, nbytes: progress(done, total, name, nbytes=nbytes)
    return lambda done, total, name, nbytes: progress(done, total, name)


def write_model(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tensor_fn: TensorFn,
    *,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    extra_files: Mapping[str, bytes | str] | None = None,
    only: Callable[[str], bool] | Collection[str] | None = None,
    untie: tuple[str, str] | None = None,
    config_updates: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    cost: Callable[[str, tuple[int, ...]], float] | None = None,
    after_shards: Callable[[], None] | None = None,
    inputs: Inputs = (),
    group: Group | None = None,
    replace: Mapping[str, torch.Tensor] | None = None,
    drop: Collection[str] = (),
) -> Path:
    """Write a copy of model directory ``base_dir`` to ``out_dir`` (see the module docstring); returns ``out_dir``.

    ``replace`` maps tensor names to tensors written as they are instead of the base's, with
    their own shape and dtype (``tensor_fn`` is not called for them); names the base does not
    store are added (a classification head the base lacks); ``drop`` names base tensors left out.

    ``inputs`` are the run's other inputs (``(role, path)``) the output must not replace; the base
    always is one. ``metadata`` is added to every shard's header; ``progress(done, total, name)``
    counts this process's tensors (with ``nbytes=`` the tensor's bytes when it takes that keyword:
    :func:`report_progress`).
    """
    group = group or process_group()
    base_dir = Path(base_dir)
    ckpt = Checkpoint(base_dir)
    out = Path(check_nonempty(out_dir)).absolute()
    guarded = [("the base model", base_dir), *inputs]
    wanted: Callable[[str], bool]
    if only is None:
        wanted = lambda name: True  # noqa: E731
    else:
        wanted = only if callable(only) else set(only).__contains__
    replace = dict(replace or {})
    plan = plan_model(ckpt, shard_size, untie=untie, replace=replace, drop=drop)
    stem = ckpt.weights_stem  # a diffusers model keeps its file names (diffusion_pytorch_model*.safetensors)
    names = shard_names(len(plan), stem)
    work = (lambda e: float(e.nbytes)) if cost is None else (lambda e: float(cost(e.name, tuple(e.shape))))
    mine = group.share([sum(work(e) for e in s if wanted(e.name)) * 1e3 + sum(e.nbytes for e in s) for s in plan])
    updates = dict(config_updates or {})
    if untie is not None:
        updates["tie_word_embeddings"] = False
    counted = _Counted(progress, sum(len(plan[k]) for k in mine))

    def write_mine(tmp: Path) -> None:
        for k in mine:
            part = tmp / f".rank-{group.rank}-shard-{k + 1:05d}"
            part.mkdir()
            # one planned shard alone is cut exactly as in the whole layout, so its header and bytes are the same
            _stream_tensors(ckpt, part, plan[k], tensor_fn, wanted, untie, shard_size, metadata, counted, replace)
            os.replace(part / shard_names(1, stem)[0], tmp / names[k])
            part.rmdir()

    def finish(tmp: Path) -> None:
        if len(plan) > 1:
            write_index(tmp, shard_index(plan, stem), stem)
        copy_model_files(base_dir, tmp, updates)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    if not group.is_main:
        _write_share(group, write_mine, after_shards)
        return out
    _write_and_commit(group, out, overwrite, guarded, write_mine, after_shards, finish)
    return out


def _write_share(group: Group, write_mine: Callable[[Path], None], after_shards: Callable[[], None] | None) -> None:
    """A process other than the main one: write this process's shards into the main process's directory."""
    received: tuple[str | None, str | None] = group.broadcast(None)  # A
    tmp_name, error = received
    if tmp_name is None:
        raise DistributedError(f"process 0 of {group.size} failed: {error}")
    with group.checked():  # B
        write_mine(Path(tmp_name))
    if after_shards is not None:
        after_shards()
    group.check(None)  # C: returns once the output exists


def _write_and_commit(
    group: Group,
    out: Path,
    overwrite: bool,
    guarded: Inputs,
    write_mine: Callable[[Path], None],
    after_shards: Callable[[], None] | None,
    finish: Callable[[Path], None],
) -> None:
    """The main process: create the directory, write its shards, finalise and commit.

    Three collectives, in this order on every process: (A) the main process broadcasts the
    temporary directory (or its error), (B) every process reports whether it wrote its shards,
    (C) the main process reports whether it committed the output. A failure at A or B stops
    every process there. With a group of one they are no-ops.
    """
    pending: str | None = "A"  # the collective the other processes are waiting for
    try:
        if overwrite:  # only an earlier output is replaced, never someone's data
            check_replaceable(check_output(out, guarded))
        with output_directory(out, overwrite=overwrite, inputs=guarded) as tmp:
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
            finish(tmp)
    except BaseException as exc:
        if pending == "A":
            group.broadcast((None, "".join(traceback.format_exception_only(type(exc), exc)).strip()))
        elif pending == "C":
            group.check(exc)
        raise
    group.check(None)  # C: the output is in place


class _Counted:
    """``progress`` over all of this process's tensors, across its shards."""

    def __init__(self, progress: Progress | None, total: int):
        self._progress, self.total, self.done = report_progress(progress), total, 0

    def __call__(self, name: str, nbytes: int) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress(self.done, self.total, name, nbytes)


def _stream_tensors(
    ckpt: Checkpoint,
    tmp: Path,
    layout: list[TensorInfo],
    tensor_fn: TensorFn,
    wanted: Callable[[str], bool],
    untie: tuple[str, str] | None,
    shard_size: int | str,
    metadata: Mapping[str, str] | None,
    progress: Callable[[str, int], None],
    replace: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Stream every tensor of ``layout`` into shards in ``tmp`` (``replace``: tensors written instead of the base's).

    Three stages overlap: a reader thread loads the next tensors (at most :data:`READ_AHEAD`),
    this thread runs ``tensor_fn``, a writer thread writes the previous result (one at a time, in
    order). File I/O and torch release the GIL, so reading, computing and writing proceed together
    while memory holds a few tensors, not a shard.
    """
    writer = ShardedWriter(tmp, max_shard_bytes=shard_size, metadata=metadata, layout=layout, sync_every=SYNC_EVERY, stem=ckpt.weights_stem)

    replace = replace or {}

    def load(info: TensorInfo) -> tuple[RawTensor | None, torch.Tensor | None]:
        if info.name in replace:
            return None, replace[info.name]
        src = untie[0] if untie is not None and info.name == untie[1] else info.name
        raw = ckpt.raw(src)
        return raw, (ckpt.read(src) if wanted(info.name) or raw is None else None)

    def store(info: TensorInfo, raw: RawTensor | None, new: torch.Tensor | None) -> None:
        if new is None:
            writer.add_raw(info.name, raw)  # type: ignore[arg-type]
        else:
            writer.add(info.name, new)

    try:
        with Prefetch(load, layout, ahead=READ_AHEAD) as reads, ThreadPoolExecutor(1, "oftmerge-write") as writes:
            writing: Future[None] | None = None
            for info, (raw, tensor) in reads:
                if tensor is None:  # copied as raw bytes
                    new = None
                elif info.name in replace:
                    new = tensor
                elif wanted(info.name):
                    new = _apply(tensor_fn, info, raw, tensor)
                else:  # a .bin base has no byte ranges to copy: its tensors are read, and written unchanged
                    new = tensor
                del tensor
                if writing is not None:
                    writing.result()  # one write in flight; re-raises its error
                writing = writes.submit(store, info, raw, new)
                del new
                progress(info.name, info.nbytes)
            if writing is not None:
                writing.result()
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _apply(tensor_fn: TensorFn, info: TensorInfo, raw: RawTensor | None, tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor_fn``'s result for one tensor, checked against the planned header (None: copy it raw)."""
    new = tensor_fn(info.name, tensor)
    if new is not None and (tuple(new.shape) != info.shape or new.dtype != tensor.dtype):
        raise OftMergeError(
            f"tensor_fn changed {info.name!r} from {tensor.dtype} {list(info.shape)} to {new.dtype} "
            f"{list(new.shape)}; write_model keeps shapes and dtypes (use ShardedWriter directly otherwise)"
        )
    return tensor if new is None and raw is None else new
