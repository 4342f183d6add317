# ruff: noqa: E501  (a table of cases: one case per entry reads better than wrapped lines)
"""Bad-input cases: single-file diffusion OFT adapters (issue 17).

Each case writes its files into the workspace with plain torch (no tool needed): LyCORIS-layout
files ``l1``/``l2`` (``lycoris_a`` 32 wide in 8 blocks of 4, ``lycoris_b`` 64 wide), a kohya file,
a OneTrainer file, and the broken variants. Every refusal is one line, exit 2, nothing written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from safetensors.torch import save_file

from bad_inputs import Case, Workspace


def _lyco(seed: int, *, modules: tuple[str, ...] = ("a", "b"), rescale: float | None = None, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (n, b) in {"a": (8, 4), "b": (16, 4)}.items():
        if name not in modules:
            continue
        out[f"lycoris_{name}.oft_blocks"] = torch.randn(n, b, b, generator=g) * 0.05
        out[f"lycoris_{name}.alpha"] = torch.tensor(0.0)
        if rescale is not None:
            out[f"lycoris_{name}.rescale"] = torch.full((n * b, 1), rescale)
    out.update(extra)
    return out


def _files(*items: tuple[str, dict[str, torch.Tensor]]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        for rel, tensors in items:
            save_file(tensors, str(ws / rel))

    return setup


L1, L2 = _lyco(1), _lyco(2)
KOHYA = {"oft_unet_a.oft_blocks": torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.01, "oft_unet_a.alpha": torch.tensor(1.0)}
ONETRAINER = {"lora_unet_a.oft_R.weight": torch.randn(8, 6, generator=torch.Generator().manual_seed(4)) * 0.01}
BASE = _files(("l1.safetensors", L1), ("l2.safetensors", L2))


def merge(*extra: str, inputs: tuple[str, ...] = ("l1.safetensors", "l2.safetensors"), out: str = "out.safetensors") -> Callable[[Workspace], Sequence[str]]:
    return lambda ws: ["merge", *(str(ws / i) for i in inputs), "-o", str(ws / out), "-q", *extra]


def _with(extra: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {**{k: v for k, v in L1.items() if k not in drop}, **extra}


CASES: list[Case] = [
    Case("diffusion-good-merge", merge(), code=0, setup=BASE, output="out.safetensors"),
    Case("diffusion-good-merge-new-dir", merge(out="new/dir/out.safetensors"), code=0, setup=BASE, output="new/dir/out.safetensors"),
    Case("diffusion-good-convert-to-kohya", lambda ws: ["convert", str(ws / "u.safetensors"), "--to", "kohya", "-o", str(ws / "out.safetensors"), "-q"],
         code=0, setup=_files(("u.safetensors", {k.replace("lycoris_", "lora_unet_"): v for k, v in L1.items()})), output="out.safetensors"),
    Case("diffusion-mixed-formats-without-to", merge(inputs=("l1.safetensors", "k.safetensors")), setup=_files(("l1.safetensors", L1), ("k.safetensors", KOHYA)),
         message=r"different formats .*pass --to FORMAT", output="out.safetensors"),
    Case("diffusion-output-side-into-input-side", merge("--to", "onetrainer", inputs=("l1.safetensors", "o.safetensors")),
         setup=_files(("l1.safetensors", L1), ("o.safetensors", ONETRAINER)), message=r"rotates the output side .* no onetrainer file", output="out.safetensors"),
    Case("diffusion-module-sets-differ", merge(inputs=("l1.safetensors", "few.safetensors")),
         setup=_files(("l1.safetensors", L1), ("few.safetensors", _lyco(5, modules=("a",)))), message=r"adapts other modules", output="out.safetensors"),
    Case("diffusion-two-lycoris-namings", merge(inputs=("l1.safetensors", "u.safetensors")),
         setup=_files(("l1.safetensors", L1), ("u.safetensors", {k.replace("lycoris_", "lora_unet_"): v for k, v in L2.items()})),
         message=r"same modules named two ways: l1\.safetensors as lycoris_\.\.\., u\.safetensors as lora_unet_", output="out.safetensors"),
    Case("diffusion-unknown-key", merge(inputs=("l1.safetensors", "x.safetensors")),
         setup=_files(("l1.safetensors", L1), ("x.safetensors", _with({"lycoris_a.lora_down.weight": torch.zeros(2, 2)}))),
         message=r"unknown tensor 'lycoris_a\.lora_down\.weight'", output="out.safetensors"),
    Case("diffusion-non-square-blocks", merge(inputs=("l1.safetensors", "x.safetensors")),
         setup=_files(("l1.safetensors", L1), ("x.safetensors", _with({"lycoris_a.oft_blocks": torch.zeros(8, 4, 3)}))), message=r"non-square", output="out.safetensors"),
    Case("diffusion-5d-blocks", merge(inputs=("l1.safetensors", "x.safetensors")),
         setup=_files(("l1.safetensors", L1), ("x.safetensors", _with({"lycoris_a.oft_blocks": torch.zeros(1, 1, 8, 4, 4)}))), message=r"has shape \(1, 1, 8, 4, 4\)",
         output="out.safetensors"),
    Case("diffusion-nan-blocks", merge(inputs=("l1.safetensors", "x.safetensors")),
         setup=_files(("l1.safetensors", L1), ("x.safetensors", _with({"lycoris_a.oft_blocks": torch.full((8, 4, 4), float("nan"))}))), message=r"NaN or Inf",
         output="out.safetensors"),
    Case("diffusion-blocks-without-alpha-key-only", merge(inputs=("l1.safetensors", "x.safetensors")),
         setup=_files(("l1.safetensors", L1), ("x.safetensors", _with({}, drop=("lycoris_a.oft_blocks",)))), message=r"without lycoris_a\.oft_blocks",
         output="out.safetensors"),
    Case("diffusion-rescale-nonpositive-geometric", merge(inputs=("r1.safetensors", "r2.safetensors")),
         setup=_files(("r1.safetensors", _lyco(1, rescale=1.1)), ("r2.safetensors", _lyco(2, rescale=-0.5))), message=r"rescale entry <= 0 .*--rescale arithmetic",
         output="out.safetensors"),
    Case("diffusion-rescale-nonpositive-arithmetic-ok", merge("--rescale", "arithmetic", inputs=("r1.safetensors", "r2.safetensors")), code=0,
         setup=_files(("r1.safetensors", _lyco(1, rescale=1.1)), ("r2.safetensors", _lyco(2, rescale=-0.5))), output="out.safetensors"),
    Case("diffusion-rescale-wrong-length", merge(inputs=("l1.safetensors", "x.safetensors")),
         setup=_files(("l1.safetensors", L1), ("x.safetensors", _with({"lycoris_a.rescale": torch.ones(30, 1)}))), message=r"has 30 rows for 32 rotated rows",
         output="out.safetensors"),
    Case("diffusion-kohya-block-counts-differ", lambda ws: ["inspect", str(ws / "k.safetensors")],
         setup=_files(("k.safetensors", {**KOHYA, "oft_unet_b.oft_blocks": torch.zeros(2, 4, 4), "oft_unet_b.alpha": torch.tensor(1.0)})),
         message=r"builds every module with the first one's block count", output=None),
    Case("diffusion-not-oft", merge(inputs=("l1.safetensors", "lora.safetensors")),
         setup=_files(("l1.safetensors", L1), ("lora.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)})),
         message=r"not a diffusion OFT file .*pass --format", output="out.safetensors"),
    Case("diffusion-empty-file", merge(inputs=("l1.safetensors", "empty.safetensors")), setup=_files(("l1.safetensors", L1), ("empty.safetensors", {})),
         message=r"not a diffusion OFT file", output="out.safetensors"),
    Case("diffusion-truncated-file", merge(), setup=lambda ws: (BASE(ws), (ws / "l2.safetensors").write_bytes((ws / "l2.safetensors").read_bytes()[:100])),  # type: ignore[func-returns-value]
         message=r"not a readable safetensors file", output="out.safetensors"),
    Case("diffusion-format-forced-wrong", merge("--format", "kohya"), setup=BASE, message=r"does not start with 'oft_unet_'", output="out.safetensors"),
    Case("diffusion-output-not-safetensors", merge(out="out.pt"), setup=BASE, message=r"give a path ending in \.safetensors", output="out.pt"),
    Case("diffusion-output-is-a-directory", merge(out="adir.safetensors"), setup=lambda ws: (BASE(ws), (ws / "adir.safetensors").mkdir()),  # type: ignore[func-returns-value]
         message=r"is a directory", output=None),
    Case("diffusion-output-is-an-input", merge("--overwrite", out="l1.safetensors"), setup=BASE, message=r"would replace input file", output=None),
    Case("diffusion-overwrite-foreign-file", merge("--overwrite", out="theirs.safetensors"), setup=lambda ws: (BASE(ws), save_file(L1, str(ws / "theirs.safetensors"))),  # type: ignore[func-returns-value]
         message=r"not an earlier oftmerge output", output=None),
    Case("diffusion-weights-count", merge("--weights", "1,2,3"), setup=BASE, message=r"got 3 weight\(s\) for 2 input\(s\)", output="out.safetensors"),
    Case("diffusion-weights-all-zero", merge("--weights", "0,0"), setup=BASE, message=r"all weights are 0", output="out.safetensors"),
    Case("diffusion-cayley-is-peft-only", merge("--cayley", "exact"), setup=BASE, message=r"--cayley applies to PEFT adapters", output="out.safetensors"),
    Case("diffusion-base-is-peft-only", lambda ws: ["merge", str(ws / "l1.safetensors"), str(ws / "l2.safetensors"), "--base", str(ws / "base"), "-o", str(ws / "o.safetensors")],
         setup=BASE, message=r"--base applies to PEFT adapter directories", output="o.safetensors"),
    Case("diffusion-boft-merge-refused", merge(inputs=("b1.safetensors", "b2.safetensors")),
         setup=_files(*((f"b{i}.safetensors", {"lycoris_a.oft_blocks": torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(i)) * 0.05,
                                                "lycoris_a.alpha": torch.tensor(0.0)}) for i in (1, 2))),
         message=r"Fold it into the model instead", output="out.safetensors"),
    Case("diffusion-peft-dir-side-mismatch", lambda ws: ["convert", str(ws / "a"), "--to", "lycoris", "-o", str(ws / "out.safetensors")],
         message=r"rotates the input side", output="out.safetensors"),
    Case("diffusion-convert-needs-to", lambda ws: ["convert", str(ws / "l1.safetensors"), "-o", str(ws / "out.safetensors")], setup=BASE,
         message=r"give --to", output="out.safetensors"),
    Case("diffusion-fold-needs-base", lambda ws: ["fold", str(ws / "l1.safetensors"), "-o", str(ws / "folded")], setup=BASE, message=r"--base DIR", output="folded"),
    Case("diffusion-inspect-missing-file", lambda ws: ["inspect", str(ws / "nope.safetensors")], message=r"nope\.safetensors: file not found", output=None),
]  # fmt: skip
