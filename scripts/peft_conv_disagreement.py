"""Measure where PEFT's OFT disagrees with itself, and what oftmerge's fold does there.

    python scripts/peft_conv_disagreement.py        # prints the two tables of docs/fold.md ("Where PEFT disagrees with itself")

1. Conv2d. PEFT (>= 0.16) merges an OFT Conv2d as ``W' = W R^T`` on the weight flattened to
   ``(out, in*k*k)``, but its forward unfolds the *input* into k x k patches (stride 1, no padding),
   rotates each patch and folds them back with ``F.fold``, which sums overlapping patches, before the
   base conv runs with its own stride and padding. For k > 1 that is not the conv with the merged
   weight, whatever the stride or padding, and not even the base conv when R = I. For each conv
   shape the table gives, relative to max |reference|: PEFT's forward vs its merged model, PEFT's
   forward vs the base conv for a fresh (identity) adapter, PEFT's merged weight vs ``W R^T`` computed
   here, and oftmerge's folded weight vs PEFT's merged weight.
2. Tied embeddings. A tiny Gemma (``tie_word_embeddings``, only the embedding stored) with an OFT
   adapter on ``embed_tokens`` or on ``lm_head``: PEFT's ``merge_and_unload`` writes the rotated matrix
   into the one shared tensor, so both ends change; oftmerge stores ``lm_head.weight`` apart. The table
   gives the logits of each folded model relative to the adapted (unmerged) PeftModel's.

Everything is seeded; ``tests/integration/test_architectures.py`` imports this file and checks the
same figures' bounds. CPU, float32, PEFT and transformers as installed.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch

#: (kernel, stride, padding) of the measured convs: 1x1, plain 3x3, padded 3x3, strided padded 3x3, a ViT-style patch conv
CONVS = [(1, 1, 0), (3, 1, 0), (3, 1, 1), (3, 2, 1), (4, 4, 0)]
IN, OUT, SIZE, BLOCK = 4, 6, 8, 4


class ConvNet(torch.nn.Module):
    def __init__(self, kernel: int, stride: int, padding: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(IN, OUT, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-30)


def conv_case(kernel: int, stride: int, padding: int, *, std: float = 0.1, seed: int = 0) -> dict[str, float]:
    """One conv shape: the four relative differences described in the module docstring."""
    from peft import OFTConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    import oftmerge

    torch.manual_seed(seed)
    net = ConvNet(kernel, stride, padding).eval()
    base_weight = net.conv.weight.detach().clone()
    x = torch.randn(2, IN, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        plain = net(x)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        (root / "base").mkdir()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "base" / "model.safetensors"))
        model = get_peft_model(net, OFTConfig(target_modules=["conv"], oft_block_size=BLOCK, use_cayley_neumann=False)).eval()
        with torch.no_grad():
            fresh = model(x)  # identity rotation: init_weights=True
            g = torch.Generator().manual_seed(seed + 2)
            for name, p in model.named_parameters():
                if "oft_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
            rotation = model.base_model.model.conv.oft_R["default"].get_weight().double()
            forward = model(x)
            model.save_pretrained(str(root / "adapter"))
            merged = model.merge_and_unload()
            merged_out = merged(x)
        formula = (base_weight.double().reshape(OUT, -1) @ rotation.T).reshape(base_weight.shape)
        oftmerge.fold_adapter(root / "adapter", root / "base", root / "folded")
        folded = load_file(str(root / "folded" / "model.safetensors"))["conv.weight"]
    return {
        "forward_vs_merged": _rel(forward, merged_out),
        "identity_forward_vs_base": _rel(fresh, plain),
        "merged_vs_formula": _rel(merged.conv.weight.detach(), formula),
        "fold_vs_merged": _rel(folded, merged.conv.weight.detach()),
    }


GEMMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             vocab_size=96, max_position_embeddings=64)  # fmt: skip


def tied_case(target: str, *, std: float = 0.03, seed: int = 0) -> dict[str, float]:
    """A tiny tied Gemma with an adapter on ``target`` (and q_proj): folded logits vs the adapted model's."""
    from peft import OFTConfig, PeftModel, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM

    import oftmerge

    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(seed + 1))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(tmp)
        torch.manual_seed(seed)
        GemmaForCausalLM(GemmaConfig(**GEMMA)).save_pretrained(root / "base")
        model = get_peft_model(GemmaForCausalLM.from_pretrained(root / "base"), OFTConfig(target_modules=["q_proj", target], oft_block_size=8))
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "oft_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        model.save_pretrained(root / "adapter", save_embedding_layers=False)
        peft_model = PeftModel.from_pretrained(GemmaForCausalLM.from_pretrained(root / "base"), str(root / "adapter")).eval()
        with torch.no_grad():
            adapted = peft_model(ids).logits
            base = GemmaForCausalLM.from_pretrained(root / "base").eval()(ids).logits
            peft_merged = peft_model.merge_and_unload()(ids).logits
            oftmerge.fold_adapter(root / "adapter", root / "base", root / "folded")
            folded = GemmaForCausalLM.from_pretrained(root / "folded").eval()(ids).logits
    return {
        "adapter_effect": _rel(adapted, base),
        "peft_merged_vs_adapted": _rel(peft_merged, adapted),
        "fold_vs_adapted": _rel(folded, adapted),
    }


def main() -> None:
    logging.getLogger("oftmerge").setLevel(logging.ERROR)  # the fold's untying warning is what the table shows
    print(f"Conv2d {IN} -> {OUT} on {SIZE}x{SIZE} inputs, exact Cayley, block size {BLOCK}, generators N(0, 0.1^2); relative to max |reference|\n")
    print("| kernel, stride, padding | PEFT forward vs PEFT merged | fresh adapter (R = I): PEFT forward vs base "
          "| PEFT merged weight vs W R^T | oftmerge fold vs PEFT merged weight |")  # fmt: skip
    print("|---|---|---|---|---|")
    for kernel, stride, padding in CONVS:
        r = conv_case(kernel, stride, padding)
        print(f"| {kernel}x{kernel}, {stride}, {padding} | {r['forward_vs_merged']:.2g} | {r['identity_forward_vs_base']:.2g} | "
              f"{r['merged_vs_formula']:.1e} | {r['fold_vs_merged']:.1e} |")  # fmt: skip
    print("\nTiny tied Gemma (hidden 32, vocab 96), OFT on q_proj + one end, Neumann 5 terms, generators N(0, 0.03^2); "
          "logits relative to the adapted model's\n")  # fmt: skip
    print("| adapter targets | adapter's effect (adapted vs base) | PEFT merge_and_unload vs adapted | oftmerge fold vs adapted |")
    print("|---|---|---|---|")
    for target in ("embed_tokens", "lm_head"):
        r = tied_case(target)
        print(f"| q_proj, {target} | {r['adapter_effect']:.2g} | {r['peft_merged_vs_adapted']:.2g} | {r['fold_vs_adapted']:.1e} |")


if __name__ == "__main__":
    main()
