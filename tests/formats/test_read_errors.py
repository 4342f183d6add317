"""Unreadable or malformed adapter directories: the reader's messages name the file and the fix, and a pickle
is never executed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import oftmerge
from oftmerge.errors import AdapterFormatError

from helpers import TinyNet


def test_missing_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"nope: not a directory; pass the adapter directory"):
        oftmerge.read_adapter(tmp_path / "nope")


def test_missing_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(AdapterFormatError, match=r"x/adapter_config.json: file not found"):
        oftmerge.read_adapter(tmp_path / "x")


def test_corrupt_config(pair):
    a, _ = pair
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: not valid JSON"):
        oftmerge.read_adapter(a)


def test_missing_weights(pair):
    a, _ = pair
    (a / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match=r"no adapter weights found \(looked for adapter_model.safetensors, adapter_model.bin\)"):
        oftmerge.read_adapter(a)


def test_corrupt_weights(pair):
    a, _ = pair
    (a / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFormatError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        oftmerge.read_adapter(a)


def test_bin_weights_are_read_safely(tmp_path, pair):
    a, _ = pair
    tensors = load_file(a / "adapter_model.safetensors")
    (a / "adapter_model.safetensors").unlink()
    torch.save(tensors, a / "adapter_model.bin")
    adapter = oftmerge.read_adapter(a)
    assert adapter.weights_path.name == "adapter_model.bin"
    # a pickle that is not a plain tensor dict is refused, never executed
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    (a / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(AdapterFormatError, match=r"weights_only=True.*never unpickles"):
        oftmerge.read_adapter(a)


def test_lora_adapter_points_to_decoupling(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(TinyNet(0), LoraConfig(target_modules=["lin_sq"], r=2)).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(AdapterFormatError, match=r"peft_type is 'LORA', not 'OFT'.*decoupling"):
        oftmerge.merge_adapters([tmp_path / "lora"])


def test_extra_tensors_are_refused(pair):
    """A tensor that is no rotation, bias or modules_to_save module is refused (PEFT would load it blindly)."""
    a, _ = pair
    tensors = load_file(a / "adapter_model.safetensors")
    tensors["base_model.model.lin_sq.weight"] = torch.zeros(16, 16)
    save_file(tensors, str(a / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"neither OFT rotations.*\(base_model.model.lin_sq.weight\).*modules_to_save"):
        oftmerge.read_adapter(a)


def test_a_saved_bias_is_read_as_a_saved_tensor(pair):
    a, _ = pair
    tensors = load_file(a / "adapter_model.safetensors")
    tensors["base_model.model.lin_sq.bias"] = torch.zeros(16)
    save_file(tensors, str(a / "adapter_model.safetensors"))
    assert dict(oftmerge.read_adapter(a).saved) == {"lin_sq.bias": "base_model.model.lin_sq.bias"}


def test_release_override_must_match_layout(pair):
    a, _ = pair
    with pytest.raises(AdapterFormatError, match=r"tensor layout \(packed oft_R\) does not match the release"):
        oftmerge.read_adapter(a, peft_release="0.15.2")
