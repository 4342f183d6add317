"""Folding diffusion OFT files into diffusers models and pipelines (:mod:`oftmerge.ops.diffusion_fold`).

Oracles: LyCORIS 4.1.3 itself (its files are made by ``create_lycoris`` / ``lycoris.kohya.create_network``
with random blocks and saved by its own ``save_weights``; its own loaders ``create_lycoris_from_weights`` /
``create_network_from_weights`` merge them with ``merge_to`` or apply them unmerged) and, for sd-scripts'
own OFT files, a re-implementation of ``networks/oft.py``'s ``create_network_from_weights`` +
``OFTInfModule.merge_to`` (kohya-ss/sd-scripts at 077f6a4) written here from its source. The models
are a tiny ``UNet2DConditionModel`` and ``CLIPTextModel`` built here and saved by diffusers / transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")

from oftmerge.errors import IncompatibleAdaptersError  # noqa: E402
from oftmerge.formats.diffusion import read_diffusion_adapter  # noqa: E402
from oftmerge.ops.diffusion_fold import fold_diffusion  # noqa: E402

from helpers import TINY_UNET as UNET  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

#: an SDXL-shaped U-Net (two layers per block, text_time added conditioning, linear projections), tiny
SDXL_UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    in_channels=4,
    out_channels=4,
)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, max_position_embeddings=16,
            projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
#: LyCORIS's "full" preset before it added Anima's "TimestepEmbedding" module class, which makes lycoris.kohya wrap
#: diffusers' time_embedding.linear_1 twice (an AssertionError "duplicated lora name" on every SD U-Net)
KOHYA_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def _unet(path=None, config=UNET):
    from diffusers import UNet2DConditionModel

    if path is not None:
        return UNet2DConditionModel.from_pretrained(str(path)).eval()
    torch.manual_seed(0)
    return UNet2DConditionModel(**config).eval()


def _clip(path=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    if path is not None:
        return CLIPTextModel.from_pretrained(str(path)).eval()
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(**CLIP)).eval()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny SD-style pipeline directory (unet, text_encoder, and folders copied as they are), and an SDXL-shaped U-Net."""
    root = tmp_path_factory.mktemp("diffusion-fold")
    pipe = root / "pipeline"
    _unet().save_pretrained(pipe / "unet")
    _clip().save_pretrained(pipe / "text_encoder")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    (pipe / "tokenizer").mkdir()
    (pipe / "tokenizer" / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(100)}))
    (pipe / "vae").mkdir()
    (pipe / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    from safetensors.torch import save_file

    save_file({"decoder.conv_in.weight": torch.randn(8, 4, 3, 3)}, pipe / "vae" / "diffusion_pytorch_model.safetensors")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None],
    }))  # fmt: skip
    _unet(config=SDXL_UNET).save_pretrained(root / "sdxl-unet")
    preset = root / "preset.toml"
    preset.write_text(KOHYA_PRESET)
    return {"root": root, "pipeline": pipe, "unet": pipe / "unet", "text_encoder": pipe / "text_encoder", "sdxl": root / "sdxl-unet", "preset": preset}


# -- making files with LyCORIS, applying them with LyCORIS --------------------------------------------


def _randomize(loras, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in loras:
            lora.oft_blocks.copy_(torch.randn(lora.oft_blocks.shape, generator=g) * scale)
            if getattr(lora, "rescaled", False):
                lora.rescale.copy_(1 + 0.1 * torch.randn(lora.rescale.shape, generator=g))


def _lycoris_file(path, model, *, seed=0, algo="diag-oft", dim=4, **kwargs):
    """A file of LyCORIS's generic wrapper (``lycoris_`` names) on ``model``, random blocks, saved by LyCORIS."""
    from lycoris import create_lycoris

    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=1, algo=algo, **kwargs)
    net.apply_to()
    _randomize(net.loras, seed)
    net.save_weights(str(path), torch.float32, {})
    return path


