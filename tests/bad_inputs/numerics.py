"""Bad-input cases: numerics (see the package docstring).

Non-finite or unrepresentable results (issue 16, item 5) and lax parsing (item 6). The bad
adapters are copies of the bundled ones (``ws / "a"`` is oft-upper, PEFT 0.21 packed with the
Cayley-Neumann map; ``ws / "b"`` is oft-reverse, exact Cayley) with one tensor or config value
changed in ``setup``; full "experts" for ``decouple`` are copies of the base with a few weights moved.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import torch

from bad_inputs import Case, Workspace

WEIGHTS = "adapter_model.safetensors"
FIRST = "base_model.model.model.layers.0.mlp.down_proj.oft_R.weight"  # the first OFT tensor of every bundled adapter


def _edit_tensors(src: str, dst: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Workspace], None]:
    """A ``setup`` that copies adapter ``src`` of the workspace to ``dst`` and applies ``edit`` to its tensors."""

    def setup(ws: Workspace) -> None:
        from safetensors.torch import load_file, save_file

        shutil.copytree(ws / src, ws / dst)
        tensors = load_file(str(ws / dst / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(ws / dst / WEIGHTS), metadata={"format": "pt"})

    return setup


def _edit_config(src: str, dst: str, **changes: object) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        shutil.copytree(ws / src, ws / dst)
        path = ws / dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))

    return setup


def _huge(t: dict[str, torch.Tensor]) -> None:  # entries at the float32 maximum: PEFT computes NaN rotations
    t[FIRST] = torch.where(t[FIRST] < 0, -3.0e38, 3.0e38)


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[FIRST][0, 0] = float("nan")


def _inf(t: dict[str, torch.Tensor]) -> None:
    t[FIRST][0, 1] = float("-inf")


def _duplicate(t: dict[str, torch.Tensor]) -> None:  # the same module with and without base_model.model.
    t[FIRST.removeprefix("base_model.model.")] = 2 * t[FIRST]


def _cast(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[FIRST] = (t[FIRST] * 100).to(dtype) if dtype != torch.bool else t[FIRST] > 0

    return edit


def _experts(ws: Workspace) -> None:
    """Two full-model experts ``e1``, ``e2``: the base with layer 0's projections moved a little."""
    from safetensors.torch import load_file, save_file

    for seed, name in enumerate(("e1", "e2")):
        shutil.copytree(ws / "base", ws / name)
        tensors = load_file(str(ws / name / "model.safetensors"))
        g = torch.Generator().manual_seed(seed)
        for key in sorted(tensors):
            if "layers.0." in key and key.endswith("proj.weight"):
                tensors[key] = tensors[key] + 0.01 * torch.randn(tensors[key].shape, generator=g)
        save_file(tensors, str(ws / name / "model.safetensors"), metadata={"format": "pt"})


def merge(*extra: str, inputs: tuple[str, ...] = ("a", "b")) -> Callable[[Workspace], list[object]]:
    return lambda ws: ["merge", *(ws / i for i in inputs), "-o", ws / "out", "-q", *extra]


def decouple(*extra: str) -> Callable[[Workspace], list[object]]:
    return lambda ws: ["decouple", ws / "e1", ws / "e2", "--base", ws / "base", "-o", ws / "out", "-q", *extra]


NOT_FINITE_ROTATION = r"rotation PEFT would apply .* is not finite, so the adapter would give NaN outputs"
BROKEN = r"is not finite in float32, so PEFT's own forward pass and merge_and_unload give NaN; the adapter is broken"

