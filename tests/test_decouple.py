"""Orthogonal-residual decoupling: the per-tensor math, LoRA experts against PEFT, the streaming run, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oftmerge.ops.decouple import decouple_merge
from oftmerge.methods.decoupling import Settings, conflict_mask, decompose
from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError, OftMergeError, OutputExistsError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.lora import UnsupportedLoraError
from oftmerge.linalg import cayley
from oftmerge.linalg.procrustes import CayleyDomainError, cayley_generator
from oftmerge.methods import get_method
from oftmerge.methods.euclidean import get_euclidean_method, TensorContext

F64 = torch.float64
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def rotation(d: int, seed: int, size: float = 0.1) -> torch.Tensor:
    a = rand(d, d, seed=seed, scale=size)
    return torch.linalg.matrix_exp(a - a.T)


# ----------------------------------------------------------------------------------- per-tensor math


@pytest.mark.parametrize("shape", [(12, 8), (8, 8)])
def test_experts_that_are_rotations_of_the_base_are_recovered(shape):
    w0 = rand(*shape, seed=0)
    rs = [rotation(shape[1], seed=i) for i in range(3)]
    ws = torch.stack([w0 @ r for r in rs])
    dec = decompose("w", w0, ws, torch.ones(3, dtype=F64), Settings(euclidean="ta", anchor=0.0))
    assert dec.report.path == "decoupled"
    assert float(dec.parts.abs().max()) < 1e-10  # residuals are zero
    assert all(f < 1e-10 for f in dec.report.fits)
    qs = torch.stack([cayley_generator(r)[0] for r in rs])
    assert dec.report.q_norms == pytest.approx([float(q.norm()) for q in qs], rel=1e-8)
    q_m, _ = get_method("orthomerge")(qs.unsqueeze(1), torch.ones(3, dtype=F64))
    assert torch.allclose(dec.base_part, w0 @ cayley(q_m)[0], atol=1e-10)  # R recovered, merged in so(d)
    assert dec.report.merged_ortho_error < 1e-12 and dec.report.det_flips == 0


def test_wide_rotated_experts_have_zero_residual():
    w0 = rand(6, 16, seed=1)  # out < in: R is not unique, the fit is exact anyway
    ws = torch.stack([w0 @ rotation(16, seed=10 + i) for i in range(2)])
    dec = decompose("k_proj", w0, ws, torch.ones(2, dtype=F64), Settings())
    assert float(dec.parts.abs().max()) < 1e-5 * float(w0.abs().max())
    assert max(dec.report.q_norms) < 2.0 and dec.report.rotation_shift < 2 * max(dec.report.task_norms)


@pytest.mark.parametrize("exact_max", [2048, 4])
def test_merged_rotation_is_applied_without_forming_it(monkeypatch, exact_max):
    """apply_cayley: W0 cayley(Q) from one LU; the orthogonality error exact, or estimated from probes."""
    import oftmerge.methods.decoupling as D

    monkeypatch.setattr(D, "ORTHO_EXACT_MAX", exact_max)
    w0, a = rand(5, 12, seed=4), rand(12, 12, seed=5, scale=0.3)
    q = a - a.T
    base_part, err = D.apply_cayley(w0, q)
    r = cayley(q.unsqueeze(0))[0]
    assert torch.allclose(base_part, w0 @ r, atol=1e-13)
    assert err < 1e-12  # a rotation to rounding, by either measure
    # the estimate tracks a real error: a matrix that is not skew gives a non-orthogonal "R"
    bad = q + rand(12, 12, seed=6, scale=0.05)
    _, err_bad = D.apply_cayley(w0, bad)
    r_bad = torch.linalg.solve(torch.eye(12, dtype=F64) + bad, torch.eye(12, dtype=F64) - bad, left=False)
    exact = float((r_bad.T @ r_bad - torch.eye(12, dtype=F64)).norm())
    assert err_bad == pytest.approx(exact, rel=1e-10 if exact_max >= 12 else 0.8) and exact > 0.01


def test_wide_layers_decouple_in_the_row_space():
    """A down_proj-like layer (2 out < in): the rotations stay factored; same result as the dense solve."""
    import oftmerge.methods.decoupling as D
    from oftmerge.linalg.procrustes import procrustes_rotation

    w0 = rand(6, 20, seed=7)
    ws = torch.stack([w0 @ rotation(20, seed=20 + i, size=0.02) + rand(6, 20, seed=30 + i, scale=0.01) for i in range(3)])
    dec = decompose("down_proj", w0, ws, torch.ones(3, dtype=F64), Settings(euclidean="ta"))
    rs = [procrustes_rotation(w0, w, row_space=False)[0].dense() for w in ws]  # the in x in anchored solves
    qs = torch.stack([cayley_generator(r)[0] for r in rs]).unsqueeze(1)
    q_m, _ = get_method("orthomerge")(qs, torch.ones(3, dtype=F64))
    assert torch.allclose(dec.base_part, w0 @ cayley(q_m)[0], atol=1e-8)
    assert torch.allclose(dec.parts, ws - torch.stack([w0 @ r for r in rs]), atol=1e-8)
    assert dec.report.path == "decoupled" and dec.report.merged_ortho_error < 1e-12
    assert D.ORTHO_EXACT_MAX >= 20


@pytest.mark.parametrize("shape", [(8, 8), (3, 12)])
def test_linear_so_d_methods_are_streamed_into_one_accumulator(monkeypatch, shape):
    """orthomerge/mean_q get the weighted sum built one generator at a time (placed from the row-space core for
    wide layers); the same merge as stacking the N dense generators: bit for bit when dense, to rounding when factored."""
    import oftmerge.methods.decoupling as D

    w0 = rand(*shape, seed=11)
    ws = torch.stack([w0 @ rotation(shape[1], seed=50 + i, size=0.05) + rand(*shape, seed=60 + i, scale=0.01) for i in range(3)])
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    for name in ("orthomerge", "mean_q"):
        method, calls = get_method(name), []

        def spy(s, norms, w, **opts):
            calls.append(tuple(s.shape))
            return method.from_sum(s, norms, w, **opts)

        monkeypatch.setattr(D, "get_method", lambda _n: dataclasses.replace(method, from_sum=spy))
        streamed = decompose("w", w0, ws, weights, Settings(euclidean="ta", orthogonal=name))
        assert calls == [(1, shape[1], shape[1])]  # one accumulated sum, not a stack of N
        monkeypatch.setattr(D, "get_method", lambda _n: dataclasses.replace(method, from_sum=None))
        stacked = decompose("w", w0, ws, weights, Settings(euclidean="ta", orthogonal=name))
        monkeypatch.undo()
        assert streamed.report.q_norms == pytest.approx(stacked.report.q_norms, rel=1e-12)
        if shape[0] * 2 >= shape[1]:  # dense rotations
            assert torch.equal(streamed.base_part, stacked.base_part)
        else:
            assert torch.allclose(streamed.base_part, stacked.base_part, rtol=0, atol=1e-13)
        assert streamed.report.stats == pytest.approx(stacked.report.stats)


@pytest.mark.parametrize("procrustes", ["robust", "reference", "fast"])
@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_one_expert_with_task_arithmetic_gives_it_back(procrustes, shape):
    w0 = rand(*shape, seed=2)
    w1 = w0 + rand(*shape, seed=3, scale=0.1)
    dec = decompose("w", w0, w1.unsqueeze(0), torch.ones(1, dtype=F64), Settings(euclidean="ta", procrustes=procrustes))
    merged, _ = get_euclidean_method("ta")(dec.parts, torch.ones(1, dtype=F64), context=TensorContext("w"))
    assert torch.allclose(dec.base_part + merged, w1, atol=1e-12)


def test_conflict_mask_keeps_rows_that_oppose_the_mean():
    taus = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
                         [[1.0, 0.1], [-3.0, -3.0], [1.0, 0.0]]], dtype=F64)
    # mean rows: (1, .05), (-1, -1), (.5, 0): expert 0 opposes row 1, expert 1 opposes nothing
    assert conflict_mask(taus).tolist() == [[False, True, False], [False, False, False]]
    w0 = rand(3, 2, seed=4)
    dec = decompose("w", w0, w0 + taus, torch.ones(2, dtype=F64), Settings(target="conflict"))
    assert dec.report.conflict_rows == (1, 0)
    assert dec.report.fits[1] is None  # target = W0 for expert 1: nothing to fit


def _far_experts(angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    w0 = torch.eye(6, dtype=F64) + rand(6, 6, seed=5, scale=0.01)
    c, s = torch.cos(torch.tensor(angle, dtype=F64)), torch.sin(torch.tensor(angle, dtype=F64))
    r = torch.eye(6, dtype=F64)
    r[:2, :2] = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    return w0, torch.stack([w0 @ r, w0 @ rotation(6, seed=6)])


def test_rotations_outside_the_cayley_chart():
    w0, ws = _far_experts(torch.pi - 2e-3)
    w = torch.ones(2, dtype=F64)
    dec = decompose("layer.7", w0, ws, w, Settings(euclidean="ta"))  # default: the exponential chart
    assert dec.report.path == "decoupled" and dec.report.chart == "log"
    assert dec.report.min_margin < 1e-2 and max(dec.report.q_norms) == pytest.approx((torch.pi - 2e-3) * 2 ** 0.5, rel=1e-3)  # log: +-theta
    dec = decompose("layer.7", w0, ws, w, Settings(euclidean="ta", on_domain_error="euclidean"))
    assert dec.report.path.startswith("fallback: tensor 'layer.7': the rotation has an eigenvalue within")
    assert torch.equal(dec.base_part, w0) and torch.allclose(dec.parts, ws - w0)
    dec = decompose("layer.7", w0, ws, w, Settings(euclidean="ta", orthogonal="karcher"))  # not linear in the chart
    assert dec.report.path.startswith("fallback:")
    with pytest.raises(CayleyDomainError, match=r"tensor 'layer.7': the rotation has an eigenvalue .* on_domain_error='log'"):
        decompose("layer.7", w0, ws, w, Settings(on_domain_error="error"))
    # the reference path reproduces the huge generator instead (no margin), but stays finite
    dec = decompose("layer.7", w0, ws, w, Settings(procrustes="reference", euclidean="ta"))
    assert dec.report.chart == "cayley" and max(dec.report.q_norms) > 500
    assert bool(torch.isfinite(dec.base_part).all())


def test_a_merged_rotation_is_bounded():
    w0 = rand(8, 8, seed=7)
    ws = w0 + rand(2, 8, 8, seed=8, scale=0.1)
    w = torch.ones(2, dtype=F64)
    dec = decompose("w", w0, ws, w, Settings(max_rotation=1e-3))
    assert dec.report.path.startswith("fallback: merged rotation moves W0 by")
    assert torch.equal(dec.base_part, w0)
    ref = decompose("w", w0, ws, w, Settings(max_rotation=1e-3, procrustes="reference"))
    assert ref.report.path == "decoupled" and "limit max_rotation=0.001" in ref.report.notes[-1]


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


def test_model_wide_thresholds_from_the_histogram():
    from oftmerge.ops.decouple import _HIST_BINS, _LOG_HI, _LOG_LO, _thresholds

    values = torch.arange(1, 1001, dtype=F64)
    hist = torch.histc(torch.log10(values), bins=_HIST_BINS, min=_LOG_LO, max=_LOG_HI).unsqueeze(0)
    (t,) = _thresholds(hist, [1000], 0.1)
    assert 0.998 * 901 <= t <= 901  # keeps the top 100 values, up to one histogram bin (0.18%)
    assert _thresholds(hist, [1000], 0.0001) == [float("inf")]


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
    with pytest.raises(IncompatibleAdaptersError, match=r"LoRA module 'model.layers.0.mlp.down_proj' has factors A \(4, 24\), B \(32, 4\) for a weight of shape \(32, 24\), but the base model's 'model.layers.0.mlp.down_proj.weight' has shape \(16, 24\); the adapter was trained on another model \(its config names '.*wide'\)"):
        decouple_merge(models["base"], [lora], out_dir=tmp_path / "o")
    cfg = json.loads((models["lora"] / "adapter_config.json").read_text())
    (tmp_path / "renamed").mkdir()
    tensors = load_file(models["lora"] / "adapter_model.safetensors")
    save_file({k.replace("self_attn", "attention"): v for k, v in tensors.items()}, tmp_path / "renamed" / "adapter_model.safetensors")
    (tmp_path / "renamed" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleAdaptersError, match=r"LoRA module 'model.layers.0.attention.k_proj' has no tensor 'model.layers.0.attention.k_proj.weight' in the base model"):
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
    import oftmerge.methods.euclidean as E
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(_llama_config(hidden=32)).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    experts = [_save_llama(tmp_path / f"e{i}", 40 + i, perturb_from=tmp_path / "base") for i in range(3)]
    assert _tensors(experts[0])["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    seen = []
    method = E.get_euclidean_method(euclidean)
    spy = E.MergeMethod(method.name, lambda taus, w, **kw: (seen.append(taus.dtype), method.fn(taus, w, **kw))[1],
                        method.summary, method.reference, method.options)
    monkeypatch.setitem(E._EUCLIDEAN, euclidean, spy)
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
