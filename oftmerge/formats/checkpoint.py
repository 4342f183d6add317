"""Read-only access to a ``transformers`` checkpoint directory, one tensor at a time.

Handles a single ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, and (read safely, fully into memory)
``pytorch_model.bin`` / its sharded index.
"""

from __future__ import annotations

from pathlib import Path

import torch

from oftmerge.errors import AdapterFormatError
from oftmerge.formats.io import TensorFile, read_json

__all__ = ["Checkpoint"]

_SINGLE = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class Checkpoint:
    """The tensors of a model directory, by name, across shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise AdapterFormatError(f"{self.path}: base model directory not found")
        self._files: dict[str, TensorFile] = {}
        self._where: dict[str, str] = {}
        self.index_file: Path | None = None
        for name in _INDEX:
            if (self.path / name).is_file():
                self.index_file = self.path / name
                index = read_json(self.path / name)
                weight_map = index.get("weight_map")
                if not isinstance(weight_map, dict):
                    raise AdapterFormatError(f"{self.path / name}: no weight_map")
                self._where = {k: str(v) for k, v in weight_map.items()}
                break
        else:
            for name in _SINGLE:
                if (self.path / name).is_file():
                    tf = self._open(name)
                    self._where = {k: name for k in tf.keys()}
                    break
            else:
                raise AdapterFormatError(
                    f"{self.path}: no model weights (looked for {', '.join(_SINGLE + _INDEX)})"
                )

    def _open(self, shard: str) -> TensorFile:
        if shard not in self._files:
            self._files[shard] = TensorFile(self.path / shard)
        return self._files[shard]

    @property
    def shards(self) -> list[str]:
        return sorted(set(self._where.values()))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shard_of(self, key: str) -> str:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._open(self._where[key]).shape(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise AdapterFormatError(f"{self.path}: no tensor named {key!r}")
        return self._open(self._where[key]).get(key)
