"""The ``transformers`` checkpoint layout: sharded safetensors, the index, tied embeddings, copied files (``diffusers``' too).

:class:`ShardedWriter` writes tensors into a directory, one at a time, deterministically (the same
tensors in the same order give the same bytes)::

    from oftmerge.engine.commit import output_directory
    from oftmerge.formats.shards import ShardedWriter

    with output_directory("out") as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes="2GB")
        for name, tensor in tensors():       # any iterable, any order you like
            writer.add(name, tensor)         # buffered; a shard is written when the next tensor would not fit
        index = writer.close()               # last shard, names, model.safetensors.index.json

* Shards are ``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json``
  (``{"metadata": {"total_size", "total_parameters"}, "weight_map": {...}}``), or a single
  ``model.safetensors`` and no index when everything fits in one shard. Shards are written
  under temporary names (``.shard-00001.tmp``) and renamed by :meth:`~ShardedWriter.close`,
  which is when the count is known. ``stem="diffusion_pytorch_model"`` gives ``diffusers``' names
  (``diffusion_pytorch_model-00001-of-0000N.safetensors``, ``diffusion_pytorch_model.safetensors.index.json``).
* A shard is cut *before* a tensor that would take it past ``max_shard_bytes``
  (tensor bytes only, headers not counted, as in ``transformers``); a tensor
  larger than the limit gets a shard of its own.
* File metadata is ``{"format": "pt"}`` (pass ``metadata=`` to add keys).
* :meth:`~ShardedWriter.add_raw` copies a tensor's bytes from another
  safetensors file (a :class:`~oftmerge.formats.checkpoint.RawTensor`) without
  reading them into Python: no decode, no dtype round trip, no memory.
* Memory: by default a shard's tensors are held until the shard is written
  (raw entries cost nothing). If the names, dtypes and shapes are known
  beforehand, pass them as ``layout=`` and every tensor goes to disk as soon
  as it is added (only one tensor is in memory); ``add`` must then follow
  ``layout``'s order. Both modes write the same bytes.

:func:`plan_model` gives the shards a copy of a base model is cut into (names, dtypes, shapes),
:func:`tied_embeddings` the tied input/output embedding pair (:func:`tie_groups` every group of tied
weights, from ``transformers``' own tie information), :func:`copy_model_files` copies the
non-weight files (config, tokenizer, ...). The streaming model writer built on them is
:func:`oftmerge.engine.model.write_model`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from oftmerge.errors import OftMergeError
from oftmerge.formats.checkpoint import Checkpoint, RawTensor, read_model_config
from oftmerge.formats.names import is_diffusers_config, meta_model

__all__ = [
    "MAX_COPIED_FILE_BYTES",
    "ShardedWriter",
    "TensorInfo",
    "copy_model_files",
    "is_weight_file",
    "parse_size",
    "plan_model",
    "shard_index",
    "shard_names",
    "tie_groups",
    "tied_embeddings",
    "tied_shapes",
    "write_index",
]

log = logging.getLogger(__name__)

#: Non-weight files of a base directory larger than this are not copied (a warning says so).
MAX_COPIED_FILE_BYTES = 256 * 2**20

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_WEIGHT_INDEXES = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "tf_model.h5.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_COPY_CHUNK = 64 * 2**20


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or ``"5GB"`` / ``"500MB"`` / ``"2GiB"`` (as ``transformers``' ``max_shard_size``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip()
        units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        unit = next((u for u in units if text.upper().endswith(u)), "")
        number, factor = (text[: -len(unit)].strip(), units[unit]) if unit else (text, 1)
        try:
            value = int(float(number) * factor)
        except ValueError:
            raise OftMergeError(f"shard size {size!r}: expected bytes or a number with a unit, e.g. 5GB, 500MB, 2GiB") from None
    if value <= 0:
        raise OftMergeError(f"shard size {size!r}: must be positive")
    return value


@dataclass(frozen=True)
class TensorInfo:
    """Name, safetensors dtype name and shape of a tensor to be written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _ITEM_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _dtype_name(tensor: torch.Tensor, name: str) -> str:
    try:
        return _DTYPE_NAMES[tensor.dtype]
    except KeyError:
        raise OftMergeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be written to safetensors by oftmerge") from None


