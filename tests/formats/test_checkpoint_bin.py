"""PyTorch ``.bin`` bases: one file, sharded with ``pytorch_model.bin.index.json`` (as transformers 4 wrote them), legacy pickles.

Read with ``weights_only=True`` (a malicious pickle is refused, never run), memory-mapped, one shard open
at a time, pages dropped once a tensor is copied out; ``fold``, ``merge --fold-into`` and ``decouple``
with ``.bin`` bases (and full experts) give the tensors the safetensors base gives, and PEFT's
``merge_and_unload`` on the ``.bin`` base itself.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from oftmerge.cli import main
from oftmerge.engine.model import write_model
from oftmerge.errors import AdapterFormatError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.io import TensorFile
from oftmerge.ops.decouple import decouple_merge
from oftmerge.ops.fold import fold_adapter

from helpers import load_llama, max_rel_diff, model_tensors, save_bin, save_full_expert, save_lora_expert

KINDS = ["bin", "bin-sharded", "legacy"]


@pytest.fixture(scope="module")
def bins(llama, tmp_path_factory):
    """The session's tiny float32 Llama (safetensors) as .bin bases, and full / LoRA experts of it (safetensors and .bin)."""
    root = tmp_path_factory.mktemp("bins")
    base = llama["bases"]["f32"]
    full = save_full_expert(root / "full", base, seed=5)
    return {
        "safetensors": base,
        "bin": save_bin(base, root / "bin"),
        "bin-sharded": save_bin(base, root / "bin-sharded", shards=3),
        "legacy": save_bin(base, root / "legacy", legacy=True),
        "full": full,
        "full-bin": save_bin(full, root / "full-bin"),
        "full-bin-sharded": save_bin(full, root / "full-bin-sharded", shards=2),
        "lora": save_lora_expert(root / "lora", base, seed=6),
    }


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapter`` on ``base`` loaded by transformers (which reads the .bin itself)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_llama(base), str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


# -- reading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_bin_base_reads_as_its_safetensors(bins, kind):
    ref, ckpt = Checkpoint(bins["safetensors"]), Checkpoint(bins[kind])
    assert set(ckpt.keys()) == set(ref.keys()) and sorted(ckpt.keys_in_file_order()) == sorted(ref.keys())
    assert ckpt.shapes() == ref.shapes() and ckpt.model_shapes() == ref.shapes()  # a Llama: model names are the checkpoint's
    for key in ref.keys():
        assert ckpt.raw(key) is None and ckpt.dtype(key) == ref.dtype(key)
        assert torch.equal(ckpt.read(key), ref.read(key)) and torch.equal(ckpt.get(key), ref.get(key)), key
    index = ckpt.index_file.name if ckpt.index_file is not None else None
    assert index == ("pytorch_model.bin.index.json" if kind == "bin-sharded" else None)
    assert TensorFile(bins[kind] / ckpt.shards[0]).mapped is (kind != "legacy")  # a legacy pickle cannot be mapped


def test_a_sharded_bin_has_one_shard_open_at_a_time(bins, monkeypatch):
    opened: list[str] = []
    real = TensorFile.__init__

    def counting(self, path):
        opened.append(Path(path).name)
        real(self, path)

    monkeypatch.setattr(TensorFile, "__init__", counting)
    ckpt = Checkpoint(bins["bin-sharded"])
    assert len(ckpt.shards) == 3 and opened == []  # the index alone is read
    order = ckpt.keys_in_file_order()  # each shard is opened once for its order, shapes and dtypes
    assert opened == ckpt.shards
    ckpt.shapes(), [ckpt.dtype(k) for k in ckpt.keys()]  # index order (by name) interleaves the shards: no re-open
    assert len(opened) == 3
    for key in order:
        ckpt.read(key)
        assert len([s for s in ckpt._files if s.endswith(".bin")]) == 1
    assert len(opened) == 6  # reading in file order opens every shard once more


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are dropped with madvise on Linux only")
def test_read_copies_a_tensor_out_and_drops_its_pages(bins, tmp_path):
    # a file of a few MB, so that its resident pages are measurable
    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(24)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    size = (tmp_path / "pytorch_model.bin").stat().st_size

    def resident_kib() -> int:  # of this file's mappings (/proc/self/smaps)
        total, inside = 0, False
        target = os.path.realpath(tmp_path / "pytorch_model.bin")
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
                inside = line.rstrip().endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    tf = TensorFile(tmp_path / "pytorch_model.bin")
    assert tf.mapped and resident_kib() < size / 1024 / 10  # opening reads the pickle, not the tensors
    copies = {k: tf.read(k) for k in state}
    assert resident_kib() < size / 1024 / 10  # every page read was dropped again
    assert all(torch.equal(copies[k], state[k]) for k in state)
    copies["w0"].zero_()  # a copy: the file's tensor does not change, and reads back from the file after the drop
    assert torch.equal(tf.get("w0"), state["w0"]) and torch.equal(tf.read("w0"), state["w0"])
    touched = sum(float(tf.get(k).sum()) for k in state)  # get() is the mapping itself: its pages stay
    assert touched == pytest.approx(sum(float(v.sum()) for v in state.values())) and resident_kib() > size / 1024 / 2


