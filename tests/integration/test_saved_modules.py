"""Adapters that save more than rotations: SEQ_CLS heads (modules_to_save) and trained biases.

PEFT is the oracle: a fold must equal ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``,
a merged adapter must load in PEFT with the head the policy chose, and the live API must give the
tensors the file path gives.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import oftmerge
from oftmerge.cli import main
from oftmerge.errors import IncompatibleAdaptersError

H, LABELS = 32, 3
X = torch.tensor([[1, 5, 7, 9, 3, 2], [4, 8, 15, 16, 23, 42]])


def _bert(path, num_labels=LABELS, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def _load_bert(path, **kw):
    from transformers import BertForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BertForSequenceClassification.from_pretrained(path, **kw).eval()


def _adapter(path, base, *, seed, bias="none", num_labels=None):
    """A SEQ_CLS OFT adapter with every trainable tensor (rotations, head, biases) perturbed, as training would."""
    from peft import OFTConfig, get_peft_model

    kw = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_load_bert(base, **kw), OFTConfig(task_type="SEQ_CLS", target_modules=["query", "value"], oft_block_size=8, bias=bias))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(path)
    return path


def _peft(base, adapter):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_load_bert(base), str(adapter)).eval()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    base = _bert(root / "base")
    return {
        "root": root,
        "base": base,
        "a": _adapter(root / "a", base, seed=1),
        "b": _adapter(root / "b", base, seed=2),
        "oft_only": _adapter(root / "oft_only", base, seed=3, bias="oft_only"),
        "all": _adapter(root / "all", base, seed=4, bias="all"),
        "five": _adapter(root / "five", base, seed=5, num_labels=5),
    }


def _head(adapter):
    t = load_file(adapter / "adapter_model.safetensors")
    return t["base_model.model.classifier.weight"], t["base_model.model.classifier.bias"]


# -- reading -----------------------------------------------------------------------------------


def test_the_head_and_biases_are_read_as_peft_loads_them(bert):
    a = oftmerge.read_adapter(bert["a"])
    assert set(a.saved) == {"classifier.weight", "classifier.bias"}
    oft_only = oftmerge.read_adapter(bert["oft_only"])
    assert oft_only.saved["bert.encoder.layer.0.attention.self.query.bias"].endswith("query.base_layer.bias")
    everything = oftmerge.read_adapter(bert["all"])
    stored = set(load_file(bert["all"] / "adapter_model.safetensors"))
    # bias='all' also stores the head's untrained original and a duplicate; PEFT's loader uses neither
    assert any(".original_module." in k for k in stored) and any(".modules_to_save." in k for k in stored)
    assert not any(".original_module." in k or ".modules_to_save." in k for k in everything.saved.values())
    assert "bert.pooler.dense.bias" in everything.saved and "bert.embeddings.LayerNorm.bias" in everything.saved


# -- fold = merge_and_unload -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["a", "oft_only", "all"])
def test_fold_equals_merge_and_unload(bert, which, tmp_path):
    out = tmp_path / "folded"
    assert main(["fold", str(bert[which]), "--base", str(bert["base"]), "-o", str(out), "-q"]) == 0
    ref = _peft(bert["base"], bert[which]).merge_and_unload().state_dict()
    got = load_file(out / "model.safetensors")
    assert set(got) == set(ref)
    for k, v in got.items():
        assert torch.allclose(v, ref[k], rtol=1e-6, atol=1e-7), k
    saved = oftmerge.read_adapter(bert[which]).saved
    for name, key in saved.items():  # the saved tensors are copied exactly (same dtype here)
        assert torch.equal(got[name], load_file(bert[which] / "adapter_model.safetensors")[key])
    prov = json.loads((out / "oftmerge.json").read_text())
    assert set(prov["saved_tensors"]) == set(saved)
    with torch.no_grad():
        folded = _load_bert(out)
        assert torch.allclose(folded(X).logits, _peft(bert["base"], bert[which])(X).logits, atol=1e-5)


def _pretrained_bert(path):
    """A checkpoint as users download one: BertForPreTraining (backbone + its pretraining heads, no classifier)."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    BertForPreTraining(BertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)).save_pretrained(path)
    return path


