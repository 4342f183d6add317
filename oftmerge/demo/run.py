"""The demo: merge the bundled OFT adapters, save, reload with stock PEFT, and score everything.

``oftmerge demo`` (the README's first command) runs :func:`run_demo`:

1. reads the tiny base model and the OFT experts in ``adapters/`` (one per task);
2. merges all experts with OrthoMerge and with two baselines — the plain mean of the generators
   (``mean_q``) and folding them one after another (``sequential``, what PEFT's
   ``merge_and_unload`` of several adapters gives) — and saves each merged adapter;
3. reloads every saved adapter with stock ``PeftModel`` / ``load_adapter``;
4. scores the base, each expert and each merge on every task: exact-match accuracy (greedy
   decoding) with its standard error, and answer loss (teacher-forced NLL of the answer);
5. then the diffusion part (:mod:`oftmerge.demo.diffusion`): the bundled LyCORIS and PEFT OFT
   experts of a tiny U-Net, merged into one file each way, folded and scored.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oftmerge.errors import OftMergeError

__all__ = ["default_adapters_dir", "run_demo"]

log = logging.getLogger(__name__)

BASELINES = (("orthomerge", "OrthoMerge"), ("mean_q", "mean of Q"), ("sequential", "sequential fold"))


def default_adapters_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "adapters"


def _experts(adapters_dir: Path) -> list[Path]:
    found = sorted(p for p in adapters_dir.glob("oft-*") if (p / "adapter_config.json").is_file())
    if not found:
        raise OftMergeError(
            f"{adapters_dir}: no OFT adapters (oft-*/adapter_config.json) found; run scripts/train_oft_adapters.py "
            "or pass --adapters DIR"
        )
    return found


def run_demo(
    adapters_dir: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    n_per_task: int = 200,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    print_fn=print,
    parts: Sequence[str] = ("llm", "diffusion"),
) -> dict[str, Any]:
    """Run the demo; return ``{"scores": {model: {task: {...}}}, "merges": {method: MergeResult}, "diffusion": {...}, ...}``.

    ``parts``: ``llm`` (the tiny Llama and its PEFT experts), ``diffusion`` (the tiny U-Net's
    LyCORIS and PEFT experts, when ``adapters_dir/diffusion`` is there).
    """
    from oftmerge.demo.quiet import quiet_libraries

    adapters_dir = Path(adapters_dir) if adapters_dir is not None else default_adapters_dir()
    out: dict[str, Any] = {}
    if "diffusion" in parts and "llm" not in parts and not (adapters_dir / "diffusion" / "base").is_dir():
        raise OftMergeError(f"{adapters_dir}: no diffusion/base directory; run scripts/make_diffusion_fixtures.py or pass --adapters DIR")
    with quiet_libraries():  # the table, not the libraries' bars and known warnings (oftmerge.demo.quiet)
        if "llm" in parts:
            out = _run_llm(adapters_dir, out_dir=out_dir, n_per_task=n_per_task, tasks=tasks, methods=methods, print_fn=print_fn)
        if "diffusion" in parts and (adapters_dir / "diffusion" / "base").is_dir():
            from oftmerge.demo.diffusion import run_diffusion_demo

            print_fn("")
            out["diffusion"] = run_diffusion_demo(adapters_dir, out_dir=None if out_dir is None else Path(out_dir) / "diffusion", print_fn=print_fn)
    return out


def _run_llm(
    adapters_dir: Path,
    *,
    out_dir: str | Path | None,
    n_per_task: int,
    tasks: Sequence[str] | None,
    methods: Sequence[str] | None,
    print_fn,
) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oftmerge.demo.evaluate import format_table, score
    from oftmerge.ops.merge import merge_adapters, quiet_merge_log

    started = time.perf_counter()
    base_dir = adapters_dir / "base"
    experts = _experts(adapters_dir)
    task_of = {p: p.name.removeprefix("oft-") for p in experts}
    task_names = list(tasks) if tasks is not None else [task_of[p] for p in experts]
    chosen = [(m, label) for m, label in BASELINES if methods is None or m in methods]
    torch.manual_seed(0)

    print_fn(f"base model: {base_dir}")
    for p in experts:
        print_fn(f"expert:     {p}")
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="oftmerge-demo-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    merges = {}
    shown: set[str] = set()
    for method, label in chosen:
        target = out_dir / f"merged-{method}"
        with quiet_merge_log():
            result = merge_adapters(experts, method=method, out_dir=target, overwrite=True)
        merges[method] = result
        cs = [r.stats["c"] for r in result.modules.values() if "c" in r.stats]
        line = f"merged with {label:<16} -> {target}  ({len(result.modules)} modules, {result.rotation_map.describe()}"
        if cs:
            line += f", magnitude correction c {min(cs):.2f}..{max(cs):.2f}"
        worst = max(r.ortho_error for r in result.modules.values())
        print_fn(line + f", worst ||R^T R - I|| {worst:.1e})")
        for w in result.warnings:
            if w not in shown:
                print_fn(f"  note: {w}")
                shown.add(w)

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()

    def reloaded(adapter_dir: Path):
        """Stock PEFT: load the adapter onto a copy of the base and fold it with merge_and_unload
        (a folded model scores the same as PEFT's unmerged OFT forward, and is cheaper to run)."""
        return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload().eval()

    variants = [("base", None)] + [(f"expert {task_of[p]}", p) for p in experts]
    variants += [(label, out_dir / f"merged-{method}") for method, label in chosen]
    scores: dict[str, dict] = {}
    with torch.no_grad():
        for label, adapter_dir in variants:
            model = base if adapter_dir is None else reloaded(adapter_dir)
            scores[label] = score(model, tokenizer, task_names, n_per_task)
    elapsed = time.perf_counter() - started
    print_fn("")
    print_fn(f"exact-match accuracy in % ± standard error (answer NLL), {n_per_task} test prompts per task:")
    print_fn(format_table(scores, task_names))
    print_fn("")
    print_fn(
        "Reading it: each expert is strong on its own task; a good merge keeps most of every expert's skill "
        "in one adapter. Differences below two standard errors are noise."
    )
    print_fn(f"(done in {elapsed:.0f} s; merged adapters in {out_dir}{' (temporary)' if tmp else ''})")
    if tmp is not None:
        tmp.cleanup()
    return {"scores": scores, "merges": merges, "tasks": task_names, "seconds": elapsed}
