"""model.merge_oft_adapters on a live PeftModel equals merging the same adapters from disk."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import oftmerge
import oftmerge.peft  # noqa: F401  (enables PeftModel.merge_oft_adapters)
from oftmerge.errors import AdapterFormatError, OftMergeError

from helpers import TinyNet, load_peft, make_oft_adapter, orthomerge_generator, peft_rotation, read_full_generator, rotated_copy


@pytest.fixture
def three(tmp_path):
    paths = []
    for seed, cfg in ((1, dict(oft_block_size=4)), (2, dict(oft_block_size=8, use_cayley_neumann=False)), (3, dict(oft_block_size=4))):
        p = tmp_path / f"a{seed}"
        make_oft_adapter(p, seed=seed, **cfg)
        paths.append(p)
    return paths


def _live(paths):
    from peft import PeftModel

    model = PeftModel.from_pretrained(TinyNet(0), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    return model.eval()


@pytest.mark.parametrize("method", ["orthomerge", "karcher", "sequential"])
def test_live_merge_equals_disk_merge(three, tmp_path, ids, method):
    model = _live(three)
    weights = [1.0, 0.5, 2.0]
    result = model.merge_oft_adapters(["a0", "a1", "a2"], weights=weights, adapter_name="merged", method=method)
    disk = oftmerge.merge_adapters(three, weights=weights, method=method, out_dir=tmp_path / "disk")
    for key, tensor in disk.tensors.items():
        assert torch.equal(result.tensors[key], tensor), key
    model.set_adapter("merged")
    reference = load_peft(tmp_path / "disk")
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    assert "merged" in model.peft_config and model.active_adapter == "merged"


def test_adapters_trained_in_session(tmp_path, ids):
    """Adapters that never touched the disk: create two, modify them in memory, merge."""
    from peft import OFTConfig, get_peft_model

    model = get_peft_model(TinyNet(0), OFTConfig(target_modules=["lin_sq", "lin_tall"], oft_block_size=4), adapter_name="x")
    model.add_adapter("y", OFTConfig(target_modules=["lin_sq"], oft_block_size=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(tmp_path / "inputs"), selected_adapters=["x", "y"])  # for the reference below
    result = model.merge_oft_adapters(["x", "y"], adapter_name="xy")
    assert set(result.modules) == {"lin_sq", "lin_tall"}
    assert sorted(result.modules["lin_sq"].inputs) == [0, 1]
    (only,) = result.modules["lin_tall"].inputs
    assert result.inputs[only].modules == 2  # x, the one adapter with lin_tall (y adapts lin_sq alone)
    assert result.config["use_cayley_neumann"] is True and result.config["num_cayley_neumann_terms"] == 5
    model.set_adapter("xy")
    model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["xy"])
    saved = load_file(tmp_path / "saved" / "xy" / "adapter_model.safetensors")
    assert set(saved) == set(result.tensors)
    # independent reference: OrthoMerge (Eq. 7-8) of the full generators for lin_sq, x's own for lin_tall,
    # through PEFT's 5-term series
    qx = {n: read_full_generator(tmp_path / "inputs" / "x", n, w) for n, w in (("lin_sq", 16), ("lin_tall", 24))}
    qy = read_full_generator(tmp_path / "inputs" / "y", "lin_sq", 16)
    expected = rotated_copy(TinyNet(0).eval(), {
        "lin_sq": peft_rotation(orthomerge_generator([qx["lin_sq"], qy], [1.0, 1.0]), neumann_terms=5),
        "lin_tall": peft_rotation(qx["lin_tall"], neumann_terms=5),
    })
    with torch.no_grad():
        assert float((expected(ids) - TinyNet(0)(ids)).abs().max()) > 1e-3  # not the identity
        torch.testing.assert_close(model(ids), expected(ids), rtol=1e-5, atol=1e-5)


def test_live_errors(three):
    model = _live(three)
    with pytest.raises(OftMergeError, match=r"no adapter named 'nope'; its adapters are: a0, a1, a2"):
        model.merge_oft_adapters(["a0", "nope"])
    with pytest.raises(OftMergeError, match=r"already has an adapter named 'a1'"):
        model.merge_oft_adapters(["a0", "a2"], adapter_name="a1")
    with pytest.raises(OftMergeError, match="no adapters given"):
        model.merge_oft_adapters([])
    from peft import LoraConfig

    # PeftModel refuses a second adapter type (PeftMixedModel allows it): register the config directly
    model.peft_config["lo"] = LoraConfig(target_modules=["lin_sq"], r=2)
    with pytest.raises(AdapterFormatError, match=r"adapter 'lo' of the live model is a LORA adapter, not OFT"):
        model.merge_oft_adapters(["a0", "lo"])


def test_live_mixed_base_models(three):
    model = _live(three)
    model.peft_config["a1"].base_model_name_or_path = "other/model"
    model.peft_config["a0"].base_model_name_or_path = "mine/model"
    with pytest.raises(OftMergeError, match="name different base models"):
        model.merge_oft_adapters(["a0", "a1"])
