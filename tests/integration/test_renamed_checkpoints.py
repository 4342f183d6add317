"""Checkpoints whose saved names differ from the model's module names (transformers 5 renames them on load).

transformers 5 loads, e.g., ViT's saved ``vit.encoder.layer.0.attention.attention.query.weight`` as
``vit.layers.0.attention.q_proj.weight`` and saves it back under the old name; PEFT names modules after
the loaded model. oftmerge maps the names with transformers' own conversion mapping
(:mod:`oftmerge.formats.names`). Architectures of transformers 5.24 that rename on load, one per kind of
mapping (every one whose weights OFT can target, Linear or Conv2d):

* ViT (``ViTModel``'s mapping, scoped to the ``vit`` sub-model), DeiT (an alias of that mapping),
  Swin (its ``model_type``'s), Dinov2 (renamings besides converters), Segformer (a Linear of the
  decode head and the encoder's), GPT-NeoX (``embed_out`` is ``lm_head``, a mapping of the class);
* Mixtral: its attention is not renamed, but the MoE experts are fused on load (a ``WeightConverter``),
  which must not get in the way.

For each, on a tiny random model saved with ``save_pretrained`` and PEFT OFT adapters with seeded random
generators: every model parameter maps to a checkpoint tensor of its shape; ``oftmerge fold`` equals
``PeftModel.merge_and_unload()`` then ``save_pretrained`` (same tensor names, <= 1e-6 relative);
``merge --base`` and ``inspect --base`` accept the adapters, ``merge --fold-into`` equals folding the
merged adapter. A weight transformers builds from several
tensors (Dinov2's SwiGLU ``gate_proj`` / ``up_proj``, split from ``weights_in``) is refused by the fold
with a one-line reason, and still merges.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from oftmerge.cli import main
from oftmerge.errors import IncompatibleAdaptersError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.names import name_map
from oftmerge.plan.fold import base_key

from helpers import ROOT, max_rel_diff, model_tensors

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Case:
    name: str
    config: str  #: transformers config class
    kwargs: dict[str, Any]
    model: str  #: transformers model class
    targets: list[str]  #: OFT targets (block size 8) of both adapters
    renamed: tuple[str, str]  #: an adapted module and the checkpoint tensor it folds into
    oft: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("vit", "ViTConfig", dict(SMALL, image_size=16, patch_size=4, num_labels=3), "ViTForImageClassification", ATTN + ["fc1", "fc2"],
         ("vit.layers.0.attention.q_proj", "vit.encoder.layer.0.attention.attention.query.weight")),  # fmt: skip
    Case("deit", "DeiTConfig", dict(SMALL, image_size=16, patch_size=4, num_labels=3), "DeiTForImageClassification", ATTN + ["fc1", "fc2"],
         ("deit.layers.0.mlp.fc2", "deit.encoder.layer.0.output.dense.weight")),  # fmt: skip
    Case("swin", "SwinConfig", dict(image_size=16, patch_size=2, embed_dim=16, depths=[1], num_heads=[2], window_size=4, num_labels=3),
         "SwinForImageClassification", ATTN + ["fc1", "fc2"],
         ("swin.encoder.layers.0.blocks.0.attention.k_proj", "swin.encoder.layers.0.blocks.0.attention.self.key.weight")),  # fmt: skip
    Case("dinov2", "Dinov2Config", dict(SMALL, image_size=16, patch_size=4), "Dinov2Model", ATTN + ["fc1"],
         ("encoder.layer.0.attention.o_proj", "encoder.layer.0.attention.output.dense.weight"), oft=dict(use_cayley_neumann=False)),  # fmt: skip
    Case("segformer", "SegformerConfig", dict(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[16], patch_sizes=[3], strides=[2],
         num_attention_heads=[2], mlp_ratios=[2], decoder_hidden_size=16, num_labels=3), "SegformerForSemanticSegmentation",
         ATTN + ["fc1", "fc2", "linear_projections.0.proj"],
         ("decode_head.linear_projections.0.proj", "decode_head.linear_c.0.proj.weight")),  # fmt: skip
    Case("gpt-neox", "GPTNeoXConfig", dict(SMALL, vocab_size=96, max_position_embeddings=64), "GPTNeoXForCausalLM",
         ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"], ("lm_head", "embed_out.weight")),  # fmt: skip
    Case("mixtral", "MixtralConfig", dict(SMALL, num_key_value_heads=2, vocab_size=96, num_local_experts=2, num_experts_per_tok=1,
         max_position_embeddings=64), "MixtralForCausalLM", ATTN + ["lm_head"],
         ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.weight")),  # fmt: skip
]


def _cls(case: Case):
    import transformers

    return getattr(transformers, case.model)


def _load(case: Case, path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _cls(case).from_pretrained(path).eval()


def _adapter(case: Case, base: Path, path: Path, seed: int, targets: list[str] | None = None) -> Path:
    from peft import OFTConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_load(case, base), OFTConfig(target_modules=targets or case.targets, oft_block_size=8, **case.oft))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(path), save_embedding_layers=False)
    return path


@dataclass(frozen=True)
class Built:
    base: Path
    a1: Path
    a2: Path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``zoo(case)``: the case's base (save_pretrained) and two OFT adapters, built on first use."""
    import transformers

    built: dict[str, Built] = {}

    def get(case: Case) -> Built:
        if case.name not in built:
            root = tmp_path_factory.mktemp(case.name)
            torch.manual_seed(0)
            _cls(case)(getattr(transformers, case.config)(**case.kwargs)).save_pretrained(root / "base")
            built[case.name] = Built(root / "base", _adapter(case, root / "base", root / "a1", 1), _adapter(case, root / "base", root / "a2", 2))
        return built[case.name]

    return get


