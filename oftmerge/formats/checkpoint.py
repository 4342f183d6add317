"""Read-only access to a ``transformers`` (or ``diffusers``) checkpoint directory, one tensor at a time.

Handles a single ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, and ``pytorch_model.bin`` / its sharded index
``pytorch_model.bin.index.json`` (unpickled with ``weights_only=True``); and the same files of a
``diffusers`` model (``diffusion_pytorch_model.safetensors``, ``diffusion_pytorch_model-00001-of-00002.safetensors``
with ``diffusion_pytorch_model.safetensors.index.json``, ``.bin``): :attr:`Checkpoint.weights_stem`
says which, and a model written from it keeps those names.

Besides :meth:`Checkpoint.get` (through ``safe_open``), a safetensors tensor
can be located on disk without reading it (:meth:`Checkpoint.raw`, a
:class:`RawTensor`: file, byte range, dtype, shape) and read with plain file
I/O (:meth:`Checkpoint.read`). Plain reads do not map the file, so a tensor
that was read and released stops counting toward the resident memory of the
process, which is what a streaming fold over a large model needs.

A ``.bin`` has no byte ranges to copy. Its tensors are memory-mapped (torch's zip format; a
legacy pickle is read whole) and :meth:`Checkpoint.read` copies one out and drops its pages
(:meth:`~oftmerge.formats.io.TensorFile.read`). Of a sharded ``.bin`` one shard is open at a
time: each is opened once for its order, shapes and dtypes (which are kept), and once more when
read in :meth:`~Checkpoint.keys_in_file_order`.

Names: keys are the checkpoint's. :meth:`Checkpoint.model_key` and
:meth:`Checkpoint.model_shapes` speak the loaded model's names, which ``transformers`` 5
renames for some architectures (:mod:`oftmerge.formats.names`)::

    ckpt = Checkpoint("vit-base")
    ckpt.model_key("vit.layers.0.attention.q_proj.weight")  # 'vit.encoder.layer.0.attention.attention.query.weight'
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oftmerge.errors import AdapterFormatError
from oftmerge.formats.io import _SAFETENSORS_DTYPES, TensorFile, read_json
from oftmerge.formats.names import NameMap, is_diffusers_config, name_map

__all__ = ["DIFFUSERS_STEM", "Checkpoint", "RawTensor", "is_diffusers_config", "missing_config_warning", "read_model_config", "read_safetensors_header"]

#: Largest header safetensors itself accepts (100 MB).
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor's bytes are in a safetensors file (nothing is read)."""

    path: Path
    offset: int  #: absolute byte offset of the first byte in the file
    nbytes: int
    dtype: str  #: safetensors dtype name: ``"BF16"``, ``"F32"``, ...
    shape: tuple[int, ...]

    def read(self) -> torch.Tensor:
        """The tensor, read with ordinary file I/O into fresh memory (no memory map, no dtype change)."""
        try:
            dtype = _SAFETENSORS_DTYPES[self.dtype]
        except KeyError:
            raise AdapterFormatError(f"{self.path}: dtype {self.dtype} is not handled by oftmerge") from None
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.nbytes:
            view = memoryview(buf.numpy())  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on 3.12+
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset)
                done = 0
                while done < self.nbytes:
                    n = f.readinto(view[done:])
                    if not n:
                        raise AdapterFormatError(f"{self.path}: file ends inside a tensor; it is truncated")
                    done += n
        return buf.view(dtype).reshape(self.shape)


def read_safetensors_header(path: str | Path) -> tuple[int, dict]:
    """``(data_start, header)`` of a safetensors file: the JSON header and where the data begins."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise AdapterFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise AdapterFormatError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFormatError(f"{path}: not a safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    return 8 + n, header

_SINGLE = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_INDEX = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
#: the weights' file stem of a ``diffusers`` model (``ModelMixin.save_pretrained``); ``transformers`` writes ``model``
DIFFUSERS_STEM = "diffusion_pytorch_model"


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``config.json`` of model directory ``path`` as a dict; None when there is none; refused when it is not a JSON object.

    ``transformers`` cannot load a model whose config is not JSON, and oftmerge copies it into
    every model it writes, so a broken one is an error here rather than an unloadable output.
    """
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        return read_json(file)
    except AdapterFormatError as exc:
        raise AdapterFormatError(
            f"{exc}; a model's config.json is what transformers' save_pretrained writes: restore it, or write it again "
            "(AutoConfig.from_pretrained(...).save_pretrained(DIR))"
        ) from None