@contextlib.contextmanager
def _kohya_preset(preset):
    """LyCORIS's kohya network keeps its targets in class attributes: set the preset, restore them afterwards."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.utils.preset import read_preset

    names = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME")
    saved = {n: getattr(LycorisNetworkKohya, n) for n in names}
    LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(LycorisNetworkKohya, n, v)


def _kohya_file(path, text_encoder, unet, preset, *, seed=0, dim=4, **kwargs):
    """A file of ``lycoris.kohya`` (what sd-scripts saves with --network_module lycoris.kohya: ``lora_unet_`` / ``lora_te_``)."""
    from lycoris.kohya import create_network

    with _kohya_preset(preset):
        net = create_network(1.0, dim, 1, None, text_encoder, unet, algo="diag-oft", preset=str(preset), **kwargs)
        net.apply_to(text_encoder, unet, text_encoder is not None, unet is not None)
    _randomize(net.loras, seed)
    net.save_weights(str(path), torch.float32, {})
    return path


def _lycoris_merged(file, model):
    """``model`` with ``file`` merged by LyCORIS's own loader and ``merge_to``."""
    from lycoris import create_lycoris_from_weights

    net, _ = create_lycoris_from_weights(1.0, str(file), model)
    assert net.loras, "LyCORIS loaded no module of the file"
    net.merge_to(1.0)
    return model


def _lycoris_applied(file, model):
    """``model`` with ``file`` applied unmerged by LyCORIS (its forward computes the adapted weights)."""
    from lycoris import create_lycoris_from_weights

    net, _ = create_lycoris_from_weights(1.0, str(file), model)
    net.apply_to()
    return model


def _kohya_merged(file, text_encoder, unet, preset):
    from lycoris.kohya import create_network_from_weights
    from safetensors.torch import load_file

    with _kohya_preset(preset):
        net, sd = create_network_from_weights(1.0, str(file), None, text_encoder, unet)
    assert net.unet_loras or net.text_encoder_loras
    net.merge_to(text_encoder, unet, sd or load_file(file), torch.float32, "cpu")
    return text_encoder, unet


def _assert_state_close(ours, theirs, tol=1e-5):
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for key in ref:
        err = float((mine[key] - ref[key]).abs().max())
        assert err <= tol * max(1.0, float(ref[key].abs().max())), f"{key}: {err:.2e}"


def _unet_forward(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return model(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), encoder_hidden_states=torch.randn(2, 5, 32, generator=g)).sample


def _clip_forward(model):
    with torch.no_grad():
        return model(torch.tensor([[0, 5, 9, 33, 2], [0, 7, 7, 2, 1]])).last_hidden_state


def _assert_forward_close(ours, theirs, tol=1e-4):
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= tol * scale


def _untouched_identical(base_dir, out_dir, folded_keys):
    """Every tensor the fold did not rotate (biases included) is the base's, byte for byte."""
    from oftmerge.formats.checkpoint import Checkpoint

    a, b = Checkpoint(base_dir), Checkpoint(out_dir)
    assert set(a.keys()) == set(b.keys())
    for key in set(a.keys()) - set(folded_keys):
        assert a.raw(key).read().view(torch.uint8).equal(b.raw(key).read().view(torch.uint8)), key


# -- LyCORIS files folded into a U-Net directory ------------------------------------------------------

CASES = {
    "diag-oft": dict(algo="diag-oft"),
    "diag-oft-constrained": dict(algo="diag-oft", constraint=0.005),
    "diag-oft-rescaled": dict(algo="diag-oft", rescaled=True),
    "boft-rescaled": dict(algo="boft", rescaled=True),
}


