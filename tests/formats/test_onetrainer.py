"""OneTrainer OFT v2 files: oftmerge's reader and writer against a re-implementation of OneTrainer's own forward.

The reference below follows OneTrainer's code, not oftmerge's (repository ``Nerogar/OneTrainer``):

* ``modules/module/oft_utils.py`` @ a44be324: ``OFTRotationModule._pytorch_skew_symmetric`` (upper
  triangle by ``triu_indices`` + ``index_put``, minus its transpose), ``_cayley_batch`` (the
  Cayley-Neumann series, built term by term with ``R.add_``), ``forward`` (``x`` reshaped to
  ``(..., r, b)``, ``einsum("...rk,rkc->...rc")``);
* ``modules/module/LoRAModule.py`` @ 9de9c447: ``OFTModule.forward`` (Linear: the layer on the rotated
  input; Conv2d: ``weight.reshape(out, r, b)``, ``einsum("ork,rkc->orc")``), ``oft_scaled`` dividing by
  ``2 sqrt(b - 1)``; @ 080ae164: the first OFT v2's divisor ``n_elements ** 0.5``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError
from oftmerge.formats.diffusion import COMPONENTS, MergedModule, detect_diffusion_format, diffusion_formats, read_diffusion_adapter
from oftmerge.formats.io import TensorDict
from oftmerge.formats.lycoris import LYCORIS
from oftmerge.formats.onetrainer import ONETRAINER, base_generator, conv_kind
from oftmerge.kernels.fold import fold_weight

F64 = torch.float64


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


# -- OneTrainer's forward, re-implemented from its source (module docstring) -----------------------------


def ot_skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(b, b, 1)
    matrix = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    batch_idx = torch.arange(vec.shape[0])[:, None]
    matrix = matrix.index_put((batch_idx, rows, cols), vec)
    return matrix - matrix.transpose(-2, -1)


def ot_cayley_batch(weight: torch.Tensor, b: int, terms: int = 5) -> torch.Tensor:
    q = ot_skew(weight, b)
    r = torch.eye(b, dtype=weight.dtype).repeat(weight.shape[0], 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            q2 = torch.bmm(q, q)
            r.add_(q2, alpha=2.0)
            power = q2
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


def ot_divisor(b: int, scaled: str | None) -> float:
    if scaled is None:
        return 1.0
    if scaled == "current":  # LoRAModule.py @ 9de9c447
        return 2 * math.sqrt(b - 1)
    return (b * (b - 1) // 2) ** 0.5  # oft_utils.py @ 080ae164: weight / n_elements ** 0.5


def ot_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vec: torch.Tensor, b: int, scaled: str | None = None) -> torch.Tensor:
    """``OFTModule.forward`` for a Linear: ``orig_forward(oft_R(x))``."""
    rot = ot_cayley_batch(vec / ot_divisor(b, scaled), b)
    xr = x.reshape(*x.shape[:-1], vec.shape[0], b)
    xr = torch.einsum("...rk,rkc->...rc", xr, rot).reshape(x.shape)
    return F.linear(xr, weight, bias)


def ot_linear_weight(weight: torch.Tensor, vec: torch.Tensor, b: int, scaled: str | None = None) -> torch.Tensor:
    """The weight the Linear forward computes with: ``y = x W'^T``."""
    return ot_linear(torch.eye(weight.shape[1], dtype=weight.dtype), weight, None, vec, b, scaled).T


def ot_conv_weight(weight: torch.Tensor, vec: torch.Tensor, b: int, scaled: str | None = None) -> torch.Tensor:
    """``OFTModule.forward`` for a Conv2d: the rotated weight passed to ``F.conv2d``."""
    rot = ot_cayley_batch(vec / ot_divisor(b, scaled), b)
    w = weight.reshape(weight.shape[0], vec.shape[0], b)
    return torch.einsum("ork,rkc->orc", w, rot).reshape(weight.shape)


# -- a small SD-like file ------------------------------------------------------------------------------

#: name -> (base weight shape, block size)
MODULES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ((48, 64), 16),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": ((40, 32), 8),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((8, 4, 3, 3), 12),  # 36 columns, blocks cross channels
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((16, 16, 1, 1), 8),
}


def base(name: str) -> torch.Tensor:
    shape, _ = MODULES[name]
    return rand(*shape, seed=list(MODULES).index(name) + 50)


