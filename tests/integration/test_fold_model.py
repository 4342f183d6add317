"""Folding OFT adapters into full models: equality with PEFT's merge_and_unload on tiny real transformers
models and on golden fixtures, dtypes, tied embeddings, the fold commands. (The shard writer:
formats/test_shards.py; crash safety: system/test_crash_safety.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

from oftmerge.formats.checkpoint import Checkpoint

from helpers import GOLDEN, LLAMA_IDS, digests, load_llama, make_llama_adapter, peft_llama, save_llama

GOLDEN_CASES = sorted(p for p in GOLDEN.glob("peft-*/*") if (p / "adapter").is_dir())


def _assert_within_one_ulp(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    """16-bit results: both sides round a float32 result once, so they may differ by one unit in the last place.

    (Plus float32 accumulation noise, 1e-6 of the largest entry, for entries that nearly cancel.)
    """
    a, b = ours.float(), theirs.float()
    _, exp = torch.frexp(b)
    ulp = torch.ldexp(torch.full_like(b, torch.finfo(theirs.dtype).eps), exp - 1)  # spacing at |b|
    bad = (a - b).abs() > ulp + 1e-6 * b.abs().max()
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} entries more than one {theirs.dtype} ulp apart, e.g. {a[bad][:3].tolist()} vs {b[bad][:3].tolist()}"


def _assert_weights_equal(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    assert ours.dtype == theirs.dtype, name
    if theirs.dtype in (torch.bfloat16, torch.float16):
        _assert_within_one_ulp(ours, theirs, name)
    else:
        err = float((ours - theirs).abs().max()) / max(float(theirs.abs().max()), 1e-30)
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("variant", ["f32", "f32-sharded", "bf16"])
@pytest.mark.parametrize("kind", ["neumann", "exact"])
def test_folded_llama_equals_peft_merge_and_unload(llama, variant, kind, tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base, adapter = llama["bases"][variant], llama["adapters"][kind]
    result = fold_adapter(adapter, base, tmp_path / "out", shard_size="60KB")
    assert len(result.modules) == 2 * 7 + 2 and not result.warnings
    dtype = torch.bfloat16 if variant == "bf16" else None
    folded = load_llama(tmp_path / "out")
    assert folded.dtype == (dtype or torch.float32)
    peft_model = peft_llama(base, adapter, dtype)
    with torch.no_grad():
        unmerged = peft_model(LLAMA_IDS).logits.float()
        merged_model = peft_model.merge_and_unload()
        merged_logits = merged_model(LLAMA_IDS).logits.float()
        ours = folded(LLAMA_IDS).logits.float()
    theirs = merged_model.state_dict()
    mine = folded.state_dict()
    assert mine.keys() == theirs.keys()
    for key in theirs:
        _assert_weights_equal(mine[key], theirs[key], key)
    scale = float(unmerged.abs().max())
    if dtype is None:
        assert float((ours - unmerged).abs().max()) <= 1e-5 * scale
    else:  # bf16: the same weights as PEFT's merge up to one rounding; the unmerged bf16 forward rounds elsewhere
        assert float((ours - merged_logits).abs().max()) <= 2e-2 * scale
        assert float((ours - unmerged).abs().max()) <= 5e-2 * scale
    ckpt_in, ckpt_out = Checkpoint(base), Checkpoint(tmp_path / "out")
    for key in set(ckpt_in.keys()) - set(result.modules.values()):  # untouched tensors: the same bytes
        a, b = ckpt_in.raw(key), ckpt_out.raw(key)
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.read().view(torch.uint8).equal(b.read().view(torch.uint8)), key
    assert len(ckpt_out.shards) > 1 and json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert (tmp_path / "out" / "generation_config.json").is_file()


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fold_golden_fixture_equals_that_releases_merge(case, tmp_path):
    """Every layout and Cayley variant of PEFT 0.13.2-0.21.2, Linear, Embedding and Conv2d, against that release."""
    import shutil

    from oftmerge.ops.fold import fold_adapter

    (tmp_path / "base").mkdir()
    shutil.copyfile(case / "base.safetensors", tmp_path / "base" / "model.safetensors")
    result = fold_adapter(case / "adapter", tmp_path / "base", tmp_path / "out")
    # the 3x3 conv: PEFT >= 0.16's forward is not its merge there (0.13-0.15's is), and the fold says so once
    conv = [w for w in result.warnings if w.startswith("1 Conv2d module(s) with kernels larger than 1x1 (conv): the fold is PEFT's merged")]
    assert len(conv) == (case.name == "conv" and Version(case.parent.name.removeprefix("peft-")) >= Version("0.16"))
    assert all("docs/fold.md, \"Where PEFT disagrees with itself\"" in w for w in conv)
    expected = {k.removeprefix("merged."): v for k, v in load_file(case / "expected.safetensors").items() if k.startswith("merged.")}
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key, theirs in expected.items():
        if key in result.modules.values():
            _assert_weights_equal(got[key], theirs, key)
        else:
            assert torch.equal(got[key], theirs), f"{key} must not change"


def test_merged_adapters_fold_equals_peft_on_the_merged_adapter(llama, tmp_path):
    import oftmerge

    base = llama["bases"]["f32-sharded"]
    inputs = [llama["adapters"]["neumann"], llama["adapters"]["neumann-b"]]
    result = oftmerge.merge_adapters(inputs, out_dir=tmp_path / "model", base=base, output="model", shard_size="100KB")
    assert result.saved_to == (tmp_path / "model").absolute()
    oftmerge.merge_adapters(inputs, out_dir=tmp_path / "adapter")
    with torch.no_grad():
        peft_model = peft_llama(base, tmp_path / "adapter")
        unmerged = peft_model(LLAMA_IDS).logits
        theirs = peft_model.merge_and_unload().state_dict()
        folded = load_llama(tmp_path / "model")
        ours = folded(LLAMA_IDS).logits
    for key, value in folded.state_dict().items():
        _assert_weights_equal(value, theirs[key], key)
    assert float((ours - unmerged).abs().max()) <= 1e-5 * float(unmerged.abs().max())
    prov = json.loads((tmp_path / "model" / "oftmerge.json").read_text())
    assert prov["source"]["method"] == "orthomerge" and len(prov["source"]["inputs"]) == 2


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "q_proj"]])
def test_tied_embedding_rotated_is_untied_and_keeps_the_adapted_function(targets, tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base = save_llama(tmp_path / "base", tie_word_embeddings=True)
    assert "lm_head.weight" not in Checkpoint(base)
    adapter = make_llama_adapter(tmp_path / "a", base, seed=4, targets=targets, use_cayley_neumann=False)
    result = fold_adapter(adapter, base, tmp_path / "out")
    assert result.untied == ("model.embed_tokens.weight", "lm_head.weight")
    assert any("stores lm_head.weight separately (tie_word_embeddings=false)" in w for w in result.warnings)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    out = Checkpoint(tmp_path / "out")
    rotated = "model.embed_tokens.weight" if "embed_tokens" in targets else "lm_head.weight"
    kept = ({"model.embed_tokens.weight", "lm_head.weight"} - {rotated}).pop()
    assert torch.equal(out.get(kept), Checkpoint(base).get("model.embed_tokens.weight"))
    peft_model = peft_llama(base, adapter)
    with torch.no_grad():
        unmerged = peft_model(LLAMA_IDS).logits
        ours = load_llama(tmp_path / "out")(LLAMA_IDS).logits
        peft_merged = peft_model.merge_and_unload()(LLAMA_IDS).logits
    scale = float(unmerged.abs().max())
    assert float((ours - unmerged).abs().max()) <= 1e-5 * scale
    # PEFT's in-place merge rotates the one tied matrix, i.e. both ends: a different model
    assert float((peft_merged - unmerged).abs().max()) > 1e-2 * scale


def test_tied_embedding_not_rotated_stays_tied(tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base = save_llama(tmp_path / "base", tie_word_embeddings=True)
    adapter = make_llama_adapter(tmp_path / "a", base, seed=5, targets=["q_proj", "down_proj"])
    result = fold_adapter(adapter, base, tmp_path / "out")
    assert result.untied is None and not result.warnings
    assert Checkpoint(tmp_path / "out").keys() == Checkpoint(base).keys()  # no lm_head.weight invented
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    peft_model = peft_llama(base, adapter)
    with torch.no_grad():
        torch.testing.assert_close(load_llama(tmp_path / "out")(LLAMA_IDS).logits, peft_model(LLAMA_IDS).logits, rtol=1e-5, atol=1e-5)


def test_fold_refuses_an_adapter_of_another_model(llama, tmp_path):
    from oftmerge.errors import IncompatibleAdaptersError
    from oftmerge.ops.fold import fold_adapter

    with pytest.raises(
        IncompatibleAdaptersError, match=r"module 'head' .*the base model has no weight 'head.weight'; this adapter was trained on another base model"
    ):
        fold_adapter(GOLDEN / "peft-0.21.2" / "exact_bs4" / "adapter", llama["bases"]["f32"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- command line ---------------------------------------------------------------------------------


def test_cli_fold_dry_run_and_write(llama, tmp_path, capsys):
    from oftmerge.cli import main
    from oftmerge.ops.fold import fold_adapter

    adapter, base = str(llama["adapters"]["exact"]), str(llama["bases"]["f32"])
    assert main(["fold", adapter, "--base", base, "--dry-run", "--shard-size", "100KB"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing written (would write" in out and "model.layers.0.self_attn.k_proj" in out
    assert main(["fold", adapter, "--base", base, "-o", str(tmp_path / "cli"), "--shard-size", "100KB", "-q"]) == 0
    fold_adapter(adapter, base, tmp_path / "api", shard_size="100KB")
    assert digests(tmp_path / "cli") == digests(tmp_path / "api")
    assert main(["fold", adapter, "--base", base, "-o", str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_merge_fold_into(llama, tmp_path, capsys):
    from oftmerge.cli import main

    a, b, base = llama["adapters"]["neumann"], llama["adapters"]["neumann-b"], llama["bases"]["f32"]
    assert main(["merge", str(a), str(b), "--fold-into", str(base), "-o", str(tmp_path / "m")]) == 0
    assert f"wrote {(tmp_path / 'm').absolute()}" in capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    load_llama(tmp_path / "m")
    # --shard-size reaches the folded model's writer
    assert main(["merge", str(a), str(b), "--fold-into", str(base), "-o", str(tmp_path / "s"), "--shard-size", "100KB", "-q"]) == 0
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file() and not (tmp_path / "s" / "model.safetensors").exists()
    load_llama(tmp_path / "s")
