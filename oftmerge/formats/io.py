"""Low-level file I/O: lazy tensor sources, hashes, JSON, and atomic single-file writes.

* :class:`TensorFile` reads one tensor at a time from a ``.safetensors`` file
  (``safe_open``) or, safely (``weights_only=True``), from a PyTorch ``.bin``.
* Output *directories* are committed by :mod:`oftmerge.engine.commit`, the one
  place every command's output goes through.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from oftmerge.errors import AdapterFormatError

__all__ = ["TensorDict", "TensorFile", "content_hash", "sha256_file", "atomic_write_bytes", "fsync_dir", "read_json", "write_json_atomic"]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFile:
    """Lazy, read-only access to the tensors of one checkpoint file.

    A ``.bin`` is unpickled with ``weights_only=True`` (an arbitrary object is refused) and, in
    torch's zip format (every ``torch.save`` since 1.6), memory-mapped: opening it reads the
    pickle, not the tensors. A legacy (non-zip) ``.bin`` is read whole.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise AdapterFormatError(f"{self.path}: file not found")
        self._bin: dict[str, torch.Tensor] | None = None
        self._handle: Any = None
        self._keyset: set[str] | None = None
        self.mapped = False  #: a ``.bin`` whose tensors are memory-mapped
        self._maps: list[tuple[int, int]] | None = None  # where it is mapped, looked up on the first read
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt")
                self._keys = list(self._handle.keys())
            except Exception as exc:  # safetensors raises several types for corrupt files
                raise AdapterFormatError(
                    f"{self.path}: not a readable safetensors file ({exc}). Re-save it with "
                    "`save_pretrained(...)` or check that the download was complete."
                ) from exc
        else:
            import zipfile

            self.mapped = zipfile.is_zipfile(self.path)  # mmap needs the zip format; a legacy pickle is loaded whole
            try:
                loaded = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=self.mapped)
            except Exception as exc:
                raise AdapterFormatError(
                    f"{self.path}: cannot be read as a PyTorch state dict with weights_only=True "
                    f"({str(exc).strip().splitlines()[0][:160]}). "
                    "oftmerge never unpickles arbitrary objects; convert the file to safetensors first."
                ) from exc
            if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise AdapterFormatError(f"{self.path}: expected a dict of tensors, got {type(loaded).__name__}")
            self._bin = loaded
            self._keys = list(loaded)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        if self._keyset is None:
            self._keyset = set(self._keys)
        return key in self._keyset

    def shape(self, key: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        return tuple(self._handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if self._bin is not None:
            return self._bin[key].dtype
        name = self._handle.get_slice(key).get_dtype()
        try:
            return _SAFETENSORS_DTYPES[name]
        except KeyError:
            raise AdapterFormatError(f"{self.path}: tensor {key!r} has dtype {name}, which oftmerge does not handle") from None

    def get(self, key: str) -> torch.Tensor:
        if key not in self:
            raise AdapterFormatError(f"{self.path}: no tensor named {key!r}")
        if self._bin is not None:
            return self._bin[key]
        return self._handle.get_tensor(key)

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in memory of its own.

        From a memory-mapped ``.bin`` it is copied out and the pages it was read from are dropped
        from the process (``madvise(MADV_DONTNEED)`` on Linux; the mapping is private and never
        written, so a later access reads the file again), so reading a whole file one tensor at a
        time keeps only the tensors still referenced in memory. Otherwise as :meth:`get`.
        """
        tensor = self.get(key)
        if not self.mapped:
            return tensor
        copy = tensor.clone(memory_format=torch.contiguous_format)
        self._drop_pages(tensor)
        return copy

    def _drop_pages(self, tensor: torch.Tensor) -> None:
        """Release the resident pages under ``tensor``'s storage, if they lie in this file's memory map (Linux only)."""
        if self._maps is None:
            self._maps = self._file_maps()
        storage = tensor.untyped_storage()
        begin, size = storage.data_ptr(), storage.nbytes()
        import mmap

        page = mmap.PAGESIZE
        start, stop = begin // page * page, -(-(begin + size) // page) * page  # whole pages
        # only pages of a mapping of this very file: dropping anonymous memory would zero it
        if size and any(lo <= start and stop <= hi for lo, hi in self._maps):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), 4)  # 4: MADV_DONTNEED; a failure keeps the pages

    def _file_maps(self) -> list[tuple[int, int]]:
        """Address ranges where this file is mapped into the process (``/proc/self/maps``; none where that is unknown)."""
        target = os.path.realpath(self.path)
        ranges = []
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].rstrip("\n") == target:
                        first, last = parts[0].split("-")
                        ranges.append((int(first, 16), int(last, 16)))
        except OSError:  # not Linux: pages are not dropped
            return []
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):  # one mapping may be listed as adjacent pieces
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return merged

    def metadata(self) -> dict[str, str]:
        if self._handle is None:
            return {}
        return dict(self._handle.metadata() or {})


class TensorDict:
    """The :class:`TensorFile` interface over tensors already in memory (e.g. a live model's state dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str):
        self.path = Path(label)
        self._tensors = {k: v.detach().cpu() for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise AdapterFormatError(f"{self.path}: no tensor named {key!r}")
        return self._tensors[key]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(source: TensorFile | TensorDict) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, independent of the file format."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(source.keys()):
        t = source.get(key).contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))
