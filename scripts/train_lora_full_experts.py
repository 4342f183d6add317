#!/usr/bin/env python
"""Train LoRA and fully finetuned experts on the tiny tasks -> scratch/experts/{lora,full}-<task>/.

The experts that ``oftmerge decouple`` merges (docs/decoupling.md). Same recipe as the OFT
experts (scripts/train_oft_adapters.py, docs/tiny_tasks.md): start from adapters/base/, train
on the expert's own task (gold answers) mixed with self-distillation replay (the base's own
answers on the other tasks) and stdlib text, and stop early once validation accuracy on the
own task reaches ``--target`` (0.9), or after ``--max-steps``.

* LoRA: ``LoraConfig(r=8, lora_alpha=16, target_modules=[q,k,v,o,gate,up,down]_proj)``, lr 2e-3;
  saved with ``save_pretrained`` (PEFT adapter).
* Full: every parameter trained, lr 3e-4; saved as a full model (``save_pretrained``, float32,
  tied embeddings kept tied).

One torch thread, fixed seeds, deterministic algorithms: a rerun reproduces the files.
The outputs are regenerated in minutes, so they are not committed (``scratch/`` is ignored).

    .venv/bin/python scripts/train_lora_full_experts.py                  # all 8 experts
    .venv/bin/python scripts/train_lora_full_experts.py --kinds lora --only add
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import train_oft_adapters as oft_script

from _tiny_common import BASE_DIR, REPO, THREADS, RowMaker, load_stdlib_text, setup_determinism, train_until

# isort: split
# (above: _tiny_common puts the repository on sys.path, so it is imported before the rest)

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from oftmerge.demo.tasks import TASK_NAMES  # noqa: E402

OUT = REPO / "scratch" / "experts"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {"lora": dict(lr=2e-3, r=8, alpha=16), "full": dict(lr=3e-4)}


def build(kind: str, base: Path):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if kind == "lora":
        spec = KINDS["lora"]
        cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    return model


def train_one(kind: str, task: str, args, text: bytes, pools: dict, tok) -> dict:
    setup_determinism(args.seed)
    model = build(kind, args.base)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=KINDS[kind]["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    rows = RowMaker(text, seed=args.seed + 1 + TASK_NAMES.index(task))
    replay = [pa for t in TASK_NAMES if t != task for pa in pools[t]]
    n_own = round(args.batch_size * args.own_share)
    n_distill = round((args.batch_size - n_own) * args.replay_task_share)
    n_text = args.batch_size - n_own - n_distill
    t0 = time.time()
    step, history, stopped = train_until(model, opt, rows, tok, task, replay, n_own, n_distill, n_text, args, f"{kind}-{task}")
    out = args.out / f"{kind}-{task}"
    model.save_pretrained(out)
    if kind == "full":
        tok.save_pretrained(out)
    log = {"kind": kind, "task": task, "spec": KINDS[kind], "steps": step, "stopped": stopped,
           "trainable": sum(p.numel() for p in params), "seconds": round(time.time() - t0, 1),
           "args": {k: str(v) for k, v in vars(args).items()}, "history": history}
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"  [{kind}-{task}] stopped at step {step} ({stopped}) -> {out}", flush=True)
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="*", choices=list(KINDS), default=list(KINDS))
    ap.add_argument("--only", nargs="*", choices=TASK_NAMES, help="train only these tasks")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--own-share", type=float, default=0.5)
    ap.add_argument("--replay-task-share", type=float, default=0.6)
    ap.add_argument("--pool-n", type=int, default=1000, help="train prompts per task answered by the base for replay")
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--base", type=Path, default=BASE_DIR)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(THREADS)
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"{args.base}: no base model; run scripts/train_tiny_base.py first")
    oft_script.BASE = args.base  # base_answer_pools reads the base from there
    text = load_stdlib_text()
    tok = AutoTokenizer.from_pretrained(args.base)
    t0 = time.time()
    setup_determinism(args.seed)
    pools = oft_script.base_answer_pools(args, TASK_NAMES)
    for kind in args.kinds:
        for task in args.only or TASK_NAMES:
            train_one(kind, task, args, text, pools, tok)
    print(f"trained in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
