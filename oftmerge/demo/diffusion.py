"""The diffusion half of ``oftmerge demo``: merge the bundled LyCORIS and PEFT OFT adapters of the tiny U-Net, fold, score.

:func:`run_diffusion_demo` works on ``adapters/diffusion/`` (``scripts/make_diffusion_fixtures.py``):

1. merges the three LyCORIS diag-oft experts (``frames`` rescaled, ``stripes`` plain, ``diagonals``
   with its clamp active) into **one LyCORIS file** with OrthoMerge and two baselines: the plain mean
   of the generators (``mean_q``) and folding them one after another (``sequential``: what loading
   the three files together in a UI, or kohya's ``sdxl_merge_lora.py`` folding them one by one, gives);
2. where ``lycoris-lora`` is installed, loads the OrthoMerge file with LyCORIS's own loader and
   reports how far its weights are from oftmerge's fold (they are the same function);
3. does the same for the three PEFT OFT experts of the U-Net (``merge_adapters``, then the fold into
   the diffusers model directory);
4. scores the base, each expert and each merge on every task: the mean denoising error (epsilon
   MSE) on the task's fixed held-out set, lower is better, and the share of each expert's gain
   over the base that a merge keeps on that expert's task.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["LYCORIS_EXPERTS", "PEFT_EXPERTS", "run_diffusion_demo"]

#: task -> the bundled LyCORIS expert of that task
LYCORIS_EXPERTS = {
    "frames": "lycoris-diag-oft-rescaled-frames.safetensors",
    "stripes": "lycoris-diag-oft-stripes.safetensors",
    "diagonals": "lycoris-diag-oft-constrained-diagonals.safetensors",
}
PEFT_EXPERTS = {task: f"peft-{task}" for task in LYCORIS_EXPERTS}
METHODS = (("orthomerge", "OrthoMerge"), ("mean_q", "mean of Q"), ("sequential", "sequential fold"))


def _scores(unet: Any, text_encoder: Any, tasks: Sequence[str]) -> dict[str, float]:
    from oftmerge.demo.diffusion_tasks import task_losses

    with torch.no_grad():
        return {t: task_losses(unet, text_encoder, t) for t in tasks}


def _lycoris_check(merged: Path, base_unet: Path, folded: Any) -> float | None:
    """Max |W_LyCORIS - W_oftmerge| over the U-Net, LyCORIS's own loader applying ``merged``; None without lycoris-lora."""
    try:
        import lycoris
    except ImportError:
        return None
    from diffusers import UNet2DConditionModel

    from oftmerge.demo.quiet import logger_level

    unet = UNet2DConditionModel.from_pretrained(str(base_unet)).eval()
    with logger_level("LyCORIS", logging.ERROR):  # set to INFO by lycoris's import: one line per module
        net, _ = lycoris.create_lycoris_from_weights(1.0, str(merged), unet)
        net.merge_to()
    ours = folded.state_dict()
    return max(float((v - ours[k]).abs().max()) for k, v in unet.state_dict().items())


def format_table(scores: dict[str, dict[str, float]], tasks: Sequence[str], experts: dict[str, str]) -> str:
    """Rows: models; columns: tasks, mean, and the share of the experts' gains kept (merges only)."""
    base = scores["base"]
    head = f"{'model':<28}" + "".join(f"{t:>11}" for t in tasks) + f"{'mean':>9}{'gain kept':>11}"
    lines = [head, "-" * len(head)]
    for label, row in scores.items():
        mean = sum(row[t] for t in tasks) / len(tasks)
        kept = ""
        if label != "base" and not label.startswith("expert"):
            shares = [(base[t] - row[t]) / (base[t] - scores[experts[t]][t]) for t in tasks if base[t] - scores[experts[t]][t] > 0]
            kept = f"{100 * sum(shares) / len(shares):>10.0f}%" if shares else ""
        lines.append(f"{label:<28}" + "".join(f"{row[t]:>11.4f}" for t in tasks) + f"{mean:>9.4f}{kept:>11}")
    return "\n".join(lines)


