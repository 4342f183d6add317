"""The architecture matrix: merge, fold and the live API on tiny random models of every family users bring.

One table entry per architecture (transformers config + tiny arguments, model class, OFT targets, task
type, example input). For each, a base is built once per module and saved with ``save_pretrained``, and
three OFT adapters are made with stock PEFT (seeded random generators; the first two on ``targets`` with
block size 8, the third on ``third`` with block size 4, so modules are adapted by 1, 2 or 3 inputs on
different block grids). Four checks per architecture:

* ``n1``: merging one adapter returns its stored tensors bit for bit (in memory and after saving);
* ``merge``: the merge of the three equals an independent Eq. 7-8 (:func:`helpers.orthomerge_generator`
  on the generators read with json + safetensors only), module by module;
* ``fold``: folding the first adapter equals PEFT's ``merge_and_unload`` (state dict, float32, 1e-6
  relative) and its forward pass; where PEFT's forward and its own merge disagree (Conv2d with a kernel
  larger than 1x1, a rotated tied embedding) the disagreement is measured and what oftmerge does instead
  is checked (docs/fold.md, "Where PEFT disagrees with itself"); where the fold must refuse (an adapter on a weight
  tied in a group of more than two: Bart's and T5's ``shared``), fold and ``merge --fold-into`` refuse it with the
  reason and write nothing;
* ``live``: ``PeftModel.merge_oft_adapters`` on the three adapters loaded in one PeftModel gives the
  tensors of the merge from disk, and the same forward.

A case that fails until a reported bug is fixed is marked with ``Arch(xfail={check: (reason, exception)})``:
``xfail(strict=True)`` with the exception it raises now, so it flips when the fix lands (none today).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import oftmerge
import oftmerge.peft  # noqa: F401  (enables PeftModel.merge_oft_adapters)
from oftmerge.errors import IncompatibleAdaptersError

from helpers import ROOT, orthomerge_generator, stored_generators

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
#: decoder-only LMs: hidden 32, 2 layers, 4 query and 2 key/value heads of 8 (GQA: k_proj/v_proj are 16 x 32)
CAUSAL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              vocab_size=96, max_position_embeddings=64)  # fmt: skip
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=96, max_position_embeddings=64, num_labels=3)
BERT_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]
T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=96, decoder_start_token_id=0, pad_token_id=0)
BART = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, vocab_size=96, max_position_embeddings=64)  # fmt: skip


@dataclass(frozen=True)
class Arch:
    name: str
    config: str  #: transformers config class
    kwargs: dict[str, Any]
    model: str  #: transformers model class
    targets: list[str]  #: of the first two adapters (block size 8)
    third: list[str]  #: of the third adapter (block size 4): overlaps ``targets`` in part
    inputs: str = "text"  #: "text", "seq2seq" or "image:<size>"
    task_type: str | None = None
    oft: dict[str, Any] = field(default_factory=dict)  #: more OFTConfig arguments, for all three adapters
    disagrees: str | None = None  #: "conv2d" / "tied": PEFT's forward is not its merge_and_unload for the first adapter
    #: the fold refuses the first adapter: what its message must say (a regex), e.g. a weight tied in a group of more than two
    refused: str | None = None
    xfail: dict[str, tuple[str, type[Exception]]] = field(default_factory=dict)  #: check -> (reason, exception raised now)
    merge: dict[str, Any] = field(default_factory=dict)  #: more merge_adapters / merge_oft_adapters arguments
    #: False where PEFT's merge_and_unload raises: the reference is then its in-place merge_adapter()
    peft_unload: bool = True


# fmt: off
ARCHS = [
    Arch("llama", "LlamaConfig", CAUSAL, "LlamaForCausalLM", ATTN + MLP + ["lm_head"], ["q_proj", "down_proj", "embed_tokens"]),
    Arch("qwen2", "Qwen2Config", CAUSAL, "Qwen2ForCausalLM", ATTN + MLP, ["q_proj", "v_proj"], oft=dict(use_cayley_neumann=False)),  # q/k/v biases
    Arch("qwen3", "Qwen3Config", CAUSAL, "Qwen3ForCausalLM", ATTN + MLP, ["k_proj", "o_proj", "lm_head"]),  # q_norm / k_norm
    Arch("mistral", "MistralConfig", CAUSAL, "MistralForCausalLM", ATTN + MLP, ["q_proj", "up_proj"]),
    # fused projections: qkv_proj is (32 + 2 * 16) x 32, gate_up_proj 128 x 32; OFT rotates their input side
    Arch("phi3", "Phi3Config", {**CAUSAL, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "Phi3ForCausalLM",
         ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj", "gate_up_proj"]),
    # Gemma ties lm_head to the (scaled) input embedding and stores only the embedding
    Arch("gemma", "GemmaConfig", CAUSAL, "GemmaForCausalLM", ATTN + MLP + ["embed_tokens"], ["q_proj", "v_proj"], disagrees="tied"),
    Arch("gemma2", "Gemma2Config", CAUSAL, "Gemma2ForCausalLM", ATTN + MLP + ["lm_head"], ["q_proj", "lm_head"], disagrees="tied"),
    Arch("gemma3", "Gemma3TextConfig", CAUSAL, "Gemma3ForCausalLM", ATTN + MLP, ["q_proj", "down_proj"]),  # tied, untouched: stays tied
    Arch("opt", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=96, max_position_embeddings=64,
         word_embed_proj_dim=32), "OPTForCausalLM", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["q_proj", "fc2", "embed_tokens"]),
    # encoder-decoder: self-attention, cross-attention and the feed-forward of both stacks
    Arch("t5", "T5Config", T5, "T5ForConditionalGeneration", ["q", "k", "v", "o", "wi", "wo"], ["q", "wo"], inputs="seq2seq"),
    Arch("bart", "BartConfig", BART, "BartForConditionalGeneration", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["k_proj", "fc1"],
         inputs="seq2seq", oft=dict(use_cayley_neumann=False)),
    # Bart and T5 tie lm_head and both embed_tokens to `shared` (four names, one matrix): a fold of any of them is refused
    # (docs/fold.md, "Tied embeddings"); on `shared`, PEFT's forward never even calls the adapted module
    Arch("bart-lm-head", "BartConfig", BART, "BartForConditionalGeneration", ["q_proj", "fc1", "lm_head"], ["k_proj", "lm_head"],
         inputs="seq2seq", refused=r"cannot fold 'lm_head' into .*: the base ties lm_head.weight, model.decoder.embed_tokens.weight, "
         r"model.encoder.embed_tokens.weight to model.shared.weight \(one stored matrix\)"),
    Arch("bart-shared", "BartConfig", BART, "BartForConditionalGeneration", ["q_proj", "shared"], ["k_proj", "shared"], inputs="seq2seq",
         refused=r"cannot fold 'model.shared' into .*PEFT's forward never calls model.shared: the model calls lm_head, "
         r"model.decoder.embed_tokens, model.encoder.embed_tokens"),
    Arch("t5-lm-head", "T5Config", T5, "T5ForConditionalGeneration", ["q", "wo", "lm_head"], ["k", "lm_head"], inputs="seq2seq",
         refused=r"cannot fold 'lm_head' into .*: the base ties decoder.embed_tokens.weight, encoder.embed_tokens.weight, "
         r"lm_head.weight to shared.weight .*T5 cannot be untied"),
    # SEQ_CLS: PEFT adds the head to modules_to_save and saves it (trained, so different in every adapter)
    Arch("bert", "BertConfig", ENCODER, "BertForSequenceClassification", BERT_TARGETS, ["query", "value"], task_type="SEQ_CLS",
         merge=dict(saved_modules="mean")),
    # RobertaClassificationHead (dense + out_proj) has no .weight: PEFT 0.21.2's merge_and_unload of an OFT adapter raises
    Arch("roberta", "RobertaConfig", {**ENCODER, "pad_token_id": 1}, "RobertaForSequenceClassification", BERT_TARGETS, ["query", "value"],
         task_type="SEQ_CLS", merge=dict(saved_modules="mean"), peft_unload=False),
    # ViT: the patch embedding is a Conv2d 3 -> 32, kernel 4, stride 4 (rotated on its flattened 48 inputs)
    Arch("vit", "ViTConfig", dict(ENCODER, image_size=16, patch_size=4, num_channels=3), "ViTForImageClassification",
         ATTN + ["fc1", "fc2", "projection"], ["q_proj", "projection", "classifier"], inputs="image:16", disagrees="conv2d"),
    Arch("vit-patch", "ViTConfig", dict(ENCODER, image_size=16, patch_size=4, num_channels=3), "ViTForImageClassification",
         ["projection", "classifier"], ["projection"], inputs="image:16", disagrees="conv2d"),
    # padded and strided convs: ResNet basic blocks (3x3, padding 1, stride 1 and 2), 1x1 stride-2 shortcut, 7x7 stride-2 stem
    # (3 * 49 = 147 inputs: PEFT adjusts the block size to 7, resp. 3, and the merge takes the grid 21)
    Arch("resnet", "ResNetConfig", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3),
         "ResNetForImageClassification", ["convolution", "classifier.1"], ["embedder.convolution", "layer.1.convolution"], inputs="image:32",
         disagrees="conv2d"),
]
# fmt: on


def _cases(check: str) -> list:
    marks = {a.name: [pytest.mark.xfail(strict=True, reason=a.xfail[check][0], raises=a.xfail[check][1])] if check in a.xfail else [] for a in ARCHS}
    return [pytest.param(a, id=a.name, marks=marks[a.name]) for a in ARCHS]


# -- building the models and adapters ------------------------------------------------------------------


def _load(arch: Arch, path: Path) -> torch.nn.Module:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, arch.model).from_pretrained(path).eval()


def _peft(arch: Arch, base: Path, adapters: dict[str, Path]):
    """A PeftModel of ``base`` with ``adapters`` (name -> directory) loaded, the first one active."""
    from peft import PeftModel

    (first, path), *rest = adapters.items()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_load(arch, base), str(path), adapter_name=first)
        for name, p in rest:
            model.load_adapter(str(p), adapter_name=name)
    return model.eval()


def _example(arch: Arch) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    if arch.inputs.startswith("image:"):
        size = int(arch.inputs.split(":")[1])
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}
    ids = torch.randint(3, 96, (2, 8), generator=g)
    if arch.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 96, (2, 5), generator=g)}
    return {"input_ids": ids}


def _logits(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-30)


def _merged_state(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict after PEFT's in-place ``merge_adapter()``, under the plain model's names."""
    state = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".original_module." in key or ".oft_" in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".modules_to_save.a.", ".")] = value
    return state