@pytest.mark.parametrize("base_kind", ["other labels", "pretraining checkpoint"])
def test_fold_takes_a_head_the_base_does_not_fit_as_peft_does(bert, base_kind, tmp_path):
    """A 5-label adapter on a 3-label base, or on a checkpoint with no classifier: as PEFT with num_labels=5, ignore_mismatched_sizes."""
    base = bert["base"] if base_kind == "other labels" else _pretrained_bert(tmp_path / "pretrained")
    out = tmp_path / "out"
    assert main(["fold", str(bert["five"]), "--base", str(base), "-o", str(out), "-q"]) == 0
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = PeftModel.from_pretrained(_load_bert(base, num_labels=5, ignore_mismatched_sizes=True), str(bert["five"])).merge_and_unload()
    ref_dir = tmp_path / "ref"
    ref_model.save_pretrained(ref_dir)
    ref, got = load_file(ref_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(ref) == set(got)  # the pretraining heads (cls.*) are left out, as in PEFT's saved model
    for k, v in ref.items():
        assert torch.allclose(got[k], v, rtol=1e-6, atol=1e-7), k
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (out, ref_dir))
    assert cfg["architectures"] == ref_cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == ref_cfg["id2label"] and len(cfg["id2label"]) == 5
    with torch.no_grad():
        assert torch.allclose(_load_bert(out)(X).logits, ref_model.eval()(X).logits, atol=1e-5)


