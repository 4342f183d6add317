"""The streaming shard writer and write_model: byte layout, order, limits, raw copies, misuse, truncated input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oftmerge.engine.commit import atomic_directory
from oftmerge.engine.model import write_model
from oftmerge.errors import OftMergeError, OutputExistsError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.shards import ShardedWriter, TensorInfo, parse_size

from helpers import digests


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    out = {f"w{i}": torch.randn(10 + i, 7, generator=g).to(dtypes[i % 3]) for i in range(9)}
    out.update(ids=torch.arange(5), mask=torch.tensor([True, False]), scalar=torch.tensor(3.0), empty=torch.empty(0, 3))
    return out


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys_in_file_order()}


# -- ShardedWriter -----------------------------------------------------------------------------------


def test_sharded_writer_buffered_and_planned_write_the_same_bytes(tmp_path):
    tensors = _mixed_tensors()
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL"}
    layout = [TensorInfo(k, names[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    for mode, lay in (("buffered", None), ("planned", layout)):
        (tmp_path / mode).mkdir()
        writer = ShardedWriter(tmp_path / mode, max_shard_bytes=300, layout=lay)
        for k, v in tensors.items():
            writer.add(k, v)
        index = writer.close()
    assert digests(tmp_path / "buffered") == digests(tmp_path / "planned")
    names = sorted(p.name for p in (tmp_path / "buffered").iterdir())
    n = len(names) - 1
    assert names[-1] == "model.safetensors.index.json" and n > 2
    assert names[:-1] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    assert json.loads((tmp_path / "buffered" / "model.safetensors.index.json").read_text()) == index
    got = _read_all(tmp_path / "buffered")
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    for shard in (tmp_path / "buffered").glob("*.safetensors"):  # every shard within the limit unless one tensor is larger
        sizes = [v.numel() * v.element_size() for v in load_file(shard).values()]
        assert sum(sizes) <= 300 or len(sizes) == 1


def test_sharded_writer_one_shard_is_model_safetensors_without_index(tmp_path):
    tensors = _mixed_tensors()
    with ShardedWriter(tmp_path) as writer:
        for k, v in tensors.items():
            writer.add(k, v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_writer_rejects_misuse(tmp_path):
    writer = ShardedWriter(tmp_path, layout=[TensorInfo("a", "F32", (2,))])
    with pytest.raises(OftMergeError, match=r"tensor 'b' \(F32, shape \[2\]\) does not match the layout, which expects 'a'"):
        writer.add("b", torch.zeros(2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    writer = ShardedWriter(tmp_path)
    writer.add("a", torch.zeros(2))
    with pytest.raises(OftMergeError, match="tensor 'a' added twice"):
        writer.add("a", torch.zeros(2))
    with pytest.raises(OftMergeError, match=r"shard size '5 parsecs'"):
        parse_size("5 parsecs")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(123) == 123


def test_write_model_streams_copies_raw_and_keeps_files(tmp_path):
    base = tmp_path / "base"
    tensors = _mixed_tensors()
    with atomic_directory(base) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=400)
        for k, v in tensors.items():
            writer.add(k, v)
        writer.close()
        (tmp / "config.json").write_text('{"model_type": "toy"}')
        (tmp / "tokenizer.json").write_text("{}")
        (tmp / "pytorch_model.bin").write_bytes(b"not copied")
    seen = []

    def double(name, t):
        seen.append(name)
        return t * 2 if name == "w1" else None

    out = write_model(base, tmp_path / "out", double, shard_size=300, only={"w1", "w2"})
    assert seen == ["w1", "w2"]
    got = _read_all(out)
    assert list(got) == list(tensors)  # the base's order
    assert torch.equal(got["w1"], tensors["w1"] * 2)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors if k != "w1")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json"} <= files and "pytorch_model.bin" not in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    with pytest.raises(OutputExistsError):
        write_model(base, out, double)
    again = write_model(base, tmp_path / "again", double, shard_size=300, only={"w1", "w2"})
    assert digests(again) == digests(out)
    with pytest.raises(OftMergeError, match=r"tensor_fn changed 'w1' from torch.bfloat16 \[11, 7\] to torch.float32"):
        write_model(base, tmp_path / "bad", lambda n, t: t.float(), only={"w1"})
    assert not (tmp_path / "bad").exists()


def test_write_model_reports_a_truncated_base_and_writes_nothing(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    writer = ShardedWriter(base)
    for k, v in _mixed_tensors().items():
        writer.add(k, v)
    writer.close()
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-20])  # e.g. an interrupted download
    with pytest.raises(OftMergeError, match=r"model.safetensors: not a readable safetensors file .*file not fully covered"):
        write_model(base, tmp_path / "out", lambda n, t: t + 1 if t.is_floating_point() else t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