@dataclass(frozen=True)
class Built:
    base: Path
    adapters: tuple[Path, Path, Path]


def _build(arch: Arch, root: Path) -> Built:
    import transformers
    from peft import OFTConfig, get_peft_model

    torch.manual_seed(0)
    config = getattr(transformers, arch.config)(**arch.kwargs)
    getattr(transformers, arch.model)(config).save_pretrained(root / "base")
    adapters = []
    for seed, targets, block in ((1, arch.targets, 8), (2, arch.targets, 8), (3, arch.third, 4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oft = OFTConfig(target_modules=list(targets), oft_block_size=block, task_type=arch.task_type, **arch.oft)
            model = get_peft_model(_load(arch, root / "base"), oft)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "oft_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.03)
                    elif "modules_to_save" in name:  # a head "trained" with the adapter
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
            model.save_pretrained(root / f"a{seed}", save_embedding_layers=False)
        adapters.append(root / f"a{seed}")
    return Built(root / "base", tuple(adapters))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``zoo(arch)``: the architecture's base and three adapters, built on first use, once per module."""
    built: dict[str, Built] = {}

    def get(arch: Arch) -> Built:
        if arch.name not in built:
            built[arch.name] = _build(arch, tmp_path_factory.mktemp(arch.name))
        return built[arch.name]

    return get


# -- the checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", _cases("n1"))
def test_one_adapter_merges_to_itself(arch, zoo, tmp_path):
    a = zoo(arch).adapters[0]
    stored = load_file(a / "adapter_model.safetensors")
    result = oftmerge.merge_adapters([a], out_dir=tmp_path / "m")
    for tensors in (result.tensors, load_file(tmp_path / "m" / "adapter_model.safetensors")):
        assert tensors.keys() == stored.keys()
        for key, tensor in stored.items():
            assert tensor.dtype == tensors[key].dtype and torch.equal(tensor, tensors[key]), key


@pytest.mark.parametrize("arch", _cases("merge"))
def test_merge_equals_independent_orthomerge(arch, zoo, tmp_path):
    adapters = zoo(arch).adapters
    result = oftmerge.merge_adapters(adapters, out_dir=tmp_path / "m", **arch.merge)
    inputs = [stored_generators(a) for a in adapters]
    merged = stored_generators(tmp_path / "m")
    assert merged.keys() == set().union(*inputs) == result.modules.keys()
    counts = set()
    for name, q in merged.items():
        qs = [g[name] for g in inputs if name in g]
        counts.add(len(qs))
        expected = qs[0] if len(qs) == 1 else orthomerge_generator(qs, [1.0] * len(qs))
        assert _rel(q, expected) <= 1e-6, (name, _rel(q, expected))
    assert counts >= {2, 3}  # modules adapted by two and by all three inputs
    # saved tensors (SEQ_CLS heads) with saved_modules="mean": the mean of the inputs' own
    stored = [load_file(a / "adapter_model.safetensors") for a in adapters]
    out = load_file(tmp_path / "m" / "adapter_model.safetensors")
    for key in sorted(k for k in stored[0] if "oft_" not in k):
        expected = torch.stack([s[key] for s in stored if key in s]).mean(0)
        assert key in out and _rel(out[key], expected) <= 1e-6, key


@pytest.mark.parametrize("arch", _cases("fold"))
def test_fold_equals_peft_merge_and_unload(arch, zoo, tmp_path):
    from oftmerge.ops.fold import fold_adapter

    built = zoo(arch)
    adapter = built.adapters[0]
    if arch.refused is not None:
        _check_refused(arch, built, tmp_path)
        return
    result = fold_adapter(adapter, built.base, tmp_path / "out")
    assert (result.untied is not None) == (arch.disagrees == "tied")
    # PEFT's Conv2d forward is not its merge for kernels > 1x1: the fold says so, once (docs/fold.md)
    conv = [w for w in result.warnings if "Conv2d module(s) with kernels larger than 1x1" in w]
    assert len(conv) == (arch.disagrees == "conv2d") and all("Where PEFT disagrees with itself" in w for w in conv)
    x = _example(arch)
    folded = _load(arch, tmp_path / "out")
    peft_model = _peft(arch, built.base, {"a": adapter})
    unmerged = _logits(peft_model, x)
    with peft_model.disable_adapter():
        plain = _logits(peft_model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch.peft_unload:
            merged_model = peft_model.merge_and_unload()
            theirs = merged_model.state_dict()
        else:
            with pytest.raises(AttributeError, match="object has no attribute 'weight'"):
                _peft(arch, built.base, {"a": adapter}).merge_and_unload()
            peft_model.merge_adapter()
            merged_model, theirs = peft_model, _merged_state(peft_model)
    merged, ours = _logits(merged_model, x), _logits(folded, x)
    mine = folded.state_dict()
    assert mine.keys() == theirs.keys()
    diverged = set()
    if result.untied is not None:  # PEFT's in-place merge rotated the one tied matrix: both ends (and every other name of it)
        (rotated,) = set(result.untied) & set(result.modules.values())
        diverged = {k for k, v in theirs.items() if v.data_ptr() == theirs[rotated].data_ptr()} - {rotated}
        assert diverged
        embedding = load_file(built.base / "model.safetensors")[result.untied[0]]
        for key in diverged:  # oftmerge keeps the other end as it was
            assert torch.equal(mine[key], embedding) and not torch.equal(theirs[key], embedding), key
    for key, value in theirs.items():
        if key in diverged:
            continue
        if value.is_floating_point():
            assert mine[key].dtype == value.dtype and _rel(mine[key], value) <= 1e-6, (key, _rel(mine[key], value))
        else:
            assert torch.equal(mine[key], value), key
    assert _rel(ours, plain) > 1e-3  # the adapter does something
    if arch.disagrees == "conv2d":  # PEFT's Conv2d forward is not its merged weight; the fold is the merge
        assert _rel(ours, merged) <= 1e-5 and _rel(unmerged, merged) > 1e-2
    elif arch.disagrees == "tied":  # PEFT's merged model is another model; the fold computes what the adapted model computes
        assert _rel(ours, unmerged) <= 1e-5 and _rel(merged, unmerged) > 1e-3
    else:
        assert _rel(ours, unmerged) <= 1e-5 and _rel(ours, merged) <= 1e-5


def _check_refused(arch: Arch, built: Built, tmp_path: Path) -> None:
    """The fold, and ``merge --fold-into``, refuse the first adapter before writing anything; PEFT's own merge shows why."""
    from oftmerge.ops.fold import fold_adapter

    with pytest.raises(IncompatibleAdaptersError, match=arch.refused):
        fold_adapter(built.adapters[0], built.base, tmp_path / "out")
    with pytest.raises(IncompatibleAdaptersError, match=arch.refused):
        oftmerge.merge_adapters(built.adapters[:2], base=built.base, output="model", out_dir=tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # folding the one tied matrix is what PEFT's merge_and_unload does: another model than the adapted one
    x = _example(arch)
    peft_model = _peft(arch, built.base, {"a": built.adapters[0]})
    unmerged = _logits(peft_model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = _logits(peft_model.merge_and_unload(), x)
    assert _rel(merged, unmerged) > 1e-2, _rel(merged, unmerged)


@pytest.mark.parametrize("arch", _cases("live"))
def test_live_merge_equals_disk_merge(arch, zoo, tmp_path):
    built = zoo(arch)
    names = {f"a{i}": p for i, p in enumerate(built.adapters)}
    model = _peft(arch, built.base, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = model.merge_oft_adapters(list(names), adapter_name="live", **arch.merge)
    disk = oftmerge.merge_adapters(built.adapters, out_dir=tmp_path / "disk", **arch.merge)
    # no copies of base embeddings: the live path reads adapters as save_pretrained(save_embedding_layers=False) saves them
    assert live.tensors.keys() == disk.tensors.keys()
    for key, tensor in disk.tensors.items():
        assert torch.equal(live.tensors[key], tensor), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(tmp_path / "disk"), adapter_name="disk")
    x = _example(arch)
    model.set_adapter("live")
    ours = _logits(model, x)
    model.set_adapter("disk")
    assert torch.equal(ours, _logits(model, x))


# -- where PEFT disagrees with itself: Conv2d (docs/fold.md; the figures come from the script) ---------


@functools.cache
def _disagreement_script():
    spec = importlib.util.spec_from_file_location("peft_conv_disagreement", ROOT / "scripts" / "peft_conv_disagreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel, stride, padding", _disagreement_script().CONVS)
def test_peft_conv2d_forward_is_not_its_merged_weight(kernel, stride, padding):
    r = _disagreement_script().conv_case(kernel, stride, padding)
    assert r["merged_vs_formula"] <= 1e-6 and r["fold_vs_merged"] <= 1e-6  # PEFT merges W R^T; the fold is that merge
    if kernel == 1:  # a 1x1 conv is a Linear on the channels: forward and merge agree
        assert r["forward_vs_merged"] <= 1e-5 and r["identity_forward_vs_base"] <= 1e-6
    else:  # any k > 1, padded, strided or not: overlapping patches are summed by F.fold, even for R = I
        assert r["forward_vs_merged"] > 1 and r["identity_forward_vs_base"] > 1