def missing_config_warning(ckpt: Checkpoint) -> str | None:
    """The warning for writing a full model (fold, decouple) from a base without ``config.json``, or None when it has one.

    Such a base is a plain state dict (a model of your own code, not ``transformers``'): the
    output is one too, weights that load into that code, and ``from_pretrained`` cannot load it.
    """
    if ckpt.config is not None:
        return None
    return (
        f"the base model {ckpt.path} has no config.json, so neither has the model written from it: transformers' from_pretrained "
        "cannot load it (load its state dict into your own model class); for a transformers model, put the base's config.json "
        "in the base directory (AutoConfig.from_pretrained(...).save_pretrained(DIR)) and run again"
    )


def _shard_name(index: Path, key: str, value: Any) -> str:
    """Shard file ``value`` that ``index`` names for tensor ``key``, refused unless it lies inside the index's directory.

    The name is checked as written (relative, no ``..``, not absolute), as ``transformers`` joins it
    to the directory; the file itself may be a symlink, as every file of a Hub cache snapshot is.
    """
    if not isinstance(value, str) or not value.strip() or not Path(value).parts:
        raise AdapterFormatError(
            f"{index}: weight_map maps {key!r} to {value!r}; expected the name of a shard file in {index.parent} "
            "(e.g. model-00001-of-00002.safetensors): save the model again, or fix weight_map"
        )
    name, parts = value, Path(value).parts
    if os.path.isabs(name) or ".." in parts or "\\" in name or name.startswith("~"):
        raise AdapterFormatError(
            f"{index}: weight_map maps {key!r} to {value!r}, which is not a file name inside {index.parent}; an index names its "
            "shards relative to its own directory (e.g. model-00001-of-00002.safetensors). Refusing to read files outside "
            "the model directory: fix weight_map, or put the shards in the directory"
        )
    return name