class _Payload:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_and_never_run(llama, bins, tmp_path, capsys, legacy):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_bytes((bins["safetensors"] / "config.json").read_bytes())
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    torch.save({**model_tensors(bins["safetensors"]), "extra": payload}, evil / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(AdapterFormatError, match=r"pytorch_model.bin: cannot be read as a PyTorch state dict with weights_only=True"):
        Checkpoint(evil)
    assert main(["fold", str(llama["adapters"]["neumann"]), "--base", str(evil), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not payload.marker.exists() and not (tmp_path / "out").exists()


# -- the engine: tensor_fn sees the wanted tensors only ------------------------------------------------------


@pytest.mark.parametrize("kind", ["bin", "bin-sharded"])
def test_write_model_calls_tensor_fn_for_wanted_tensors_only(bins, tmp_path, kind):
    seen = []
    wanted = {"model.layers.0.mlp.down_proj.weight", "lm_head.weight"}

    def double(name, tensor):
        seen.append(name)
        return tensor * 2

    out = write_model(bins[kind], tmp_path / "out", double, only=wanted, shard_size="60KB")
    assert sorted(seen) == sorted(wanted)
    got, base = model_tensors(out), model_tensors(bins["safetensors"])
    assert set(got) == set(base)
    assert all(torch.equal(got[k], base[k] * 2 if k in wanted else base[k]) for k in base)


# -- fold, merge --fold-into, decouple ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fold_into_a_bin_base_equals_the_safetensors_fold_and_peft(llama, bins, tmp_path, kind):
    adapter = llama["adapters"]["neumann"]
    want = model_tensors(fold_adapter(adapter, bins["safetensors"], tmp_path / "ref").out_dir)
    assert main(["fold", str(adapter), "--base", str(bins[kind]), "-o", str(tmp_path / "out"), "-q"]) == 0
    got = model_tensors(tmp_path / "out")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert max_rel_diff(got, _peft_merged(bins[kind], adapter)) <= 1e-5
    assert (tmp_path / "out" / "model.safetensors").is_file() and not list((tmp_path / "out").glob("*.bin"))


@pytest.mark.parametrize("kind", ["bin", "bin-sharded"])
def test_merge_fold_into_a_bin_base(llama, bins, tmp_path, kind):
    a, b = llama["adapters"]["neumann"], llama["adapters"]["neumann-b"]
    args = ["merge", str(a), str(b), "-q"]
    assert main([*args, "--fold-into", str(bins["safetensors"]), "-o", str(tmp_path / "ref")]) == 0
    assert main([*args, "--fold-into", str(bins[kind]), "-o", str(tmp_path / "out")]) == 0
    got, want = model_tensors(tmp_path / "out"), model_tensors(tmp_path / "ref")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # and the merged adapter folded by PEFT into the .bin base
    assert main([*args, "-o", str(tmp_path / "merged")]) == 0
    assert max_rel_diff(got, _peft_merged(bins[kind], tmp_path / "merged")) <= 1e-5


@pytest.mark.parametrize("kind", ["bin", "bin-sharded"])
@pytest.mark.parametrize("experts", ["lora", "full+lora"])
def test_decouple_with_a_bin_base_and_bin_experts(bins, tmp_path, kind, experts):
    ref = [bins["lora"]] + ([bins["full"]] if experts == "full+lora" else [])
    want = model_tensors(decouple_merge(bins["safetensors"], ref, out_dir=tmp_path / "ref").out_dir)
    mine = [bins["lora"]] + ([bins["full-bin" if kind == "bin" else "full-bin-sharded"]] if experts == "full+lora" else [])
    assert main(["decouple", "--base", str(bins[kind]), *map(str, mine), "-o", str(tmp_path / "out"), "-q"]) == 0
    got = model_tensors(tmp_path / "out")
    # the experts' order is canonical by the SHA-256 of their files, which differ between .bin and safetensors
    assert set(got) == set(want) and max_rel_diff(got, want) <= 1e-6


@pytest.mark.parametrize("kind", ["bin", "bin-sharded"])
def test_decouple_of_one_lora_on_a_bin_base_equals_peft_merge_and_unload(bins, tmp_path, kind):
    """One LoRA expert, task arithmetic, no rotation: the LoRA merged into the .bin base, as PEFT merges it."""
    from peft import PeftModel

    args = ["decouple", "--base", str(bins[kind]), str(bins["lora"]), "--euclidean", "ta", "--orthogonal", "none", "-q"]
    assert main([*args, "-o", str(tmp_path / "out")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = PeftModel.from_pretrained(load_llama(bins[kind]), str(bins["lora"])).merge_and_unload().state_dict()
    assert max_rel_diff(model_tensors(tmp_path / "out"), {k: v.detach() for k, v in want.items()}) <= 1e-6
