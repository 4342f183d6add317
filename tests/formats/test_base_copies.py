"""PEFT's copies of base embeddings (``save_embedding_layers``): kept for the modules an adapter adapts, accepted and
ignored for the ones another adapter of the same model wraps (PEFT's default ``"auto"`` saves both)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import oftmerge
from oftmerge.errors import IncompatibleAdaptersError

from helpers import TinyNet, load_llama, make_oft_adapter, save_llama

EMB_COPY = "base_model.model.emb.base_layer.weight"


def _with_emb_copy(path, copy: torch.Tensor):
    tensors = load_file(path / "adapter_model.safetensors")
    tensors[EMB_COPY] = copy
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_a_copy_of_an_embedding_the_adapter_does_not_adapt_is_ignored(tmp_path):
    make_oft_adapter(tmp_path / "a", seed=1)  # lin_sq, lin_wide, lin_tall; another adapter would wrap emb
    a = _with_emb_copy(tmp_path / "a", TinyNet(0).emb.weight.detach().clone())
    read = oftmerge.read_adapter(a)
    assert "emb" not in read.modules and dict(read.saved) == {} and dict(read.saved_base) == {}
    assert dict(read.base_copies) == {"emb": EMB_COPY}
    # nothing of it in the output: merging one adapter gives its rotations only
    result = oftmerge.merge_adapters([a], out_dir=tmp_path / "m")
    assert EMB_COPY not in result.tensors and EMB_COPY not in load_file(tmp_path / "m" / "adapter_model.safetensors")
    # checked against the base when given: a copy of another shape means a resized vocabulary
    shapes = {k: tuple(v.shape) for k, v in TinyNet(0).state_dict().items()}
    assert dict(oftmerge.read_adapter(a, base_shapes=shapes).base_copies) == {"emb": EMB_COPY}
    with pytest.raises(IncompatibleAdaptersError, match=r"emb.base_layer.weight is PEFT's copy of base weight emb.weight with "
                       r"shape \(20, 16\), but the base model stores emb.weight with shape \(21, 16\).*resized vocabulary"):
        oftmerge.read_adapter(a, base_shapes={**shapes, "emb.weight": (21, 16)})


def test_merge_compares_copies_of_adapted_and_unadapted_inputs(tmp_path):
    emb = TinyNet(0).emb.weight.detach().clone()
    make_oft_adapter(tmp_path / "a", seed=1)  # lin_* only, but holds a copy of emb (another adapter wraps it)
    make_oft_adapter(tmp_path / "b", seed=2, targets=("emb", "lin_sq"), use_cayley_neumann=False)
    a, b = _with_emb_copy(tmp_path / "a", emb), _with_emb_copy(tmp_path / "b", emb)
    result = oftmerge.merge_adapters([a, b])
    assert torch.equal(result.tensors[EMB_COPY], emb)  # b's copy: b adapts emb
    _with_emb_copy(a, emb + 1.0)
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'emb': the adapters saved different copies of its base weight"):
        oftmerge.merge_adapters([a, b])
    _with_emb_copy(a, torch.cat([emb, emb[:1]]))  # a resized vocabulary
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'emb': .* \[21, 16\].*resized vocabularies"):
        oftmerge.merge_adapters([a, b])


def test_adapters_saved_by_peft_with_its_defaults_merge_like_the_live_model(tmp_path):
    """Two adapters of one PeftModel, saved by PEFT's ``save_pretrained`` with its defaults: the one on ``lm_head``
    also holds a copy of ``embed_tokens``, which the other wraps. Merged from disk = merged live."""
    from peft import OFTConfig, get_peft_model

    import oftmerge.peft  # noqa: F401

    base = save_llama(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_llama(base), OFTConfig(target_modules=["q_proj", "lm_head"], oft_block_size=8), adapter_name="a")
        model.add_adapter("b", OFTConfig(target_modules=["q_proj", "embed_tokens"], oft_block_size=8))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "oft_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(tmp_path / "saved", selected_adapters=["a", "b"])
        live = model.merge_oft_adapters(["a", "b"], adapter_name="ab")
    a, b = tmp_path / "saved" / "a", tmp_path / "saved" / "b"
    assert {k for k in load_file(a / "adapter_model.safetensors") if "base_layer" in k} == {
        "base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.base_layer.weight"}  # fmt: skip
    assert dict(oftmerge.read_adapter(a).base_copies) == {"model.embed_tokens": "base_model.model.model.embed_tokens.base_layer.weight"}
    disk = oftmerge.merge_adapters([a, b])
    # the live state dicts carry no copies of base embeddings; the disk merge keeps the copies of the adapted modules
    assert not any(k.endswith(".base_layer.weight") for k in live.tensors)
    assert {k for k in disk.tensors if k.endswith(".base_layer.weight")} == {
        "base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.base_layer.weight"}  # fmt: skip
    assert {k for k in disk.tensors if not k.endswith(".base_layer.weight")} == live.tensors.keys()
    for key, tensor in live.tensors.items():
        assert torch.equal(disk.tensors[key], tensor), key