class Checkpoint:
    """The tensors of a model directory, by name, across shards."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise AdapterFormatError(f"{self.path}: base model directory not found")
        self._files: dict[str, TensorFile] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        self._where: dict[str, str] = {}
        #: shape and dtype of every tensor of a ``.bin`` shard opened once (a shard is closed when the next opens)
        self._bin_meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._bin_order: dict[str, list[str]] = {}
        self._names: NameMap | None = None
        self.index_file: Path | None = None
        #: the directory's ``config.json`` (:func:`read_model_config`), None when it has none
        self.config: dict[str, Any] | None = read_model_config(self.path)
        for name in _INDEX:
            if (self.path / name).is_file():
                self.index_file = self.path / name
                index = read_json(self.path / name)
                weight_map = index.get("weight_map")
                if not isinstance(weight_map, dict):
                    raise AdapterFormatError(f"{self.path / name}: no weight_map")
                self._where = {str(k): _shard_name(self.index_file, str(k), v) for k, v in weight_map.items()}
                break
        else:
            for name in _SINGLE:
                if (self.path / name).is_file():
                    tf = self._open(name)
                    self._where = {k: name for k in tf.keys()}
                    break
            else:
                others = sorted(p.name for p in self.path.glob("*.safetensors"))[:3]
                raise AdapterFormatError(
                    f"{self.path}: no model weights (looked for {', '.join(_SINGLE + _INDEX)})"
                    + (f"; found {', '.join(others)}: a variant (e.g. .fp16) or renamed file is not read, rename it to one of those" if others else "")
                )
        first = name  # the index or the single file found
        #: file stem of the weights (``model``, or ``diffusion_pytorch_model`` for a ``diffusers`` model): what the output's files are called
        self.weights_stem = DIFFUSERS_STEM if first.startswith(DIFFUSERS_STEM) else "model"

    @property
    def is_diffusers(self) -> bool:
        """Whether this is a ``diffusers`` model directory (its config names ``_class_name``, or its weights are ``diffusion_pytorch_model*``)."""
        return is_diffusers_config(self.config) or self.weights_stem == DIFFUSERS_STEM

    def _open(self, shard: str) -> TensorFile:
        """The shard's :class:`TensorFile`; opening a ``.bin`` shard closes the ``.bin`` shard open before."""
        tf = self._files.get(shard)
        if tf is None:
            if not shard.endswith(".safetensors"):
                for other in [s for s in self._files if not s.endswith(".safetensors")]:
                    del self._files[other]  # its memory map goes once the tensors read from it are released
            tf = self._files[shard] = TensorFile(self.path / shard)
            if not shard.endswith(".safetensors"):
                self._bin_order[shard] = tf.keys()
                self._bin_meta.update({k: (tf.shape(k), tf.dtype(k)) for k in tf.keys()})
        return tf

    @property
    def shards(self) -> list[str]:
        return sorted(set(self._where.values()))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys_in_file_order(self) -> list[str]:
        """Tensor names shard by shard, and within a safetensors shard by position in the file.

        This is the order in which the tensors were written, and the order in
        which reading them is sequential on disk.
        """
        order: list[str] = []
        by_shard: dict[str, list[str]] = {}
        for key, shard in self._where.items():
            by_shard.setdefault(shard, []).append(key)
        for shard in self.shards:
            keys = by_shard[shard]
            if shard.endswith(".safetensors"):
                keys = sorted(keys, key=lambda k: self.raw(k).offset)  # type: ignore[union-attr]
            else:  # the order the .bin was saved in (keys the index names but the file lacks last)
                if shard not in self._bin_order:
                    self._open(shard)
                mine = set(keys)
                stored = [k for k in self._bin_order[shard] if k in mine]
                keys = stored + sorted(mine.difference(stored))
            order += keys
        return order

    def shard_of(self, key: str) -> str:
        return self._where[key]

    def _file_of(self, key: str) -> TensorFile:
        """The open shard that holds tensor ``key``; refused when the index maps it to a shard that does not hold it."""
        if key not in self._where:
            raise AdapterFormatError(f"{self.path}: no tensor named {key!r}")
        tf = self._open(self._where[key])
        if key not in tf:
            raise self._misplaced(key)
        return tf

    def _misplaced(self, key: str) -> AdapterFormatError:
        return AdapterFormatError(
            f"{self.index_file or self.path}: maps tensor {key!r} to {self._where[key]}, which does not hold it; the index does "
            "not belong to these shards (save the model again, or fix weight_map)"
        )

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._bin_meta:
            return self._bin_meta[key][0]
        return self._file_of(key).shape(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}

    def get(self, key: str) -> torch.Tensor:
        return self._file_of(key).get(key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self._bin_meta:
            return self._bin_meta[key][1]
        return self._file_of(key).dtype(key)

    def raw(self, key: str) -> RawTensor | None:
        """Where tensor ``key`` lies on disk, or None when its file is not safetensors (``.bin``)."""
        if key not in self._where:
            raise AdapterFormatError(f"{self.path}: no tensor named {key!r}")
        shard = self._where[key]
        if not shard.endswith(".safetensors"):
            return None
        if shard not in self._headers:
            self._headers[shard] = read_safetensors_header(self.path / shard)
        start, header = self._headers[shard]
        entry = header.get(key)
        if key == "__metadata__" or not isinstance(entry, dict):
            raise self._misplaced(key)
        begin, end = entry["data_offsets"]
        return RawTensor(self.path / shard, start + begin, end - begin, entry["dtype"], tuple(entry["shape"]))

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in memory of its own: read without a memory map (safetensors), or copied out of a ``.bin``'s."""
        raw = self.raw(key)
        return self._file_of(key).read(key) if raw is None else raw.read()

    # -- model names ------------------------------------------------------------------------------

    @property
    def names(self) -> NameMap:
        """Checkpoint keys <-> the loaded model's parameter names (:func:`oftmerge.formats.names.name_map`), built on first use."""
        if self._names is None:
            self._names = name_map(self.path, self._where)
        return self._names

    def model_key(self, name: str) -> str | None:
        """The checkpoint key of model parameter ``name`` (``vit.layers.0.attention.q_proj.weight``), or None.

        A name the model does not have but the checkpoint stores is that key itself (an adapter
        trained with ``transformers`` 4, which did not rename, names modules so). None when
        neither, or when ``transformers`` builds the parameter from other tensors on load
        (:meth:`converted` says how).
        """
        key = self.names.to_checkpoint.get(name)
        if key is not None:
            return key
        if name in self._where and name not in self.names.converted:
            return name
        return None

    def converted(self, name: str) -> str | None:
        """Why model parameter ``name`` has no checkpoint key of its own (a fused, split or permuted tensor), or None."""
        return self.names.converted.get(name)

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes keyed by the loaded model's parameter names (each name :meth:`model_key` maps).

        Checkpoint keys the model does not use as names are included under their own name (as
        :meth:`model_key` accepts them); parameters ``transformers`` builds from other tensors
        (:meth:`converted`) have the model's shape.
        """
        names = self.names
        out = {name: self.shape(key) for name, key in names.to_checkpoint.items() if key in self._where}
        for key in self._where:
            if key not in out and key not in names.converted:
                out[key] = self.shape(key)
        for name, shape in names.converted_shapes.items():
            out.setdefault(name, shape)
        return out

    def closest(self, name: str, n: int = 3) -> list[str]:
        """Up to ``n`` model parameter names most like ``name`` (for messages about a missing module)."""
        import difflib

        return difflib.get_close_matches(name, list(self.model_shapes()), n=n, cutoff=0.5)
