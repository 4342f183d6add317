"""PEFT OFT adapters on a diffusers UNet2DConditionModel: fold (and merge, then fold) into a diffusers model directory.

The base is a tiny ``UNet2DConditionModel`` saved by diffusers itself (one file, and sharded); the
adapters are real PEFT 0.21 OFT adapters on its attention Linears (``to_q/k/v``, ``to_out.0``),
its 1x1 ``proj_in`` convs and one 3x3 resnet conv. The oracle is PEFT's own
``PeftModel.from_pretrained(unet, adapter).merge_and_unload()``.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY_UNET as UNET

pytest.importorskip("diffusers")
pytest.importorskip("peft")

LINEAR_AND_1X1 = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a 1x1 Conv2d (use_linear_projection=False)
WITH_3X3 = [*LINEAR_AND_1X1, "down_blocks.0.resnets.0.conv1"]


def _unet(path=None):
    from diffusers import UNet2DConditionModel

    if path is not None:
        return UNet2DConditionModel.from_pretrained(str(path)).eval()
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNET).eval()


def _adapter(base, out, seed, targets):
    """A PEFT OFT adapter of the UNet at ``base`` with random generators (PEFT's ``init_weights=False``), saved to ``out``."""
    from peft import OFTConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_unet(base), OFTConfig(target_modules=targets, oft_block_size=4, r=0, init_weights=False))
    model.save_pretrained(str(out))
    return out


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def _peft_merged(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_unet(base), str(adapter)).merge_and_unload()


@pytest.fixture(scope="module")
def unet_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers-peft")
    unet = _unet()
    unet.save_pretrained(root / "unet")
    unet.save_pretrained(root / "unet-sharded", max_shard_size="300KB")
    a = _adapter(root / "unet", root / "a", 1, WITH_3X3)
    b = _adapter(root / "unet", root / "b", 2, WITH_3X3)
    plain = _adapter(root / "unet", root / "plain", 3, LINEAR_AND_1X1)
    return {"unet": root / "unet", "sharded": root / "unet-sharded", "a": a, "b": b, "plain": plain}


def _assert_state_equal(folded, theirs):
    mine, ref = folded.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for key in ref:
        err = float((mine[key] - ref[key]).abs().max())
        assert err <= 1e-6 * max(1.0, float(ref[key].abs().max())), f"{key}: {err:.2e}"


@pytest.mark.parametrize("variant", ["unet", "sharded"])
def test_fold_peft_adapter_into_diffusers_unet_equals_merge_and_unload(unet_dirs, variant, tmp_path):
    from oftmerge.ops.fold import fold_adapter

    base = unet_dirs[variant]
    result = fold_adapter(unet_dirs["a"], base, tmp_path / "out", shard_size="300KB" if variant == "sharded" else "5GB")
    assert result.base_info["library"] == "diffusers" and result.base_info["class_name"] == "UNet2DConditionModel"
    assert len(result.modules) == 37 and result.modules["down_blocks.0.resnets.0.conv1"] == "down_blocks.0.resnets.0.conv1.weight"
    # the output is a diffusers model directory: diffusers' file names, the base's config as it was
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if variant == "sharded":
        n = len(result.shards)
        index = json.loads((tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert n > 1 and sorted(set(index["weight_map"].values())) == [f"diffusion_pytorch_model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        assert set(files) == {
            "README.md", "config.json", "oftmerge.json", "oftmerge.yaml", "diffusion_pytorch_model.safetensors.index.json", *index["weight_map"].values()
        }  # fmt: skip
    else:
        assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "oftmerge.json", "oftmerge.yaml"]
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "oftmerge.json").read_text())["base"]["class_name"] == "UNet2DConditionModel"
    _assert_state_equal(_unet(tmp_path / "out"), _peft_merged(unet_dirs["unet"], unet_dirs["a"]))
    # the 3x3 conv: PEFT's unmerged forward is not its merge (the fold says so)
    assert any("down_blocks.0.resnets.0.conv1" in w and "kernels larger than 1x1" in w for w in result.warnings)


def test_fold_merge_of_two_peft_adapters_into_diffusers_unet(unet_dirs, tmp_path):
    """merge_adapters, saved and loaded by PEFT, folded: from the saved merge and from the merge in memory (merge --fold-into)."""
    import oftmerge
    from oftmerge.ops.fold import fold_adapter

    merged = oftmerge.merge_adapters([unet_dirs["a"], unet_dirs["b"]], out_dir=tmp_path / "merged")
    theirs = _peft_merged(unet_dirs["unet"], tmp_path / "merged")
    fold_adapter(tmp_path / "merged", unet_dirs["unet"], tmp_path / "from-disk")
    _assert_state_equal(_unet(tmp_path / "from-disk"), theirs)
    in_memory = oftmerge.merge_adapters([unet_dirs["a"], unet_dirs["b"]])
    fold_adapter(in_memory, unet_dirs["sharded"], tmp_path / "from-memory", shard_size="300KB")
    _assert_state_equal(_unet(tmp_path / "from-memory"), theirs)
    assert merged.saved_to == tmp_path / "merged"


def test_merge_fold_into_diffusers_unet_from_the_cli(unet_dirs, tmp_path):
    from oftmerge.cli.main import main

    assert main(["merge", str(unet_dirs["a"]), str(unet_dirs["b"]), "--fold-into", str(unet_dirs["unet"]), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
    import oftmerge

    oftmerge.merge_adapters([unet_dirs["a"], unet_dirs["b"]], out_dir=tmp_path / "merged")
    _assert_state_equal(_unet(tmp_path / "out"), _peft_merged(unet_dirs["unet"], tmp_path / "merged"))


def test_folded_unet_forward_equals_the_peft_model(unet_dirs, tmp_path):
    """Linear and 1x1 Conv2d modules: the folded UNet computes what the adapted PeftModel computes, unmerged."""
    from peft import PeftModel

    from oftmerge.ops.fold import fold_adapter

    result = fold_adapter(unet_dirs["plain"], unet_dirs["unet"], tmp_path / "out")
    assert not result.warnings
    sample, t, context = _inputs()
    peft_model = PeftModel.from_pretrained(_unet(unet_dirs["unet"]), str(unet_dirs["plain"]))
    with torch.no_grad():
        theirs = peft_model(sample, t, encoder_hidden_states=context).sample
        ours = _unet(tmp_path / "out")(sample, t, encoder_hidden_states=context).sample
        base = _unet(unet_dirs["unet"])(sample, t, encoder_hidden_states=context).sample
    scale = float(theirs.abs().max())
    assert float((ours - base).abs().max()) > 1e-3 * scale  # the adapter does change the output
    assert float((ours - theirs).abs().max()) <= 1e-5 * scale


def test_diffusers_checkpoint_names_are_not_converted(unet_dirs):
    from oftmerge.formats.checkpoint import Checkpoint
    from oftmerge.formats.shards import tie_groups, tied_embeddings

    ckpt = Checkpoint(unet_dirs["sharded"])
    assert ckpt.is_diffusers and ckpt.weights_stem == "diffusion_pytorch_model" and len(ckpt.shards) > 1
    assert not ckpt.names.renamed and ckpt.names.how.startswith("identity (a diffusers UNet2DConditionModel")
    assert tied_embeddings(unet_dirs["unet"]) is None and tie_groups(unet_dirs["unet"]) == ()