def _info(name: str, tensor: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, _dtype_name(tensor, name), tuple(tensor.shape))


def _header_bytes(entries: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    """The safetensors header (length prefix + JSON padded with spaces to 8 bytes), data in ``entries`` order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on 3.12+


def _copy_raw(f: BinaryIO, raw: RawTensor) -> None:
    """Copy ``raw``'s bytes into ``f`` at its position, in the kernel where possible."""
    f.flush()
    remaining, src_off = raw.nbytes, raw.offset
    with open(raw.path, "rb", buffering=0) as src:
        if hasattr(os, "copy_file_range"):
            dst_off = f.tell()
            try:
                while remaining:
                    n = os.copy_file_range(src.fileno(), f.fileno(), min(remaining, 2**30), src_off, dst_off)
                    if n == 0:
                        break
                    remaining, src_off, dst_off = remaining - n, src_off + n, dst_off + n
                f.seek(dst_off)
            except OSError:  # e.g. across file systems on old kernels: fall back to read/write
                f.seek(dst_off)
        src.seek(src_off)
        while remaining:
            chunk = src.read(min(remaining, _COPY_CHUNK))
            if not chunk:
                raise OftMergeError(f"{raw.path}: file ends inside a tensor; it is truncated")
            f.write(chunk)
            remaining -= len(chunk)



def shard_names(count: int, stem: str = "model") -> list[str]:
    """File names of ``count`` shards: ``model.safetensors`` alone, else ``model-0000k-of-0000N.safetensors``.

    ``stem`` is ``model`` for ``transformers``, ``diffusion_pytorch_model`` for ``diffusers`` (same pattern).
    """
    return [f"{stem}.safetensors"] if count == 1 else [f"{stem}-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def shard_index(shards: Sequence[Sequence[TensorInfo]], stem: str = "model") -> dict[str, Any]:
    """The ``model.safetensors.index.json`` content of these shards (``transformers``' layout, also ``diffusers``')."""
    names = shard_names(len(shards), stem)
    weight_map = {e.name: names[k] for k, shard in enumerate(shards) for e in shard}
    return {
        "metadata": {
            "total_parameters": sum(e.numel for s in shards for e in s),
            "total_size": sum(e.nbytes for s in shards for e in s),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }


def write_index(directory: Path, index: Mapping[str, Any], stem: str = "model") -> None:
    with open(directory / f"{stem}.safetensors.index.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _split(entries: Iterable[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Cut ``entries`` into shards: a new shard starts when the next tensor would not fit."""
    shards: list[list[TensorInfo]] = []
    size = 0
    for e in entries:
        if not shards or (shards[-1] and size + e.nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class ShardedWriter:
    """Write tensors into ``directory`` as transformers-style sharded safetensors (see the module docstring).

    Args:
        directory: an existing directory, normally the temporary one of
            :func:`~oftmerge.engine.commit.output_directory`.
        max_shard_bytes: bytes per shard, or ``"5GB"``-style text.
        metadata: extra string metadata for every shard (``format: pt`` is always set).
        layout: the tensors (:class:`TensorInfo`) that will be added, in order;
            with it, nothing is buffered.
        sync_every: in planned mode, flush a shard to disk (``fdatasync``)
            each time this many bytes were written to it.
        stem: the files' stem: ``model`` (``transformers``), ``diffusion_pytorch_model`` (``diffusers``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_shard_bytes: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        layout: Sequence[TensorInfo] | None = None,
        sync_every: int | None = None,
        stem: str = "model",
    ):
        self.directory = Path(directory)
        self.stem = stem
        self.sync_every = sync_every
        self._unsynced = 0
        if not self.directory.is_dir():
            raise OftMergeError(f"{self.directory}: output directory does not exist")
        self.max_shard_bytes = parse_size(max_shard_bytes)
        self.metadata = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        self._names: set[str] = set()
        self._done: list[list[TensorInfo]] = []  # written shards
        self._pending: list[tuple[TensorInfo, torch.Tensor | RawTensor]] = []
        self._pending_bytes = 0
        self._closed = False
        self._plan: list[list[TensorInfo]] | None = None
        self._file: BinaryIO | None = None
        self._next = 0  # planned mode: position in the current planned shard
        if layout is not None:
            layout = list(layout)
            dup = _first_duplicate(e.name for e in layout)
            if dup is not None:
                raise OftMergeError(f"layout names tensor {dup!r} twice")
            self._plan = _split(layout, self.max_shard_bytes)

    # -- adding ----------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (written now in planned mode, else when its shard is full or at close)."""
        self._accept(_info(name, tensor), tensor)

    def add_raw(self, name: str, raw: RawTensor) -> None:
        """Add tensor ``name`` by copying its bytes from a safetensors file (never decoded)."""
        if raw.dtype not in _ITEM_BYTES:
            raise OftMergeError(f"{raw.path}: tensor {name!r} has dtype {raw.dtype}, which oftmerge cannot copy")
        info = TensorInfo(name, raw.dtype, tuple(raw.shape))
        if info.nbytes != raw.nbytes:
            raise OftMergeError(f"{raw.path}: tensor {name!r} has {raw.nbytes} bytes, expected {info.nbytes} for {raw.dtype} {raw.shape}")
        self._accept(info, raw)

    def _accept(self, info: TensorInfo, payload: torch.Tensor | RawTensor) -> None:
        if self._closed:
            raise OftMergeError(f"tensor {info.name!r}: the writer is closed")
        if info.name in self._names:
            raise OftMergeError(f"tensor {info.name!r} added twice")
        self._names.add(info.name)
        if self._plan is not None:
            self._write_planned(info, payload)
            return
        if self._pending and self._pending_bytes + info.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((info, payload))
        self._pending_bytes += info.nbytes

    def _write_planned(self, info: TensorInfo, payload: torch.Tensor | RawTensor) -> None:
        assert self._plan is not None
        k = len(self._done)
        if k >= len(self._plan):
            raise OftMergeError(f"tensor {info.name!r} was not in the layout given to the writer")
        expected = self._plan[k][self._next]
        if info != expected:
            raise OftMergeError(
                f"tensor {info.name!r} ({info.dtype}, shape {list(info.shape)}) does not match the layout, which expects "
                f"{expected.name!r} ({expected.dtype}, shape {list(expected.shape)}) next"
            )
        if self._file is None:
            self._file = open(self._temp_name(k), "wb")
            self._file.write(_header_bytes(self._plan[k], self.metadata))
        _write_payload(self._file, payload)
        self._unsynced += info.nbytes
        if self.sync_every is not None and self._unsynced >= self.sync_every:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0
        self._next += 1
        if self._next == len(self._plan[k]):
            self._file.close()
            self._file = None
            self._done.append(self._plan[k])
            self._next = 0

    def _flush(self) -> None:
        entries = [info for info, _ in self._pending]
        with open(self._temp_name(len(self._done)), "wb") as f:
            f.write(_header_bytes(entries, self.metadata))
            for _, payload in self._pending:
                _write_payload(f, payload)
        self._done.append(entries)
        self._pending, self._pending_bytes = [], 0

    def _temp_name(self, k: int) -> Path:
        return self.directory / f".shard-{k + 1:05d}.tmp"

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> dict[str, Any]:
        """Write what is left, give the shards their final names, write the index; return the index.

        With a single shard the file is ``model.safetensors`` and no index
        file is written (the returned index still maps every tensor to it).
        """
        if self._closed:
            raise OftMergeError("the writer is already closed")
        if self._plan is not None:
            if len(self._done) != len(self._plan):
                k = len(self._done)
                missing = [e.name for e in self._plan[k][self._next :]] + [e.name for s in self._plan[k + 1 :] for e in s]
                raise OftMergeError(f"closing before every tensor of the layout was added: missing {missing[:3]} ({len(missing)} in all)")
        elif self._pending or not self._done:
            self._flush()
        self._closed = True
        names = shard_names(len(self._done), self.stem)
        for k, final in enumerate(names):
            os.replace(self._temp_name(k), self.directory / final)
        index = shard_index(self._done, self.stem)
        if len(names) > 1:
            write_index(self.directory, index, self.stem)
        return index

    def abort(self) -> None:
        """Close any open shard file and delete what this writer wrote (the directory stays)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for k in range(len(self._done) + 1):
            self._temp_name(k).unlink(missing_ok=True)
        self._pending = []
        self._closed = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()


def _write_payload(f: BinaryIO, payload: torch.Tensor | RawTensor) -> None:
    if isinstance(payload, RawTensor):
        _copy_raw(f, payload)
    else:
        _write_tensor(f, payload)


def _first_duplicate(names: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


# -- whole model directories ---------------------------------------------------------------------


def _config(base_dir: Path) -> dict[str, Any]:
    """The base's ``config.json`` ({} when it has none; refused when it is not a JSON object: :func:`read_model_config`)."""
    return read_model_config(base_dir) or {}


def _ties_embeddings(config: Mapping[str, Any]) -> bool:
    if not config or is_diffusers_config(config):  # no config.json, or a diffusers model's: not a transformers model, nothing to tie
        return False
    text = config.get("text_config")
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return True  # transformers' PretrainedConfig default


def tied_embeddings(base_dir: str | os.PathLike[str], checkpoint: Checkpoint | None = None) -> tuple[str, str] | None:
    """``(input embedding, output embedding)`` tensor names when the base's config ties them, else None.

    The output embedding is ``lm_head.weight`` (``transformers``' name for
    every causal LM head), whether the checkpoint stores it or not; the input
    embedding is the stored 2-D tensor named ``*embed_tokens.weight`` /
    ``*wte.weight`` / ``*word_embeddings.weight`` (or else any
    ``*embed*.weight``) with ``vocab_size`` rows. None also when that tensor
    cannot be told apart.
    """
    base_dir = Path(base_dir)
    ckpt = checkpoint or Checkpoint(base_dir)
    config = _config(base_dir)
    if not _ties_embeddings(config):
        return None
    keys = [k for k in ckpt.keys() if k != "lm_head.weight"]
    candidates = [k for k in keys if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
    candidates = candidates or [k for k in keys if "embed" in k and k.endswith(".weight") and len(ckpt.shape(k)) == 2]
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if vocab is not None:
        candidates = [k for k in candidates if ckpt.shape(k)[0] == vocab]
    return (candidates[0], "lm_head.weight") if len(candidates) == 1 else None


def _transformers_ties(base_dir: Path) -> Mapping[str, str] | None:
    """``transformers``' own ``{tied weight: weight it is tied to}`` for the base's model class, or None when it cannot say.

    The class named by ``config.json``'s ``architectures`` is built on the meta device (no memory,
    no weights) and its ``all_tied_weights_keys`` read: the ``_tied_weights_keys`` of the class and
    of its sub-models, expanded, empty when the config unties them (``tie_word_embeddings``).
    ``transformers`` < 5 has no such attribute; a class it does not know (custom code) gives None.
    """
    archs = _config(base_dir).get("architectures")
    if not isinstance(archs, list) or not archs:
        return None
    try:
        import transformers

        cls = next((getattr(transformers, a) for a in archs if isinstance(a, str) and hasattr(transformers, a)), None)
        if cls is None:
            return None
        ties = getattr(meta_model(cls, base_dir), "all_tied_weights_keys", None)  # the build the name map uses too
    except Exception as exc:  # any failure to build the class means transformers cannot tell us
        log.debug("%s: no tie information from transformers (%s: %s)", base_dir, type(exc).__name__, exc)
        return None
    return {str(k): str(v) for k, v in ties.items()} if isinstance(ties, Mapping) else None


def tie_groups(base_dir: str | os.PathLike[str], checkpoint: Checkpoint | None = None) -> tuple[tuple[str, ...], ...]:
    """The base's groups of tied weights, as ``transformers`` ties them when it loads the model: model tensor names.

    Each group is the weight the others are tied to, then the others, sorted. Read from
    ``transformers`` itself (see :func:`_transformers_ties`): Bart gives
    ``("model.shared.weight", "lm_head.weight", "model.decoder.embed_tokens.weight",
    "model.encoder.embed_tokens.weight")``, T5 the same around ``shared.weight``, a Llama with tied
    embeddings ``("model.embed_tokens.weight", "lm_head.weight")``. Where ``transformers`` cannot
    say, the pair of :func:`tied_embeddings`, if any.
    """
    base_dir = Path(base_dir)
    ties = _transformers_ties(base_dir)
    if ties is None:
        pair = tied_embeddings(base_dir, checkpoint)
        return () if pair is None else (pair,)
    groups: dict[str, set[str]] = {}
    for target, source in ties.items():
        groups.setdefault(source, set()).add(target)
    return tuple((source, *sorted(targets - {source})) for source, targets in sorted(groups.items()))


def tied_shapes(
    base_dir: str | os.PathLike[str], checkpoint: Checkpoint | None = None, *, groups: Sequence[Sequence[str]] | None = None
) -> dict[str, tuple[int, ...]]:
    """The base's weight shapes under the loaded model's names, tied weights the checkpoint leaves out included.

    :meth:`~oftmerge.formats.checkpoint.Checkpoint.model_shapes` plus, for every tied weight that is not
    stored (a tied ``lm_head.weight``, Bart's ``model.encoder.embed_tokens.weight``), the shape of the
    stored weight of its group (:func:`tie_groups`, or ``groups`` when given): the shapes the loaded
    model has, which an adapter is checked against.
    """
    ckpt = checkpoint or Checkpoint(Path(base_dir))
    shapes = ckpt.model_shapes()
    pair = tied_embeddings(base_dir, ckpt)
    if pair is not None and pair[1] not in shapes:  # a tied lm_head is the input embedding (a checkpoint key)
        shapes[pair[1]] = ckpt.shape(pair[0])
    for group in tie_groups(base_dir, ckpt) if groups is None else groups:
        stored = [name for name in group if name in shapes]
        for name in group:
            if stored and name not in shapes:
                shapes[name] = shapes[stored[0]]
    return shapes


def is_weight_file(name: str) -> bool:
    """Whether a file of a model directory holds weights (any format) or indexes them: not copied into a model written from it."""
    return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES


def _updated_config(base_dir: Path, updates: Mapping[str, Any]) -> bytes:
    config = _config(base_dir)
    config.update(updates)
    text = config.get("text_config")
    if "tie_word_embeddings" in updates and isinstance(text, dict) and "tie_word_embeddings" in text:
        text["tie_word_embeddings"] = updates["tie_word_embeddings"]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def copy_model_files(base_dir: Path, tmp: Path, config_updates: Mapping[str, Any]) -> list[str]:
    """Copy the base's non-weight files (config, tokenizer, ...) into ``tmp``, ``config_updates`` set in ``config.json``."""
    copied = []
    for src in sorted(base_dir.iterdir()):
        if src.name.startswith(".") or not src.is_file() or is_weight_file(src.name):
            continue
        size = src.stat().st_size
        if size > MAX_COPIED_FILE_BYTES:
            log.warning("%s: not copied (%d MB, over the %d MB limit for non-weight files)", src, size >> 20, MAX_COPIED_FILE_BYTES >> 20)
            continue
        if src.name == "config.json" and config_updates:
            (tmp / src.name).write_bytes(_updated_config(base_dir, config_updates))
        else:
            shutil.copyfile(src, tmp / src.name)
        copied.append(src.name)
    return copied


def plan_model(
    base: str | os.PathLike[str] | Checkpoint,
    shard_size: int | str = "5GB",
    *,
    untie: tuple[str, str] | None = None,
    replace: Mapping[str, torch.Tensor] | None = None,
    drop: Collection[str] = (),
) -> list[list[TensorInfo]]:
    """The shards :func:`~oftmerge.engine.model.write_model` would write for this base: lists of :class:`TensorInfo`, in order.

    ``replace`` maps tensor names to tensors written instead of the base's (their own shape and
    dtype); names the base does not store are added after its tensors. ``drop`` names base tensors
    the output leaves out.
    """
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base)
    replace = replace or {}
    keys = [k for k in ckpt.keys_in_file_order() if k not in drop]
    keys += [k for k in replace if k not in ckpt and (untie is None or k != untie[1])]
    if untie is not None:
        source, target = untie
        if source not in ckpt or target in ckpt:
            raise OftMergeError(f"untie={untie!r}: {ckpt.path} must store {source!r} and not {target!r}")
        keys.append(target)
    layout = []
    for key in keys:
        if key in replace:
            layout.append(_info(key, replace[key]))
            continue
        src = untie[0] if untie is not None and key == untie[1] else key
        raw = ckpt.raw(src)
        if raw is not None:
            layout.append(TensorInfo(key, raw.dtype, raw.shape))
        else:
            layout.append(TensorInfo(key, _dtype_name(ckpt.get(src), src), ckpt.shape(src)))
    return _split(layout, parse_size(shard_size))