@pytest.mark.parametrize("case", CASES)
def test_lycoris_file_folded_into_unet_equals_lycoris_merge(bases, case, tmp_path):
    kwargs = dict(CASES[case])
    file = _lycoris_file(tmp_path / "oft.safetensors", _unet(bases["unet"]), seed=len(case), **kwargs)
    read = read_diffusion_adapter(file)
    if "constraint" in kwargs:  # the clamp is active: ||A - A^T|| is above alpha * out for some modules
        active = [n for n, m in read.modules.items() if m.constraint and float(torch.linalg.norm((r := read.raw(n)) - r.transpose(-1, -2))) > m.constraint]
        assert len(active) > 10
    if kwargs["algo"] == "boft":
        assert read.algo == "boft" and max(m.stages for m in read.modules.values()) >= 2
    result = fold_diffusion(file, bases["unet"], tmp_path / "out")
    assert result.layout == "model" and len(result.modules) == len(read.modules) == 83
    # Linear, 1x1 Conv2d (proj_in) and 3x3 Conv2d modules
    assert {"lycoris_down_blocks_0_attentions_0_proj_in", "lycoris_down_blocks_0_resnets_0_conv1", "lycoris_conv_in"} <= set(result.modules)
    assert result.modules["lycoris_down_blocks_0_resnets_0_conv1"] == "down_blocks.0.resnets.0.conv1.weight"
    folded = _unet(tmp_path / "out")
    _assert_state_close(folded, _lycoris_merged(file, _unet(bases["unet"])))
    _assert_forward_close(_unet_forward(folded), _unet_forward(_lycoris_applied(file, _unet(bases["unet"]))))
    _untouched_identical(bases["unet"], tmp_path / "out", result.modules.values())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((bases["unet"] / "config.json").read_text())
    record = json.loads((tmp_path / "out" / "oftmerge.json").read_text())
    assert record["kind"] == "folded diffusion model" and record["source"]["sha256"] == _digest(file) and record["source"]["format"] == "lycoris"
    assert record["base"]["class_name"] == "UNet2DConditionModel" and len(record["modules"]) == 83


def test_merge_in_memory_is_folded_like_its_file(bases, tmp_path):
    """A DiffusionAdapter object (what a merge gives) folds as the file it came from; its provenance can be given."""
    file = _lycoris_file(tmp_path / "oft.safetensors", _unet(bases["unet"]), seed=3)
    fold_diffusion(file, bases["unet"], tmp_path / "from-file")
    result = fold_diffusion(read_diffusion_adapter(file), bases["unet"], tmp_path / "from-object", source={"method": "orthomerge", "inputs": []})
    _assert_state_close(_unet(tmp_path / "from-object"), _unet(tmp_path / "from-file"), tol=0)
    assert json.loads((tmp_path / "from-object" / "oftmerge.json").read_text())["source"] == {"method": "orthomerge", "inputs": []}
    assert result.out_dir == tmp_path / "from-object"


