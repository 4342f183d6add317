"""Bad input to a merge: one exception family, messages that name the module and the fix; nothing lost.

(Unreadable or malformed adapter directories: formats/test_read_errors.py.)"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import oftmerge
from oftmerge.errors import (
    AdapterFormatError,
    FileSystemError,
    HubError,
    IncompatibleAdaptersError,
    NumericalError,
    OftMergeError,
    OutputExistsError,
)

from helpers import TinyNet, make_oft_adapter


def _tree_digest(path):
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_every_error_is_a_value_error():
    for cls in (AdapterFormatError, IncompatibleAdaptersError, NumericalError, OutputExistsError, FileSystemError, HubError):
        assert issubclass(cls, OftMergeError) and issubclass(cls, ValueError)
    assert issubclass(FileSystemError, OSError)  # what ``except OSError`` caught before still catches it
    assert {c.exit_code for c in (AdapterFormatError, NumericalError, OutputExistsError)} == {2}
    assert (FileSystemError.exit_code, HubError.exit_code) == (3, 4)


def test_different_widths_mean_different_base_models(pair):
    a, b = pair
    tensors = load_file(b / "adapter_model.safetensors")
    key = "base_model.model.lin_sq.oft_R.weight"
    tensors[key] = torch.cat([tensors[key], tensors[key]])  # 8 blocks of 4: a 32-wide layer
    save_file(tensors, str(b / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'lin_sq': the adapters disagree on the layer's width.*width 16.*width 32"):
        oftmerge.merge_adapters([a, b])


def test_different_base_model_names(pair):
    a, b = pair
    for path, name in ((a, "me/base-model"), (b, "someone/other-model")):
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = name
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleAdaptersError, match=r"name different base models.*someone/other-model.*--allow-base-mismatch"):
        oftmerge.merge_adapters([a, b])
    assert oftmerge.merge_adapters([a, b], allow_base_mismatch=True).modules


def test_adapter_for_another_base_is_caught_with_base_given(tmp_path, pair):
    a, _ = pair
    base = tmp_path / "base"
    base.mkdir()
    state = {k: v for k, v in TinyNet(0).state_dict().items() if not k.startswith("lin_sq")}
    state["lin_sq.weight"] = torch.zeros(16, 32)
    save_file(state, str(base / "model.safetensors"))
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'lin_sq'.*does not fit base weight lin_sq.weight of shape \(16, 32\)"):
        oftmerge.merge_adapters([a], base=base)


def test_nan_in_input(pair):
    a, b = pair
    tensors = load_file(b / "adapter_model.safetensors")
    tensors["base_model.model.lin_wide.oft_R.weight"][0, 0] = math.nan
    save_file(tensors, str(b / "adapter_model.safetensors"))
    with pytest.raises(NumericalError, match=r"module 'lin_wide'.*NaN or Inf"):
        oftmerge.merge_adapters([a, b], out_dir=b.parent / "out")
    assert not (b.parent / "out").exists()


def test_block_share_with_different_blocks_needs_the_base(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1, oft_block_size=4, block_share=True)
    make_oft_adapter(b, seed=2, oft_block_size=8, block_share=True)
    with pytest.raises(IncompatibleAdaptersError, match=r"block_share adapters do not store the layer width.*--base"):
        oftmerge.merge_adapters([a, b])
    base = tmp_path / "base"
    base.mkdir()
    save_file(TinyNet(0).state_dict(), str(base / "model.safetensors"))
    result = oftmerge.merge_adapters([a, b], base=base)
    assert result.block_config.sizes == {"lin_sq": 8, "lin_tall": 8, "lin_wide": 8}


def test_existing_output_is_never_overwritten(pair):
    a, b = pair
    out = a.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match=r"out: already exists;.*--overwrite"):
        oftmerge.merge_adapters([a, b], out_dir=out)
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces an earlier output, never a directory of someone's files
    with pytest.raises(OftMergeError, match=r"out: exists and is a directory with 1 entries and none of .*not an earlier output"):
        oftmerge.merge_adapters([a, b], out_dir=out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    oftmerge.merge_adapters([a, b], out_dir=out.parent / "merged")
    oftmerge.merge_adapters([a, b], out_dir=out.parent / "merged", overwrite=True)
    assert (out.parent / "merged" / "adapter_model.safetensors").exists()


def test_output_over_an_input_is_refused_even_with_overwrite(pair):
    a, b = pair
    before = _tree_digest(a)
    with pytest.raises(OftMergeError, match=r"would replace input adapter.*inputs are never modified"):
        oftmerge.merge_adapters([a, b], out_dir=a, overwrite=True)
    assert _tree_digest(a) == before


def test_inputs_are_never_modified(pair, tmp_path):
    a, b = pair
    digests = [_tree_digest(a), _tree_digest(b)]
    oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m", method="karcher")
    assert [_tree_digest(a), _tree_digest(b)] == digests


def test_failed_write_leaves_nothing(pair, monkeypatch):
    a, b = pair
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    out = a.parent / "out"
    with pytest.raises(OSError, match="disk full"):
        oftmerge.merge_adapters([a, b], out_dir=out)
    assert not out.exists()
    assert sorted(p.name for p in a.parent.iterdir()) == ["a", "b"]  # no temporary directory left behind


def test_all_zero_generators_give_the_identity(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1, std=0.0)
    make_oft_adapter(b, seed=2, std=0.0)
    result = oftmerge.merge_adapters([a, b])
    assert all(torch.equal(t, torch.zeros_like(t)) for t in result.tensors.values())
    assert result.warnings == []


def test_cancelling_generators_warn_and_stay_finite(pair):
    a, b = pair
    tensors = {k: -v for k, v in load_file(a / "adapter_model.safetensors").items()}
    save_file(tensors, str(b / "adapter_model.safetensors"))
    result = oftmerge.merge_adapters([a, b])
    assert all(torch.isfinite(t).all() for t in result.tensors.values())
    assert any("(nearly) cancel" in w for w in result.warnings)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights=[1.0]), r"got 1 weights for 2 adapters"),
        (dict(weights=[1.0, 0.0]), r"weight 0.0 for .*b: weights must be finite and non-zero"),
        (dict(weights=[1.0, math.inf]), r"weights must be finite"),
        (dict(method="ties"), r"unknown merge method 'ties'; choose one of: orthomerge"),
        (dict(method_options={"foo": 1}), r"method 'orthomerge' has no option 'foo'"),
        (dict(cayley="neumann:x"), r"expected neumann:N with an integer N"),
        (dict(cayley="bogus"), r"cayley must be 'auto', 'exact', 'neumann' or 'neumann:N'"),
        (dict(scale=math.nan), r"scale must be a finite number"),
    ],
)
def test_bad_arguments(pair, kwargs, message):
    with pytest.raises(OftMergeError, match=message):
        oftmerge.merge_adapters(list(pair), **kwargs)


def test_no_adapters():
    with pytest.raises(OftMergeError, match="no adapters given"):
        oftmerge.merge_adapters([])