def run_diffusion_demo(adapters_dir: str | Path, *, out_dir: str | Path | None = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the diffusion demo on ``adapters_dir/diffusion``; return ``{"lycoris": scores, "peft": scores, "lycoris_check": ...}``."""
    from oftmerge.demo.quiet import quiet_libraries

    with quiet_libraries():  # the tables, not the libraries' bars, logs and known warnings (oftmerge.demo.quiet)
        return _run_diffusion_demo(Path(adapters_dir), out_dir, print_fn)


def _run_diffusion_demo(adapters_dir: Path, out_dir: str | Path | None, print_fn: Callable[[str], None]) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from oftmerge.demo.diffusion_tasks import TASKS, load_base
    from oftmerge.ops.diffusion import merge_diffusion
    from oftmerge.ops.diffusion_fold import fold_diffusion
    from oftmerge.ops.fold import fold_adapter
    from oftmerge.ops.merge import merge_adapters, quiet_merge_log

    started = time.perf_counter()
    root = Path(adapters_dir) / "diffusion"
    base = root / "base"
    tasks = list(TASKS)
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="oftmerge-diffusion-demo-")
        out_dir = tmp.name
    out = Path(out_dir)
    unet, text_encoder = load_base(base)
    print_fn(f"tiny diffusion model: {base} (U-Net {sum(p.numel() for p in unet.parameters()):,} parameters); tasks {', '.join(tasks)}")

    def folded_unet(path: Path) -> Any:
        return UNet2DConditionModel.from_pretrained(str(path)).eval()

    results: dict[str, Any] = {}
    for family, experts, merge_dir in (("lycoris", LYCORIS_EXPERTS, True), ("peft", PEFT_EXPERTS, False)):
        paths = {t: root / name for t, name in experts.items()}
        scores: dict[str, dict[str, float]] = {"base": _scores(unet, text_encoder, tasks)}
        labels = {t: f"expert {t}" for t in tasks}
        print_fn("")
        print_fn(f"{'LyCORIS diag-oft files' if merge_dir else 'PEFT OFT adapters'} (one expert per task):")
        for t, p in paths.items():
            print_fn(f"  expert {t:<10} {p.name}")
            dst = out / family / f"expert-{t}"
            if merge_dir:
                fold_diffusion(p, base / "unet", dst, overwrite=True)
            else:
                fold_adapter(p, base / "unet", dst, overwrite=True)
            scores[labels[t]] = _scores(folded_unet(dst), text_encoder, tasks)
        for method, label in METHODS:
            dst = out / family / f"merged-{method}"
            if merge_dir:
                merged = merge_diffusion(list(paths.values()), method=method, out=out / family / f"merged-{method}.safetensors", overwrite=True)
                fold_diffusion(merged.adapter(), base / "unet", dst, overwrite=True)
                print_fn(f"  merged with {label:<16} -> {merged.saved_to} (one LyCORIS file, {len(merged.modules)} modules)")
                if method == "orthomerge":
                    gap = _lycoris_check(merged.saved_to, base / "unet", folded_unet(dst)) if merged.saved_to else None
                    results["lycoris_check"] = gap
                    if gap is not None:
                        print_fn(f"    LyCORIS 4's own loader applied to that file: max |W - W_oftmerge| = {gap:.1e} (the same weights)")
            else:
                with quiet_merge_log():
                    result = merge_adapters(list(paths.values()), method=method, out_dir=out / family / f"merged-{method}-adapter", overwrite=True)
                fold_adapter(result.saved_to, base / "unet", dst, overwrite=True)
                print_fn(f"  merged with {label:<16} -> {result.saved_to} (one PEFT adapter, {len(result.modules)} modules)")
            scores[label] = _scores(folded_unet(dst), text_encoder, tasks)
        results[family] = scores
        print_fn("")
        print_fn("denoising error (epsilon MSE on 256 held-out rows per task; lower is better); gain kept: the share of each expert's")
        print_fn("improvement over the base that the merge keeps on that expert's task, averaged over the tasks:")
        print_fn(format_table(scores, tasks, labels))
    elapsed = time.perf_counter() - started
    print_fn("")
    print_fn(
        "Reading it: each expert lowers the error of its own task and usually raises the others'; a good merge keeps much of "
        "every expert's gain in one file. Stacking the files at full strength (sequential) is what UIs do when several are loaded."
    )
    print_fn(f"(diffusion part done in {elapsed:.0f} s; merged files in {out}{' (temporary)' if tmp else ''})")
    if tmp is not None:
        tmp.cleanup()
    results["seconds"] = elapsed
    return results