def test_fold_names_a_bare_backbone_checkpoint(bert, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)).save_pretrained(tmp_path / "bare")
    capsys.readouterr()
    assert main(["fold", str(bert["five"]), "--base", str(tmp_path / "bare"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without the 'bert.' prefix" in err[0] and "AutoModelForSequenceClassification" in err[0]


def test_fold_refuses_a_saved_bias_the_base_does_not_fit(bert, tmp_path, capsys):
    from transformers import BertConfig

    base = tmp_path / "wider"
    _bert(base)
    cfg = BertConfig.from_pretrained(base)
    cfg.intermediate_size = 128  # the rotated layers fit; the saved intermediate.dense.bias does not
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(cfg).save_pretrained(base)
    capsys.readouterr()
    assert main(["fold", str(bert["all"]), "--base", str(base), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "intermediate.dense.bias" in err[0] and "trained on another model" in err[0]
    assert not (tmp_path / "out").exists()


# -- merge policies ----------------------------------------------------------------------------


def test_identical_is_the_default_and_refuses_different_heads(bert, tmp_path, capsys):
    assert main(["merge", str(bert["a"]), str(bert["b"]), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classifier" in err[0]
    assert all(p in err[0] for p in ("mean", "first", "drop")) and "Traceback" not in err[0]
    # the same head twice is kept
    r = oftmerge.merge_adapters([bert["a"], bert["a"]], out_dir=tmp_path / "same")
    assert torch.equal(r.tensors["base_model.model.classifier.weight"], _head(bert["a"])[0])


def test_first_takes_the_first_input_in_the_order_given(bert, tmp_path):
    for order in (("a", "b"), ("b", "a")):
        out = tmp_path / "-".join(order)
        assert main(["merge", *(str(bert[k]) for k in order), "--saved-modules", "first", "-o", str(out), "-q"]) == 0
        w, b = _head(bert[order[0]])
        assert torch.equal(_head(out)[0], w) and torch.equal(_head(out)[1], b)
        model = _peft(bert["base"], out)
        wrapped = model.base_model.model.classifier.modules_to_save["default"]
        assert torch.equal(wrapped.weight, w)
        prov = json.loads((out / "oftmerge.json").read_text())
        assert prov["saved_modules"]["policy"] == "first"
        assert str(bert[order[0]]) in prov["saved_modules"]["tensors"]["classifier.weight"]


def test_mean_is_weighted_by_the_merge_weights(bert, tmp_path):
    r = oftmerge.merge_adapters([bert["a"], bert["b"]], weights=[3.0, 1.0], saved_modules="mean")
    (wa, ba), (wb, bb) = _head(bert["a"]), _head(bert["b"])
    assert torch.allclose(r.tensors["base_model.model.classifier.weight"], ((3 * wa.double() + wb.double()) / 4).float(), rtol=0, atol=1e-7)
    assert torch.allclose(r.tensors["base_model.model.classifier.bias"], ((3 * ba.double() + bb.double()) / 4).float(), rtol=0, atol=1e-7)
    assert r.config["modules_to_save"] == ["classifier"] and r.config["task_type"] == "SEQ_CLS"


def test_mean_refuses_heads_of_different_shapes(bert):
    with pytest.raises(IncompatibleAdaptersError, match=r"classifier\.(weight|bias).*different shapes.*first or drop"):
        oftmerge.merge_adapters([bert["a"], bert["five"]], saved_modules="mean")
    r = oftmerge.merge_adapters([bert["five"], bert["a"]], saved_modules="first")
    assert r.tensors["base_model.model.classifier.weight"].shape == (5, H)


def test_drop_writes_no_head_and_peft_uses_the_base_one(bert, tmp_path):
    out = tmp_path / "dropped"
    r = oftmerge.merge_adapters([bert["a"], bert["b"]], saved_modules="drop", out_dir=out)
    assert not any("classifier" in k for k in r.tensors)
    assert r.config["task_type"] is None and any("dropped" in w for w in r.warnings)
    model = _peft(bert["base"], out)  # PEFT loads it (a SEQ_CLS adapter without its head would not load)
    base = _load_bert(bert["base"])
    assert torch.equal(model.base_model.model.classifier.weight, base.classifier.weight)


def test_biases_keep_their_config(bert, tmp_path):
    r = oftmerge.merge_adapters([bert["oft_only"], bert["a"]], saved_modules="first", out_dir=tmp_path / "m")
    assert r.config["bias"] == "oft_only"
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in r.tensors
    r = oftmerge.merge_adapters([bert["all"], bert["a"]], saved_modules="first")
    assert r.config["bias"] == "all"
    # the merged adapter folds like PEFT folds it
    out = tmp_path / "folded"
    oftmerge.merge_adapters([bert["all"], bert["a"]], saved_modules="first", out_dir=out, base=bert["base"], output="model")
    merged = tmp_path / "merged"
    oftmerge.merge_adapters([bert["all"], bert["a"]], saved_modules="first", out_dir=merged)
    ref = _peft(bert["base"], merged).merge_and_unload().state_dict()
    got = load_file(out / "model.safetensors")
    for k, v in got.items():
        assert torch.allclose(v, ref[k], rtol=1e-6, atol=1e-7), k


def test_inspect_lists_the_saved_tensors(bert, capsys):
    assert main(["inspect", str(bert["oft_only"]), "--base", str(bert["base"])]) == 0
    out = capsys.readouterr().out
    assert "saved tensor(s)" in out and "classifier.weight" in out and "query.bias" in out
    from oftmerge.ops.inspect import inspect_adapters

    report = inspect_adapters([bert["a"]], base=bert["base"])
    saved = {t["name"]: t for t in report["adapters"][0]["saved"]}
    assert saved["classifier.weight"]["shape"] == [LABELS, H] and saved["classifier.weight"]["replaces"] == "classifier.weight"


# -- the live API ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["first", "mean", "drop"])
def test_live_api_equals_the_file_path(bert, policy, tmp_path):
    from peft import PeftModel

    import oftmerge.peft  # noqa: F401  (adds merge_oft_adapters)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_load_bert(bert["base"]), str(bert["a"]), adapter_name="a")
        model.load_adapter(str(bert["b"]), adapter_name="b")
    live = model.merge_oft_adapters(["a", "b"], adapter_name="m", saved_modules=policy)
    disk = oftmerge.merge_adapters([bert["a"], bert["b"]], saved_modules=policy, out_dir=tmp_path / "m")
    assert set(live.tensors) == set(disk.tensors)
    assert all(torch.equal(live.tensors[k], disk.tensors[k]) for k in disk.tensors)
    model.set_adapter("m")
    with torch.no_grad():
        assert torch.allclose(model.eval()(X).logits, _peft(bert["base"], tmp_path / "m")(X).logits, atol=1e-6)
    with pytest.raises(IncompatibleAdaptersError, match="saved_modules"):
        model.merge_oft_adapters(["a", "b"], adapter_name="again")


def test_a_causal_lm_base_folds_into_a_classifier_as_peft_does(tmp_path):
    """A Llama SEQ_CLS adapter (its `score` head) on a LlamaForCausalLM checkpoint: score added, lm_head left out, as PEFT saves it."""
    from peft import OFTConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from helpers import save_llama

    base = save_llama(tmp_path / "base", pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=4, ignore_mismatched_sizes=True)
        peft_model = get_peft_model(model, OFTConfig(task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], oft_block_size=8))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        peft_model.save_pretrained(tmp_path / "adapter")
        ref = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=4, ignore_mismatched_sizes=True),
                                        str(tmp_path / "adapter")).merge_and_unload().eval()  # fmt: skip
    assert main(["fold", str(tmp_path / "adapter"), "--base", str(base), "-o", str(tmp_path / "out"), "-q"]) == 0
    ref.save_pretrained(tmp_path / "ref")
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert set(got) == set(want) and "lm_head.weight" not in got and got["score.weight"].shape == (4, 64)
    assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    ids = torch.tensor([[1, 5, 7, 9], [3, 4, 0, 0]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
        assert torch.allclose(folded(ids).logits, ref(ids).logits, atol=1e-5)