CASES: list[Case] = [
    Case("numerics-good-merge", merge(), code=0),
    # -- item 5: non-finite or unrepresentable results are refused, nothing is written -----------------
    Case("numerics-scale-1e300-overflows-float32", merge("--scale", "1e300"), message=r"oft_R\.weight does not fit float32.*smaller --scale"),
    Case("numerics-scale-1e300-fold-into", lambda ws: ["merge", ws / "a", ws / "b", "--fold-into", ws / "base", "-o", ws / "out", "-q",
                                                       "--scale", "1e300"], message=r"does not fit float32"),  # fmt: skip
    Case("numerics-scale-1e20-neumann-nan-rotation", merge("--scale", "1e20", "--cayley", "neumann"),
         message=NOT_FINITE_ROTATION + r".*--cayley exact"),  # fmt: skip
    Case("numerics-scale-1e20-exact-is-a-rotation", merge("--scale", "1e20", "--cayley", "exact"), code=0),
    Case("numerics-float32-max-single-neumann", merge(inputs=("huge",)), setup=_edit_tensors("a", "huge", _huge),
         message=NOT_FINITE_ROTATION + r".*its only input, \S*huge"),  # fmt: skip
    Case("numerics-float32-max-single-exact", merge(inputs=("huge",)), setup=_edit_tensors("b", "huge", _huge),
         message=NOT_FINITE_ROTATION + r".*its only input"),  # fmt: skip
    Case("numerics-float32-max-with-another", merge(inputs=("huge", "b")), setup=_edit_tensors("a", "huge", _huge),
         message=NOT_FINITE_ROTATION),
    Case("numerics-float32-max-fold-neumann", lambda ws: ["fold", ws / "huge", "--base", ws / "base", "-o", ws / "out", "-q"],
         setup=_edit_tensors("a", "huge", _huge), message=BROKEN),  # fmt: skip
    Case("numerics-float32-max-fold-exact", lambda ws: ["fold", ws / "huge", "--base", ws / "base", "-o", ws / "out", "-q"],
         setup=_edit_tensors("b", "huge", _huge), message=BROKEN),  # fmt: skip
    Case("numerics-float32-max-inspect-json", lambda ws: ["inspect", ws / "huge", "--json"], code=0, output=None,
         setup=_edit_tensors("a", "huge", _huge)),  # fmt: skip
    Case("numerics-nan-generator", merge(inputs=("bad", "b")), setup=_edit_tensors("a", "bad", _nan), message=r"contains NaN or Inf"),
    Case("numerics-inf-generator", merge(inputs=("bad", "b")), setup=_edit_tensors("a", "bad", _inf), message=r"contains NaN or Inf"),
    Case("numerics-weights-1e200-is-not-an-identity", merge("--weights", "1e200,1"), code=0),
    Case("numerics-weights-1e308-do-not-overflow", merge("--weights", "1e308,1e308"), code=0),
    Case("numerics-weights-inf", merge("--weights", "-inf,1"), message=r"weights must be finite and non-zero"),
    Case("numerics-decouple-scale-1e300", decouple("--euclidean", "ta", "--option", "scale=1e300"), setup=_experts,
         message=r"the merged weight does not fit float32, the checkpoint's dtype"),  # fmt: skip
    Case("numerics-decouple-weights-1e300", decouple("--weights", "-1,1e300"), setup=_experts, message=r"does not fit float32"),
    # -- item 6: lax parsing ----------------------------------------------------------------------------
    Case("numerics-bool-option-maybe", merge("--option", "per_block=maybe"), message=r"option 'per_block' .* expects bool, got 'maybe'"),
    Case("numerics-bool-option-float", merge("--option", "per_block=0.5"), message=r"expects bool, got '0.5'"),
    Case("numerics-bool-option-yes-control", merge("--option", "per_block=YES"), code=0),
    Case("numerics-cancel-tol-negative", merge("--option", "cancel_tol=-5"), message=r"option 'cancel_tol' .* must be in \[0, 1\], got '-5'"),
    Case("numerics-cancel-tol-nan", merge("--option", "cancel_tol=nan"), message=r"option 'cancel_tol' .* expects float, got 'nan'"),
    Case("numerics-cancel-tol-inf", merge("--option", "cancel_tol=inf"), message=r"expects float, got 'inf'"),
    Case("numerics-ties-density-above-1", decouple("--option", "density=1.5"), setup=_experts, message=r"'density' .* must be in \(0, 1\]"),
    Case("numerics-ties-density-0", decouple("--option", "density=0"), setup=_experts, message=r"must be in \(0, 1\], got '0'"),
    Case("numerics-ties-trim-unknown", decouple("--option", "trim=layer"), setup=_experts, message=r"'trim' .* must be one of 'tensor', 'model'"),
    Case("numerics-dare-seed-fraction", decouple("--euclidean", "dare", "--option", "seed=1.7"), setup=_experts,
         message=r"option 'seed' of method 'dare' expects int, got '1.7'"),  # fmt: skip
    Case("numerics-dare-p-1", decouple("--euclidean", "dare", "--option", "p=1"), setup=_experts, message=r"'p' .* must be in \[0, 1\)"),
    Case("numerics-orthogonal-option-checked", decouple("--orthogonal-option", "cancel_tol=2"), setup=_experts,
         message=r"'cancel_tol' .* must be in \[0, 1\], got '2'"),  # fmt: skip
    Case("numerics-duplicate-module-prefix", merge(inputs=("dup", "b")), setup=_edit_tensors("a", "dup", _duplicate),
         message=rf"stores '{FIRST}' and '{FIRST.removeprefix('base_model.model.')}', the same tensor with and without"),  # fmt: skip
    Case("numerics-int8-generator", merge(inputs=("q8", "b")), setup=_edit_tensors("a", "q8", _cast(torch.int8)),
         message=r"oft_R\.weight is stored as int8; OFT generators are floating point"),  # fmt: skip
    Case("numerics-bool-generator", merge(inputs=("qb", "b")), setup=_edit_tensors("a", "qb", _cast(torch.bool)),
         message=r"is stored as bool"),  # fmt: skip
    Case("numerics-int8-generator-fold", lambda ws: ["fold", ws / "q8", "--base", ws / "base", "-o", ws / "out", "-q"],
         setup=_edit_tensors("a", "q8", _cast(torch.int8)), message=r"is stored as int8"),  # fmt: skip
    Case("numerics-future-peft-version-warns", merge(inputs=("future", "b")), setup=_edit_config("a", "future", peft_version="0.24.0"), code=0),
    Case("numerics-weights-negative-list", merge("--weights", "-1,-1"), code=0),
    Case("numerics-weights-negative-list-equals", merge("--weights=-1,-1"), code=0),
    Case("numerics-weights-negative-mixed", merge("--weights", "-1.5e-1,2"), code=0),
    Case("numerics-scale-negative-exponent", merge("--scale", "-5e-1"), code=0),
    Case("numerics-weights-negative-wrong-count", merge("--weights", "-1,-1,-1"), message=r"got 3 weights for 2 adapters"),
]
