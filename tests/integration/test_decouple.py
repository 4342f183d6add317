"""Orthogonal-residual decoupling over checkpoints: LoRA experts against PEFT, the streaming run, bad inputs.

The per-tensor math (one matrix at a time, no model): unit/test_decoupling.py.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError, OftMergeError, OutputExistsError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.lora import UnsupportedLoraError
from oftmerge.methods.euclidean import TensorContext
from oftmerge.ops.decouple import decouple_merge

from helpers import F64

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


# ----------------------------------------------------------------------------------- tiny models


def _llama_config(hidden: int = 16, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=24, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


def _save_llama(path: Path, seed: int, *, config=None, perturb_from: Path | None = None, scale: float = 0.1) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(perturb_from) if perturb_from else LlamaForCausalLM(config or _llama_config())
    if perturb_from:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * float(p.std().clamp(min=1e-3)))
    model.save_pretrained(path)
    return path


def _save_lora(path: Path, base: Path, seed: int, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = {"target_modules": LORA_TARGETS, "r": 4, "lora_alpha": 8, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decouple")
    base = _save_llama(root / "base", 0)
    return {
        "base": base,
        "full0": _save_llama(root / "full0", 1, perturb_from=base),
        "full1": _save_llama(root / "full1", 2, perturb_from=base),
        "lora": _save_lora(root / "lora", base, 3),
        "rslora": _save_lora(root / "rslora", base, 4, use_rslora=True, r=8),
        "dora": _save_lora(root / "dora", base, 5, use_dora=True),
        # PEFT also saves copies of targeted embeddings (save_embedding_layers): the LoRA applies on top
        "embedding": _save_lora(root / "embedding", base, 6, target_modules=["embed_tokens", "q_proj", "lm_head"]),
    }


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora", "embedding"])
def test_a_lora_expert_alone_equals_peft_merge_and_unload(models, tmp_path, kind):
    out = decouple_merge(models["base"], [models[kind]], euclidean="ta", orthogonal=None, out_dir=tmp_path / "o").out_dir
    want = _peft_merged(models["base"], models[kind])
    got = _tensors(out)
    assert set(got) == set(want) - {"lm_head.weight"} | {"lm_head.weight"}
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=2e-7), k
    # decoupled, one expert with TA gives the same weights back (W0 R_1 + rho_1 = W_1)
    out = decouple_merge(models["base"], [models[kind]], euclidean="ta", out_dir=tmp_path / "d").out_dir
    for k, v in _tensors(out).items():
        assert torch.allclose(v, want[k], atol=1e-6), k


def test_lora_scaling_alpha_over_r_and_rslora(models):
    from oftmerge.formats.lora import read_lora

    plain, rs = read_lora(models["lora"]), read_lora(models["rslora"])
    assert {m.scaling for m in plain.modules.values()} == {8 / 4}
    assert [m.scaling for m in rs.modules.values()] == pytest.approx([8 / 8 ** 0.5] * len(rs.modules))
    assert all(m.magnitude_key for m in read_lora(models["dora"]).modules.values())


def test_fan_in_fan_out_lora_on_gpt2(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.1)
    m.save_pretrained(tmp_path / "lora")
    want = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "lora").merge_and_unload().state_dict()
    res = decouple_merge(tmp_path / "base", [tmp_path / "lora"], euclidean="ta", out_dir=tmp_path / "o")
    assert res.layers["transformer.h.0.attn.c_attn.weight"].shape == (48, 16)  # decoupled as (out, in)
    for k, v in _tensors(res.out_dir).items():
        assert torch.allclose(v, want[k], atol=1e-6), k


FAST_MATRIX = [
    *[(e, None, "global", "robust") for e in ("ta", "ties", "dare", "tsv")],
    *[(e, "orthomerge", "global", "robust") for e in ("ties", "dare", "tsv")],
    *[("ta", "orthomerge", t, p) for t in ("global", "conflict") for p in ("robust", "reference", "fast")],
    *[("ta", m, "conflict", "robust") for m in ("mean_q", "mean_r", "sequential", "karcher")],
]
FULL_MATRIX = [(e, o, t, p) for e in ("ta", "ties", "dare", "tsv") for o in ("orthomerge", "mean_q")
               for t in ("global", "conflict") for p in ("robust", "reference", "fast")]


def _check_run(models, out: Path, euclidean, orthogonal, target, procrustes, **kw):
    experts = [models[k] for k in ("full0", "lora", "rslora", "dora", "full1")]
    res = decouple_merge(models["base"], experts, euclidean=euclidean, orthogonal=orthogonal, target=target,
                         procrustes=procrustes, out_dir=out, overwrite=True, **kw)
    got = _tensors(out)
    base = _tensors(models["base"])
    assert set(got) == set(base)
    for k, v in got.items():
        assert v.dtype == base[k].dtype and v.shape == base[k].shape and bool(torch.isfinite(v).all()), k
    prov = json.loads((out / "oftmerge.json").read_text())
    assert set(prov["layers"]) == set(res.layers) == set(res.plan)
    assert prov["settings"]["euclidean"] == euclidean and prov["settings"]["orthogonal"] == orthogonal
    assert [e["sha256"] for e in prov["experts"]] == sorted(e["sha256"] for e in prov["experts"])
    return res


@pytest.mark.parametrize("euclidean,orthogonal,target,procrustes", FAST_MATRIX)
def test_option_combinations_give_finite_weights(models, tmp_path, euclidean, orthogonal, target, procrustes):
    res = _check_run(models, tmp_path / "o", euclidean, orthogonal, target, procrustes)
    paths = {r.path.split(":")[0] for r in res.layers.values()}
    if orthogonal is None:
        assert paths == {"euclidean"}
    else:
        assert "decoupled" in paths
        assert res.layers["model.embed_tokens.weight"].path == "euclidean"  # embeddings: Euclidean only
        assert res.layers["model.norm.weight"].path == "euclidean"  # not 2-D


@pytest.mark.slow
@pytest.mark.parametrize("euclidean,orthogonal,target,procrustes", FULL_MATRIX)
def test_every_option_combination(models, tmp_path, euclidean, orthogonal, target, procrustes):
    _check_run(models, tmp_path / "o", euclidean, orthogonal, target, procrustes)


def test_output_is_a_loadable_model_and_untouched_tensors_are_copied(models, tmp_path):
    from transformers import LlamaForCausalLM

    res = decouple_merge(models["base"], [models["lora"], models["dora"]], out_dir=tmp_path / "o", target="conflict")
    model = LlamaForCausalLM.from_pretrained(res.out_dir)
    assert bool(torch.isfinite(model(torch.arange(8).view(1, 8)).logits).all())
    base, got = _tensors(models["base"]), _tensors(res.out_dir)
    untouched = set(base) - set(res.plan)
    assert "model.layers.0.mlp.up_proj.weight" in untouched  # no LoRA expert adapts it
    assert all(torch.equal(got[k], base[k]) for k in untouched)
    card = (res.out_dir / "README.md").read_text()
    assert "ties" in card and "orthomerge (conflict target)" in card
    totals = json.loads((res.out_dir / "oftmerge.json").read_text())["totals"]
    assert totals["decoupled"] == 2 * len(LORA_TARGETS) and totals["fallbacks"] == 0


def test_expert_order_does_not_change_a_byte(models, tmp_path):
    a = [models["full0"], models["lora"], models["full1"]]
    kw = dict(euclidean="dare", target="conflict")
    r1 = decouple_merge(models["base"], a, out_dir=tmp_path / "a", **kw)
    r2 = decouple_merge(models["base"], a[::-1], out_dir=tmp_path / "b", **kw)
    for name in ("model.safetensors", "oftmerge.json"):
        assert (r1.out_dir / name).read_bytes() == (r2.out_dir / name).read_bytes()


def test_model_wide_ties_trim(models, tmp_path):
    experts = [models["full0"], models["full1"]]
    one = decouple_merge(models["base"], experts, orthogonal=None, euclidean_options={"trim": "model", "density": 1.0}, out_dir=tmp_path / "m")
    two = decouple_merge(models["base"], experts, orthogonal=None, euclidean_options={"density": 1.0}, out_dir=tmp_path / "t")
    assert _tensors(one.out_dir).keys() == _tensors(two.out_dir).keys()
    for k, v in _tensors(one.out_dir).items():
        assert torch.equal(v, _tensors(two.out_dir)[k]), k
    res = decouple_merge(models["base"], experts, euclidean_options={"trim": "model", "density": 0.2}, out_dir=tmp_path / "d")
    kept = [r.stats["euclidean_kept"] for r in res.layers.values()]
    assert min(kept) < 0.15 and max(kept) > 0.25  # one threshold for the model: tensors differ


# ----------------------------------------------------------------------------------- bad inputs


def test_mismatched_architectures_are_refused(models, tmp_path):
    other = _save_llama(tmp_path / "wide", 7, config=_llama_config(hidden=32))
    with pytest.raises(IncompatibleAdaptersError, match=r"wide: tensor 'lm_head.weight' has shape \(32, 32\), the base model's has \(32, 16\)"):
        decouple_merge(models["base"], [other], out_dir=tmp_path / "o")
    deeper = _save_llama(tmp_path / "deep", 7, config=_llama_config(layers=3))
    with pytest.raises(IncompatibleAdaptersError, match=r"not the architecture of the base model .*: 9 tensors the base does not have \(e.g. 'model.layers.2"):
        decouple_merge(models["base"], [deeper], out_dir=tmp_path / "o")


def test_missing_tensors_are_refused(models, tmp_path):
    (tmp_path / "cut").mkdir()
    tensors = load_file(models["full0"] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "cut" / "model.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match=r"missing 1 of the base's tensors \(e.g. 'model.layers.1.mlp.up_proj.weight'\)"):
        decouple_merge(models["base"], [tmp_path / "cut"], out_dir=tmp_path / "o")


def test_lora_for_another_base_is_refused(models, tmp_path):
    other = _save_llama(tmp_path / "wide", 7, config=_llama_config(hidden=32))
    lora = _save_lora(tmp_path / "lora", other, 1)
    with pytest.raises(
        IncompatibleAdaptersError,
        match=r"LoRA module 'model.layers.0.mlp.down_proj' has factors A \(4, 24\), B \(32, 4\) for a weight of shape \(32, 24\), "
        r"but the base model's 'model.layers.0.mlp.down_proj.weight' has shape \(16, 24\); "
        r"the adapter was trained on another model \(its config names '.*wide'\)",
    ):
        decouple_merge(models["base"], [lora], out_dir=tmp_path / "o")
    cfg = json.loads((models["lora"] / "adapter_config.json").read_text())
    (tmp_path / "renamed").mkdir()
    tensors = load_file(models["lora"] / "adapter_model.safetensors")
    save_file({k.replace("self_attn", "attention"): v for k, v in tensors.items()}, tmp_path / "renamed" / "adapter_model.safetensors")
    (tmp_path / "renamed" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        IncompatibleAdaptersError,
        match=r"LoRA module 'model.layers.0.attention.k_proj' has no tensor 'model.layers.0.attention.k_proj.weight' in the base model",
    ):
        decouple_merge(models["base"], [tmp_path / "renamed"], out_dir=tmp_path / "o")


def test_unsupported_lora_variants_are_refused(models, tmp_path):
    dora_emb = _save_lora(tmp_path / "dora-emb", models["base"], 1, use_dora=True, target_modules=["embed_tokens"])
    with pytest.raises(UnsupportedLoraError, match=r"module 'model.embed_tokens' is a DoRA embedding; oftmerge forms DoRA experts for linear layers only"):
        decouple_merge(models["base"], [dora_emb], out_dir=tmp_path / "o")
    cfg = json.loads((models["lora"] / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["experts.gate_up_proj"]
    (tmp_path / "tp").mkdir()
    (tmp_path / "tp" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "tp" / "adapter_model.safetensors").write_bytes((models["lora"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UnsupportedLoraError, match=r"uses target_parameters=\['experts.gate_up_proj'\], a LoRA variant that is not a plain weight update"):
        decouple_merge(models["base"], [tmp_path / "tp"], out_dir=tmp_path / "o")
    assert issubclass(UnsupportedLoraError, AdapterFormatError)


def test_other_bad_inputs(models, tmp_path):
    from peft import OFTConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = models["base"]
    get_peft_model(LlamaForCausalLM.from_pretrained(base), OFTConfig(oft_block_size=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "oft")
    with pytest.raises(IncompatibleAdaptersError, match=r"oft: a OFT adapter; decouple takes LoRA adapters or full models \(OFT adapters: `oftmerge merge`"):
        decouple_merge(base, [tmp_path / "oft"], out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="nowhere: expert not found"):
        decouple_merge(base, [tmp_path / "nowhere"], out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="got 2 weights for 1 experts"):
        decouple_merge(base, [models["lora"]], weights=[1, 2], out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="target must be one of global, conflict, got 'rows'"):
        decouple_merge(base, [models["lora"]], target="rows", out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="procrustes must be one of robust, reference, fast, got 'svd'"):
        decouple_merge(base, [models["lora"]], procrustes="svd", out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="unknown merge method 'slerp'"):
        decouple_merge(base, [models["lora"]], orthogonal="slerp", out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="method 'dare' has no option 'density'"):
        decouple_merge(base, [models["lora"]], euclidean="dare", euclidean_options={"density": 0.1}, out_dir=tmp_path / "o")
    with pytest.raises(OftMergeError, match="give an output directory"):
        decouple_merge(base, [models["lora"]])
    with pytest.raises(OftMergeError, match=r"the output would replace expert .*full0; inputs are never modified"):
        decouple_merge(base, [models["full0"]], out_dir=models["full0"], overwrite=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists: already exists; choose another output path or pass overwrite=True"):
        decouple_merge(base, [models["lora"]], out_dir=tmp_path / "exists")
    (tmp_path / "nan").mkdir()
    tensors = load_file(models["full0"] / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan" / "model.safetensors")
    with pytest.raises(NumericalError, match=r"nan: tensor 'model.layers.0.self_attn.q_proj.weight' contains NaN or Inf values"):
        decouple_merge(base, [tmp_path / "nan"], out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cli(models, tmp_path, capsys):
    from oftmerge.cli import main

    args = ["decouple", "--base", str(models["base"]), str(models["lora"]), str(models["full0"])]
    assert main([*args, "--dry-run"]) == 0
    assert "tensors changed by the experts" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "o"), "--euclidean", "ta", "--option", "scale=0.5", "--orthogonal", "none", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["orthogonal"] is None and data["settings"]["euclidean_options"]["scale"] == 0.5
    assert main([*args, "-o", str(tmp_path / "c"), "--target", "conflict", "--procrustes", "fast", "-q"]) == 0
    assert main([*args, "-o", str(tmp_path / "c"), "--option", "p=1"]) == 2
    assert "method 'ties' has no option 'p'" in capsys.readouterr().err


@pytest.mark.parametrize("euclidean", ["ties", "ta", "dare"])
def test_16_bit_models_merge_elementwise_in_float32(tmp_path, euclidean, monkeypatch):
    """bf16 checkpoints: TA/TIES/DARE run in float32 (half the traffic of float64) and give the
    float64 result rounded to bf16, bar a rare double rounding of one ulp."""
    from transformers import LlamaForCausalLM

    import oftmerge.methods.euclidean as E

    base = LlamaForCausalLM(_llama_config(hidden=32)).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    experts = [_save_llama(tmp_path / f"e{i}", 40 + i, perturb_from=tmp_path / "base") for i in range(3)]
    assert _tensors(experts[0])["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    seen = []
    method = E.get_euclidean_method(euclidean)
    spy = dataclasses.replace(method, fn=lambda taus, w, **kw: (seen.append(taus.dtype), method.fn(taus, w, **kw))[1])
    monkeypatch.setitem(E.EUCLIDEAN._methods, euclidean, spy)
    res = decouple_merge(tmp_path / "base", experts, euclidean=euclidean, orthogonal=None, out_dir=tmp_path / "o")
    assert set(seen) == {torch.float32}
    got, b = _tensors(res.out_dir), _tensors(tmp_path / "base")
    es = [_tensors(e) for e in experts]
    differ = total = 0
    for name in res.plan:
        taus = torch.stack([e[name].double() - b[name].double() for e in es])
        merged, _ = method(taus, torch.ones(3, dtype=F64), context=TensorContext(name, experts=(0, 1, 2)))
        ref = (b[name].double() + merged).to(torch.bfloat16)
        diff = (got[name].float() - ref.float()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * ref.float().abs().clamp(min=1e-30)
        assert bool((diff <= ulp).all()), name
        differ += int((diff > 0).sum())
        total += diff.numel()
    assert differ <= 1e-3 * total