def _peft_folded(case: Case, base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """What PEFT's user gets: merge_and_unload, then save_pretrained (transformers writes the checkpoint's names back)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(_load(case, base), str(adapter)).merge_and_unload().save_pretrained(out)
    return model_tensors(out)


# -- the map ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_model_parameter_maps_to_a_checkpoint_tensor_of_its_shape(zoo, case):
    ckpt = Checkpoint(zoo(case).base)
    module, key = case.renamed
    assert ckpt.model_key(f"{module}.weight") == key and key in ckpt
    model = _load(case, zoo(case).base)
    shapes = ckpt.model_shapes()
    for name, p in model.named_parameters():
        assert shapes[name] == tuple(p.shape), name
        if ckpt.converted(name) is None:
            assert ckpt.model_key(name) in ckpt and ckpt.shape(ckpt.model_key(name)) == tuple(p.shape), name
        else:  # Mixtral's experts: transformers stacks them on load
            assert case.name == "mixtral" and ".mlp.experts." in name and ckpt.model_key(name) is None
    assert ckpt.names.renamed and "conversion mapping of" in ckpt.names.how


def test_a_checkpoint_key_the_model_does_not_use_is_its_own_name(zoo):
    """What an adapter trained with transformers 4 (no renaming on load) calls the module."""
    ckpt = Checkpoint(zoo(CASES[0]).base)
    old = "vit.encoder.layer.0.attention.attention.query.weight"
    assert ckpt.model_key(old) == old and ckpt.model_shapes()[old] == ckpt.shape(old)
    assert ckpt.model_key("vit.encoder.layer.0.nothing.weight") is None


# -- fold, merge --base, inspect --base ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fold_equals_peft_merge_and_unload_then_save_pretrained(zoo, case, tmp_path, capsys):
    b = zoo(case)
    assert main(["fold", str(b.a1), "--base", str(b.base), "-o", str(tmp_path / "out")]) == 0
    module, key = case.renamed
    assert f"{module} " in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    got, want = model_tensors(tmp_path / "out"), _peft_folded(case, b.base, b.a1, tmp_path / "peft")
    assert set(got) == set(want) == set(Checkpoint(b.base).keys())  # the checkpoint's names, as save_pretrained writes them
    assert max_rel_diff(got, want) <= 1e-6
    assert not torch.equal(got[key], model_tensors(b.base)[key])  # the renamed module was folded
    folded = json.loads((tmp_path / "out" / "oftmerge.json").read_text())["modules"]
    assert folded[module] == key


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_merge_fold_into_and_inspect_with_the_base(zoo, case, tmp_path, capsys):
    b = zoo(case)
    assert main(["merge", str(b.a1), str(b.a2), "-o", str(tmp_path / "free"), "-q"]) == 0
    assert main(["merge", str(b.a1), str(b.a2), "--base", str(b.base), "-o", str(tmp_path / "m"), "-q"]) == 0
    with_base, free = load_file(tmp_path / "m" / "adapter_model.safetensors"), load_file(tmp_path / "free" / "adapter_model.safetensors")
    assert with_base.keys() == free.keys() and all(torch.equal(with_base[k], free[k]) for k in free)
    # merge --fold-into folds the merge into the checkpoint's tensors, as fold does with the merged adapter
    assert main(["merge", str(b.a1), str(b.a2), "--fold-into", str(b.base), "-o", str(tmp_path / "mf"), "-q"]) == 0
    assert main(["fold", str(tmp_path / "m"), "--base", str(b.base), "-o", str(tmp_path / "f"), "-q"]) == 0
    merged_folded, folded = model_tensors(tmp_path / "mf"), model_tensors(tmp_path / "f")
    assert set(merged_folded) == set(Checkpoint(b.base).keys()) and max_rel_diff(merged_folded, folded) <= 1e-6
    capsys.readouterr()
    assert main(["inspect", str(b.a1), "--base", str(b.base), "--json"]) == 0
    modules = [m["name"] for m in json.loads(capsys.readouterr().out)["adapters"][0]["modules"]]
    stored = {k.removeprefix("base_model.model.").split(".oft_")[0] for k in load_file(b.a1 / "adapter_model.safetensors")}
    assert case.renamed[0] in modules and set(modules) == stored


def test_an_adapter_naming_modules_as_the_checkpoint_does_folds_the_same(zoo, tmp_path):
    """An adapter trained under transformers 4 names ViT's modules as its checkpoint does: folded into the same tensors."""
    case = CASES[0]
    b = zoo(case)
    ckpt = Checkpoint(b.base)
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((b.a1 / "adapter_config.json").read_text())
    tensors = {}
    for k, v in load_file(b.a1 / "adapter_model.safetensors").items():
        module, suffix = k.removeprefix("base_model.model.").split(".oft_")
        tensors[f"base_model.model.{ckpt.model_key(module + '.weight').removesuffix('.weight')}.oft_{suffix}"] = v
    config["target_modules"] = sorted({k.removeprefix("base_model.model.").split(".oft_")[0].rsplit(".", 1)[-1] for k in tensors})
    save_file(tensors, old / "adapter_model.safetensors", metadata={"format": "pt"})
    (old / "adapter_config.json").write_text(json.dumps(config))
    assert main(["fold", str(old), "--base", str(b.base), "-o", str(tmp_path / "o-old"), "-q"]) == 0
    assert main(["fold", str(b.a1), "--base", str(b.base), "-o", str(tmp_path / "o-new"), "-q"]) == 0
    a, n = model_tensors(tmp_path / "o-old"), model_tensors(tmp_path / "o-new")
    assert a.keys() == n.keys() and all(torch.equal(a[k], n[k]) for k in n)


# -- what cannot be folded, and what is missing ------------------------------------------------------------------


def test_a_weight_transformers_builds_from_several_tensors_is_refused_in_one_line(tmp_path, capsys):
    case = Case("dinov2-swiglu", "Dinov2Config", dict(SMALL, image_size=16, patch_size=4, use_swiglu_ffn=True), "Dinov2Model",
                ["q_proj", "gate_proj", "up_proj"], ("encoder.layer.0.attention.q_proj", "encoder.layer.0.attention.attention.query.weight"))  # fmt: skip
    import transformers

    torch.manual_seed(0)
    _cls(case)(transformers.Dinov2Config(**case.kwargs)).save_pretrained(tmp_path / "base")
    a1, a2 = _adapter(case, tmp_path / "base", tmp_path / "a1", 1), _adapter(case, tmp_path / "base", tmp_path / "a2", 2)
    ckpt = Checkpoint(tmp_path / "base")
    assert ckpt.model_key("encoder.layer.0.mlp.gate_proj.weight") is None
    assert "Chunk" in ckpt.converted("encoder.layer.0.mlp.gate_proj.weight")
    assert ckpt.model_shapes()["encoder.layer.0.mlp.up_proj.weight"] == (88, 32)  # the model's shape: the adapter reads against it
    capsys.readouterr()
    assert main(["fold", str(a1), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert "module 'encoder.layer.0.mlp." in err and "encoder.layer.0.mlp.weights_in.weight (Chunk)" in err and "tensor by tensor" in err
    # a merge does not need the base's tensors: it still works, and inspect too
    assert main(["merge", str(a1), str(a2), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "m"), "-q"]) == 0
    assert main(["inspect", str(a1), "--base", str(tmp_path / "base")]) == 0


def test_a_module_the_base_lacks_names_the_closest(zoo):
    ckpt = Checkpoint(zoo(CASES[0]).base)
    with pytest.raises(IncompatibleAdaptersError, match=r"has no weight 'vit.layers.0.attention.q_prj.weight' \(closest: vit.layers.0.attention.q_proj.weight"):
        base_key("vit.layers.0.attention.q_prj", ckpt)
    with pytest.raises(IncompatibleAdaptersError, match=r"the adapter was trained on another model"):
        base_key("transformer.h.0.attn.c_attn", ckpt)


# -- when the map is the identity ----------------------------------------------------------------------------------


def test_no_config_or_an_unknown_class_is_the_identity(zoo, tmp_path):
    keys = Checkpoint(zoo(CASES[0]).base).keys()
    assert not name_map(tmp_path, keys).renamed and "not readable" in name_map(tmp_path, keys).how
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForAnything"], "model_type": "nope"}))
    names = name_map(tmp_path, keys)
    assert names.to_checkpoint == {k: k for k in keys} and "no class NoSuchModelForAnything" in names.how


def test_the_package_imports_and_maps_by_identity_without_transformers(zoo):
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # import transformers -> ImportError
        "import oftmerge, oftmerge.formats.checkpoint as c\n"
        f"ck = c.Checkpoint({str(zoo(CASES[0]).base)!r})\n"
        "assert ck.model_shapes() == ck.shapes() and 'no transformers' in ck.names.how, ck.names.how\n"
        "assert ck.model_key('vit.layers.0.attention.q_proj.weight') is None\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