def test_sharded_output_and_dry_run(bases, tmp_path):
    file = _lycoris_file(tmp_path / "oft.safetensors", _unet(bases["unet"]), seed=4)
    plan = fold_diffusion(file, bases["unet"], None, dry_run=True, shard_size="400KB")
    assert plan.dry_run and len(plan.shards) > 1 and len(plan.modules) == 83 and not (tmp_path / "out").exists()
    assert "lycoris_conv_in" in plan.summary()
    result = fold_diffusion(file, bases["unet"], tmp_path / "out", shard_size="400KB")
    index = json.loads((tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(result.shards) == len(plan.shards)
    _assert_state_close(_unet(tmp_path / "out"), _lycoris_merged(file, _unet(bases["unet"])))
    with pytest.raises(Exception, match="already exists"):
        fold_diffusion(file, bases["unet"], tmp_path / "out")
    fold_diffusion(file, bases["unet"], tmp_path / "out", overwrite=True)  # an earlier output is replaced


def test_lycoris_file_of_a_text_encoder_folded_into_its_folder(bases, tmp_path):
    file = _lycoris_file(tmp_path / "te.safetensors", _clip(bases["text_encoder"]), seed=5, rescaled=True)
    result = fold_diffusion(file, bases["text_encoder"], tmp_path / "out")
    assert result.modules["lycoris_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj.weight"
    folded = _clip(tmp_path / "out")
    _assert_state_close(folded, _lycoris_merged(file, _clip(bases["text_encoder"])))
    _assert_forward_close(_clip_forward(folded), _clip_forward(_lycoris_applied(file, _clip(bases["text_encoder"]))))
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- kohya-style files (lora_unet_ / lora_te_) folded into a pipeline ---------------------------------


def test_kohya_style_file_folded_into_pipeline_equals_lycoris_merge(bases, tmp_path):
    pipe = bases["pipeline"]
    te, unet = _clip(bases["text_encoder"]), _unet(bases["unet"])
    file = _kohya_file(tmp_path / "kohya.safetensors", te, unet, bases["preset"], seed=6, rescaled=True, constraint=0.01)
    read = read_diffusion_adapter(file)
    assert {n.split("_")[1] for n in read.modules} == {"te", "unet"}
    result = fold_diffusion(file, pipe, tmp_path / "out")
    out = tmp_path / "out"
    assert result.layout == "pipeline" and set(result.components) == {"unet", "text_encoder"}
    assert result.modules["lora_te_encoder_layers_1_mlp_fc2"] == "text_encoder/encoder.layers.1.mlp.fc2.weight"
    assert result.modules["lora_unet_up_blocks_0_upsamplers_0_conv"] == "unet/up_blocks.0.upsamplers.0.conv.weight"
    te, unet = _kohya_merged(file, _clip(bases["text_encoder"]), _unet(bases["unet"]), bases["preset"])
    _assert_state_close(_clip(out / "text_encoder"), te)
    _assert_state_close(_unet(out / "unet"), unet)
    _assert_forward_close(_clip_forward(_clip(out / "text_encoder")), _clip_forward(te))
    _assert_forward_close(_unet_forward(_unet(out / "unet")), _unet_forward(unet))
    # every other file and folder of the pipeline, byte for byte; the folded folders keep their file names
    files = sorted(str(p.relative_to(pipe)) for p in pipe.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted([*files, "oftmerge.json"])
    for name in files:
        if not name.endswith(("model.safetensors", "diffusion_pytorch_model.safetensors")) or name.startswith("vae"):
            assert _digest(out / name) == _digest(pipe / name), name
    _untouched_identical(pipe / "unet", out / "unet", [k.removeprefix("unet/") for k in result.modules.values() if k.startswith("unet/")])
    record = json.loads((out / "oftmerge.json").read_text())
    assert record["kind"] == "folded diffusion pipeline" and set(record["base"]["components"]) == {"unet", "text_encoder"}


def test_file_of_several_components_into_one_model_directory_is_refused(bases, tmp_path):
    file = _kohya_file(tmp_path / "kohya.safetensors", _clip(bases["text_encoder"]), _unet(bases["unet"]), bases["preset"], seed=7)
    expected = r"adapts text_encoder, denoiser \(lora_unet_\), but .*unet is a diffusers UNet2DConditionModel.*pipeline"
    with pytest.raises(IncompatibleAdaptersError, match=expected):
        fold_diffusion(file, bases["unet"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- LDM / SGM names (kohya's SDXL files) -------------------------------------------------------------

_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
           "norm1": "in_layers.0", "norm2": "out_layers.0"}  # fmt: skip


def _ldm(path, config):
    """The LDM/SGM (``openaimodel.py``) path of a diffusers U-Net module: the layout diffusers' ``convert_ldm_unet_checkpoint`` reads."""
    n = config["layers_per_block"] + 1
    fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    if path in fixed:
        return fixed[path]

    def resnet(rest):
        head, _, tail = rest.partition(".")
        return ".".join([_RESNET.get(head, head)] + ([tail] if tail else []))

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + b * n + i}." + ("0." + resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        return f"middle_block.{2 * int(m[2]) if m[1] == 'resnets' else 1}." + (resnet(m[3]) if m[1] == "resnets" else m[3])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * n + i}." + ("0." + resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        b = int(m[1])
        return f"output_blocks.{b * n + n - 1}.{2 if 'CrossAttn' in config['up_block_types'][b] else 1}.conv"
    raise AssertionError(f"no LDM name for {path}")


def test_ldm_names_of_the_test_agree_with_diffusers_single_file_converter(bases):
    """The inverse used below, checked against diffusers' own LDM -> diffusers conversion of full checkpoints."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = json.loads((bases["sdxl"] / "config.json").read_text())
    keys = list(_unet(bases["sdxl"]).state_dict())
    ldm = {"model.diffusion_model." + _ldm(k.rsplit(".", 1)[0], config) + "." + k.rsplit(".", 1)[1]: torch.tensor([i]) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(ldm, config)
    assert {k: int(v) for k, v in converted.items()} == {k: i for i, k in enumerate(keys)}


def test_kohya_sdxl_file_with_ldm_names_folds_as_its_diffusers_named_twin(bases, tmp_path):
    """kohya trains SDXL on its LDM-layout U-Net: such names are mapped by diffusers' LoRA conversion."""
    from safetensors.torch import load_file, save_file

    unet = _unet(bases["sdxl"])
    file = _kohya_file(tmp_path / "diffusers-names.safetensors", None, unet, bases["preset"], seed=8, rescaled=True)
    config = json.loads((bases["sdxl"] / "config.json").read_text())
    paths = {name.replace(".", "_"): name for name, _ in _unet(bases["sdxl"]).named_modules()}
    renamed = {}
    for key, tensor in load_file(file).items():
        stem, suffix = key.split(".", 1)
        renamed[f"lora_unet_{_ldm(paths[stem.removeprefix('lora_unet_')], config).replace('.', '_')}.{suffix}"] = tensor
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.oft_blocks", "lora_unet_middle_block_1_proj_in.oft_blocks",
            "lora_unet_output_blocks_2_2_conv.oft_blocks", "lora_unet_input_blocks_3_0_op.oft_blocks", "lora_unet_label_emb_0_0.oft_blocks",
            "lora_unet_input_blocks_0_0.oft_blocks", "lora_unet_out_2.oft_blocks", "lora_unet_input_blocks_1_0_emb_layers_1.oft_blocks",
            "lora_unet_output_blocks_0_0_skip_connection.oft_blocks", "lora_unet_time_embed_0.oft_blocks"} <= set(renamed)  # fmt: skip
    save_file(renamed, tmp_path / "ldm-names.safetensors")
    result = fold_diffusion(tmp_path / "ldm-names.safetensors", bases["sdxl"], tmp_path / "out")
    assert result.modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert result.modules["lora_unet_output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert result.modules["lora_unet_label_emb_0_0"] == "add_embedding.linear_1.weight"
    _, merged = _kohya_merged(file, None, _unet(bases["sdxl"]), bases["preset"])
    _assert_state_close(_unet(tmp_path / "out"), merged)


def test_unknown_module_names_are_refused_in_one_line(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    file = _lycoris_file(tmp_path / "oft.safetensors", _unet(bases["unet"]), seed=9)
    tensors = load_file(file)
    tensors = {k.replace("lycoris_down_blocks_0_attentions_0_proj_in", "lycoris_down_blocks_0_attentions_0_proj_inn"): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "typo.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match=r"1 module\(s\) match no weight of .*'lycoris_down_blocks_0_attentions_0_proj_inn' "
                       r"\(closest: down_blocks_0_attentions_0_proj_in"):  # fmt: skip
        fold_diffusion(tmp_path / "typo.safetensors", bases["unet"], tmp_path / "out")
    # another model's file: a module of another width
    other = tmp_path / "other"
    shutil.copytree(bases["unet"], other)
    config = json.loads((other / "config.json").read_text())
    _unet(config={**UNET, "block_out_channels": (16, 64)}).save_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 64]}))
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'lycoris_conv_in': rotates 32 output rows, but .* has shape \[16, 4, 3, 3\]"):
        fold_diffusion(file, other, tmp_path / "out")


# -- sd-scripts' own OFT files (networks/oft.py) ------------------------------------------------------


def _sd_scripts_file(path, unet, *, dim=4, alpha=0.01, seed=10):
    """An sd-scripts OFT file (``oft_unet_`` + module path with '_'; ``dim`` is the number of blocks), as its
    OFTNetwork(enable_conv=True) targets: Linear and Conv2d children of the attention, resnet, down/upsample blocks."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if type(module).__name__ not in ("Attention", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            continue
        for child, sub in module.named_modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                out = sub.weight.shape[0]
                stem = f"oft_unet_{name}.{child}".replace(".", "_")
                scale = 0.05 * float(torch.rand((), generator=g)) ** 3  # some modules under the constraint, most above
                tensors[f"{stem}.oft_blocks"] = torch.randn(dim, out // dim, out // dim, generator=g) * scale
                tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def _sd_scripts_merge(file, unet):
    """sd-scripts networks/oft.py at multiplier 1: create_network_from_weights (dim and alpha from the file's first
    tensors) + OFTInfModule.merge_to: Q clamped to alpha * out, R = (I + Q)(I - Q)^-1, W' = R^T W per block of rows."""
    from safetensors.torch import load_file

    weights = load_file(file)
    dim = alpha = None
    for name, param in weights.items():
        if name.endswith(".alpha"):
            alpha = param.item() if alpha is None else alpha
        elif dim is None:
            dim = param.size()[0]
    modules = {f"oft_unet_{name}".replace(".", "_"): m for name, m in unet.named_modules()}
    clamped = 0
    for key, blocks in weights.items():
        if not key.endswith(".oft_blocks"):
            continue
        module = modules[key.removesuffix(".oft_blocks")]
        out_dim = module.weight.shape[0]
        constraint, block_size = alpha * out_dim, out_dim // dim
        q = blocks - blocks.transpose(1, 2)
        norm = torch.norm(q.flatten())
        new_norm = torch.clamp(norm, max=constraint)
        clamped += bool(new_norm < norm)
        q = q * ((new_norm + 1e-8) / (norm + 1e-8))
        eye = torch.eye(block_size).unsqueeze(0).repeat(dim, 1, 1)
        r = torch.matmul(eye + q, (eye - q).float().inverse())
        r = 1.0 * (r - eye) + eye
        w = module.weight.detach().to(torch.float32)
        folded = torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(dim, block_size, -1)).reshape(w.shape)
        with torch.no_grad():
            module.weight.copy_(folded.to(module.weight.dtype))
    return unet, clamped


def test_sd_scripts_oft_file_folded_into_unet_equals_its_merge(bases, tmp_path):
    file = _sd_scripts_file(tmp_path / "sd-scripts.safetensors", _unet(bases["unet"]))
    read = read_diffusion_adapter(file)
    assert read.format == "kohya" and "lora_unet_down_blocks_0_resnets_0_conv1" in read.modules
    result = fold_diffusion(file, bases["pipeline"], tmp_path / "out")
    assert set(result.components) == {"unet"} and "text_encoder" in result.copied
    merged, clamped = _sd_scripts_merge(file, _unet(bases["unet"]))
    assert 0 < clamped < len(read.modules)  # the clamp is active for some modules, not all
    folded = _unet(tmp_path / "out" / "unet")
    _assert_state_close(folded, merged)
    _assert_forward_close(_unet_forward(folded), _unet_forward(merged))
    assert _digest(tmp_path / "out" / "text_encoder" / "model.safetensors") == _digest(bases["text_encoder"] / "model.safetensors")


def test_text_model_prefix_of_older_clip_files_and_checkpoints(bases, tmp_path):
    """transformers 5's CLIPTextModel has no ``text_model.``; files and checkpoints of transformers 4 do (diffusers' LoRA loader's rule)."""
    from safetensors.torch import load_file, save_file

    both = _kohya_file(tmp_path / "both.safetensors", _clip(bases["text_encoder"]), _unet(bases["unet"]), bases["preset"], seed=11)
    tensors = {k: v for k, v in load_file(both).items() if k.startswith("lora_te_")}  # lycoris.kohya needs a U-Net to make a file
    save_file(tensors, file := tmp_path / "flat.safetensors")
    save_file({k.replace("lora_te_", "lora_te_text_model_", 1): v for k, v in tensors.items()}, tmp_path / "prefixed.safetensors")
    old = tmp_path / "te-transformers4"  # the checkpoint as transformers 4 saved it: text_model.encoder...
    old.mkdir()
    shutil.copy(bases["text_encoder"] / "config.json", old)
    save_file({f"text_model.{k}": v for k, v in load_file(bases["text_encoder"] / "model.safetensors").items()}, old / "model.safetensors", {"format": "pt"})
    te, _ = _kohya_merged(file, _clip(bases["text_encoder"]), _unet(bases["unet"]), bases["preset"])
    prefixed = tmp_path / "prefixed.safetensors"
    for name, adapter, base in [("a", file, old), ("b", prefixed, bases["text_encoder"]), ("c", prefixed, old)]:
        result = fold_diffusion(adapter, base, tmp_path / name)
        assert result.modules[next(iter(result.modules))].startswith("text_model." if base == old else "encoder.")
        _assert_state_close(_clip(tmp_path / name), te)


def test_variant_weight_files_are_left_out_with_a_warning(bases, tmp_path):
    unet_dir = tmp_path / "unet"
    shutil.copytree(bases["unet"], unet_dir)
    _unet().half().save_pretrained(unet_dir, variant="fp16")
    file = _lycoris_file(tmp_path / "oft.safetensors", _unet(bases["unet"]), seed=12)
    result = fold_diffusion(file, unet_dir, tmp_path / "out")
    assert any("diffusion_pytorch_model.fp16.safetensors not written" in w and "unrotated" in w for w in result.warnings)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "oftmerge.json"]