def params(seed: int = 0, scale: float = 0.08) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, (shape, b)) in enumerate(MODULES.items()):
        width = math.prod(shape[1:])
        out[name] = rand(width // b, b * (b - 1) // 2, seed=seed * 100 + i, scale=scale)
    return out


def tensors_of(vecs: dict[str, torch.Tensor], *, marker: bool = False, dotted: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, vec in vecs.items():
        stem = name
        if dotted:  # OneTrainer's INTERNAL naming: <prefix>.<module path>
            prefix = next(p for p in ("lora_unet_", "lora_te1_") if name.startswith(p))
            stem = prefix[:-1] + "." + name[len(prefix) :].replace("_", ".")
        out[f"{stem}.oft_R.weight"] = vec
        if marker:
            out[f"{stem}.oft_R.scaled_oft"] = torch.tensor(True)
    return out


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    return ONETRAINER.read(Path("ot.safetensors"), TensorDict(tensors, "ot.safetensors"), metadata or {})


def folded(adapter, name: str, weight: torch.Tensor, generator: torch.Tensor | None = None) -> torch.Tensor:
    g = adapter.generator(name) if generator is None else generator
    return fold_weight(weight, adapter.rotation_map.rotation(g), adapter.modules[name].spec(adapter.side))


def reference(name: str, weight: torch.Tensor, vec: torch.Tensor, scaled: str | None = None) -> torch.Tensor:
    """The weight OneTrainer computes with; ``proj_in`` taken as the Linear of SD 2.x / SDXL (its weight viewed 2-D)."""
    b = MODULES[name][1]
    if conv_kind(name) is None:
        return ot_linear_weight(weight.reshape(weight.shape[0], -1), vec, b, scaled).reshape(weight.shape)
    return ot_linear_weight(weight, vec, b, scaled) if weight.dim() == 2 else ot_conv_weight(weight, vec, b, scaled)


# -- reading ------------------------------------------------------------------------------------------------


def test_registered_and_detected(tmp_path):
    assert diffusion_formats()["onetrainer"] is ONETRAINER
    path = tmp_path / "ot.safetensors"
    save_file({k: v.float().contiguous() for k, v in tensors_of(params(), marker=True).items()}, str(path))
    adapter = read_diffusion_adapter(path)
    assert adapter.format == "onetrainer" and adapter.side == "input"
    assert adapter.rotation_map.kind == "neumann" and adapter.rotation_map.terms == 5 and adapter.rotation_map.variant == "0.18"
    assert set(adapter.modules) == set(MODULES)
    lyco = {"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2), "lora_unet_x.alpha": torch.tensor(0.0)}
    assert detect_diffusion_format(path, list(lyco)).name == "lycoris"


@pytest.mark.parametrize("scaled", [None, "current"])
def test_generators_reproduce_onetrainers_forward(scaled):
    vecs = params(seed=1)
    adapter = read(tensors_of(vecs, marker=scaled is not None), {"ot_config": json.dumps({"oft_scaled": scaled is not None})})
    assert not [n for n in adapter.notes if "divisor" in n]
    for name in (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_down_blocks_0_resnets_0_conv1",
    ):
        w = base(name)
        mod = adapter.modules[name]
        assert mod.num_blocks * mod.block_size == math.prod(w.shape[1:])
        assert mod.extra["conv"] is (w.dim() == 4)
        torch.testing.assert_close(folded(adapter, name, w), reference(name, w, vecs[name], scaled), atol=1e-6, rtol=0)
    # the Linear forward itself: the layer on the rotated input equals the layer with the folded weight
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    w, bias, x = base(name), rand(48, seed=5), rand(3, 7, 64, seed=6)
    torch.testing.assert_close(F.linear(x, folded(adapter, name, w), bias), ot_linear(x, w, bias, vecs[name], 16, scaled), atol=1e-6, rtol=0)
    # the Conv2d forward: F.conv2d with the folded weight equals OneTrainer's rotated-weight convolution
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w, img = base(name), rand(2, 4, 6, 6, seed=7)
    torch.testing.assert_close(
        F.conv2d(img, folded(adapter, name, w), padding=1), F.conv2d(img, ot_conv_weight(w, vecs[name], 12, scaled), padding=1), atol=1e-6, rtol=0
    )


def test_first_ot_v2_divisor_from_the_train_config():
    vecs = params(seed=2)
    adapter = read(tensors_of(vecs, marker=True), {"ot_config": json.dumps({"scaled_oft": True, "oft_coft": True})})
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert adapter.modules[name].extra["scale_rule"] == "sqrt(b(b-1)/2)"
    torch.testing.assert_close(folded(adapter, name, base(name)), reference(name, base(name), vecs[name], "first"), atol=1e-6, rtol=0)
    assert any("COFT" in n for n in adapter.notes)


def test_scaled_without_train_config_uses_todays_divisor_and_says_so():
    vecs = params(seed=3)
    adapter = read(tensors_of(vecs, marker=True))
    name = "lora_te1_text_model_encoder_layers_0_mlp_fc1"  # b = 8: both rules agree
    torch.testing.assert_close(folded(adapter, name, base(name)), reference(name, base(name), vecs[name], "first"), atol=1e-6, rtol=0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    torch.testing.assert_close(folded(adapter, name, base(name)), reference(name, base(name), vecs[name], "current"), atol=1e-6, rtol=0)
    assert any("2*sqrt(b-1)" in n for n in adapter.notes)


@pytest.mark.parametrize(
    ("metadata", "hint"), [({"modelspec.architecture": "stable-diffusion-v1/lora"}, True), ({"ss_base_model_version": "sdxl_"}, False), ({}, None)]
)
def test_proj_in_is_read_in_the_linear_convention(metadata, hint):
    vecs = params(seed=4)
    adapter = read(tensors_of(vecs), metadata)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    mod = adapter.modules[name]
    assert mod.extra["conv"] is None and mod.extra["conv_hint"] is hint
    assert any("proj_in" in n for n in adapter.notes)
    w = base(name)  # SD 1.x: a 1x1 Conv2d, OneTrainer computes W R; a fold negates the generator for a 4-D base weight
    g = base_generator(mod, adapter.generator(name), w)
    torch.testing.assert_close(g, -adapter.generator(name), atol=0, rtol=0)
    torch.testing.assert_close(folded(adapter, name, w, g), ot_conv_weight(w, vecs[name], 8), atol=1e-6, rtol=0)
    w2 = w.reshape(16, 16)  # SD 2.x / SDXL: a Linear, W R^T, the generator as read
    torch.testing.assert_close(
        folded(adapter, name, w2, base_generator(mod, adapter.generator(name), w2)), ot_linear_weight(w2, vecs[name], 8), atol=1e-6, rtol=0
    )
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # a known Conv2d: already in its own convention
    torch.testing.assert_close(base_generator(adapter.modules[conv], adapter.generator(conv), base(conv)), adapter.generator(conv), atol=0, rtol=0)
    lyco = LYCORIS.read(Path("l"), TensorDict({"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2), "lora_unet_x.alpha": torch.tensor(0.0)}, "l"), {})
    z = torch.ones(2, 2, 2, dtype=F64)
    assert base_generator(lyco.modules["lora_unet_x"], z, torch.zeros(4, 1, 1, 1)) is z


def test_conv_sign_is_the_series_transpose():
    q = ot_skew(rand(3, 6, seed=8, scale=0.2), 4)
    rmap = ONETRAINER.rotation_map()
    torch.testing.assert_close(rmap.rotation(-q), rmap.rotation(q).transpose(-1, -2), atol=1e-14, rtol=0)


def test_dotted_internal_naming_and_lycoris_names_agree():
    vecs = params(seed=5)
    legacy, dotted = read(tensors_of(vecs)), read(tensors_of(vecs, dotted=True))
    assert set(dotted.modules) == set(legacy.modules) == set(MODULES)
    for name in MODULES:
        torch.testing.assert_close(dotted.generator(name), legacy.generator(name), atol=0, rtol=0)
        assert name.startswith(tuple(COMPONENTS))
    lyco = {}
    for name in MODULES:
        lyco[f"{name}.oft_blocks"] = torch.zeros(4, 2, 2)
        lyco[f"{name}.alpha"] = torch.tensor(0.0)
    assert set(LYCORIS.read(Path("l.safetensors"), TensorDict(lyco, "l"), {}).modules) == set(legacy.modules)


def test_conv_kind():
    assert conv_kind("lora_unet_conv_in") and conv_kind("lora_unet_up_blocks_1_upsamplers_0_conv") and conv_kind("lora_unet_mid_block_resnets_1_conv_shortcut")
    assert conv_kind("lora_unet_down_blocks_0_resnets_0_time_emb_proj") is False
    assert conv_kind("lora_te2_text_model_encoder_layers_3_self_attn_k_proj") is False
    assert conv_kind("lora_unet_mid_block_attentions_0_proj_out") is None


def test_musubi_alpha_and_metadata_tensors_are_read():
    vecs = params(seed=6)
    t = tensors_of(vecs, marker=True)
    for name, (_, b) in MODULES.items():
        t[f"{name}.alpha"] = torch.tensor(float(b))
        t[f"{name}.oft_block_size_metadata"] = torch.tensor(float(b))
        t[f"{name}.oft_block_share_metadata"] = torch.tensor(0.0)
        t[f"{name}.scaled_oft_metadata"] = torch.tensor(1.0)
    adapter = read(t)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert adapter.modules[name].alpha == 12.0 and adapter.modules[name].constraint is None
    torch.testing.assert_close(folded(adapter, name, base(name)), reference(name, base(name), vecs[name], "current"), atol=1e-6, rtol=0)


def test_single_block_modules_are_noted():
    t = {"lora_te1_text_model_encoder_layers_0_mlp_fc2.oft_R.weight": rand(1, 28, seed=9, scale=0.05)}
    adapter = read(t)
    assert adapter.modules["lora_te1_text_model_encoder_layers_0_mlp_fc2"].num_blocks == 1
    assert any("one block" in n for n in adapter.notes)


def test_clipped_rotation_accepted_only_where_the_clip_is_not_reached():
    name = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    small = {f"{name}.oft_R.weight": rand(4, 28, seed=10, scale=0.01), f"{name}.oft_R.clipped_oft": torch.tensor(0.95)}
    read(small).generator(name)
    big = {f"{name}.oft_R.weight": rand(4, 28, seed=10, scale=2.0), f"{name}.oft_R.clipped_oft": torch.tensor(0.95)}
    with pytest.raises(AdapterFormatError, match="power-iteration"):
        read(big).generator(name)


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        ({"unet.input_blocks.1.1.proj_in.oft_R.weight": torch.zeros(2, 28)}, {}, "OMI"),
        ({"lora_transformer_single_blocks_0_attn_to_q.oft_R.weight": torch.zeros(2, 28)}, {}, "U-Net or CLIP"),
        ({"lora_unet_x.oft_R.weight": torch.zeros(2, 27)}, {}, "packed upper triangles"),
        ({"lora_unet_x.oft_R.weight": torch.zeros(2, 28), "lora_unet_x.dora_scale": torch.ones(5)}, {}, "DoRA-OFT"),
        ({"lora_unet_x.oft_R.weight": torch.zeros(2, 28), "lora_unet_x.oft_R.cans_oft": torch.tensor(True)}, {}, "CANS"),
        ({"lora_unet_x.oft_R.weight": torch.zeros(2, 28)}, {"ot_config": json.dumps({"oft_block_share": True})}, "block_share"),
        ({"lora_unet_x.oft_R.weight": torch.zeros(2, 28), "lora_unet_x.oft_block_size_metadata": torch.tensor(4.0)}, {}, "block size 4"),
        ({"lora_unet_x.oft_R.scaled_oft": torch.tensor(True)}, {}, "incomplete"),
        ({"lora_unet_x.oft_R.weight": torch.zeros(2, 28), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, {}, "unknown tensor"),
    ],
)
def test_refused_in_one_line(tensors, metadata, match):
    with pytest.raises(AdapterFormatError, match=match):
        read(tensors, metadata)


# -- writing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [None, "current"])
def test_write_round_trip(scaled):
    vecs = params(seed=11)
    adapter = read(tensors_of(vecs, marker=scaled is not None))
    merged = [MergedModule(name, adapter.generator(name)) for name in adapter.modules]
    ONETRAINER.check_writable(merged, "test")
    written = ONETRAINER.write_tensors(merged, torch.float64)
    assert set(written) == {f"{name}.oft_R.weight" for name in MODULES}  # unscaled, no marker
    again = read(written)
    for name in MODULES:
        torch.testing.assert_close(again.generator(name), adapter.generator(name), atol=1e-12, rtol=0)
        w = base(name)
        if conv_kind(name) is None:
            w = w.reshape(w.shape[0], -1)  # read (and written) in the Linear convention
        # what OneTrainer's forward computes from the written file (no marker: unscaled) is what it computed from the input
        want = reference(name, w, vecs[name], scaled)
        torch.testing.assert_close(reference(name, w, written[f"{name}.oft_R.weight"]), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(folded(again, name, w), want, atol=1e-6, rtol=0)


def test_check_writable_refusals():
    g = ot_skew(rand(2, 6, seed=12, scale=0.1), 4)
    with pytest.raises(IncompatibleAdaptersError, match="rescale"):
        ONETRAINER.check_writable([MergedModule("lora_unet_a", g, torch.full((8,), 1.1))], "here")
    with pytest.raises(IncompatibleAdaptersError, match="OneTrainer name"):
        ONETRAINER.check_writable([MergedModule("lycoris_a", g)], "here")
    with pytest.raises(IncompatibleAdaptersError, match="skew"):
        ONETRAINER.check_writable([MergedModule("lora_unet_a", g + torch.eye(4, dtype=F64))], "here")
    ONETRAINER.check_writable([MergedModule("lora_unet_a", g, torch.ones(8))], "here")
