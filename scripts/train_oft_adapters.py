#!/usr/bin/env python
"""Train one OFT expert per task on the tiny base -> adapters/oft-<task>/ (stock PEFT).

Each expert starts from adapters/base/, adapts every linear layer of the blocks
(q, k, v, o, gate, up, down) and is trained on its own task mixed with replay of the
pretraining mix (text + task-format examples of every task), stopping early as soon as its
validation accuracy on its own task reaches ``--target`` (0.9).  The experts deliberately
differ in block size, ``block_share``/``coft`` and Cayley map, so that merge code meets each
variant; see ADAPTERS below and adapters/README.md.

    .venv/bin/python scripts/train_oft_adapters.py              # train all, then print the report
    .venv/bin/python scripts/train_oft_adapters.py --only sort  # one expert
    .venv/bin/python scripts/train_oft_adapters.py --report     # only score base + experts (no training)
    .venv/bin/python scripts/train_oft_adapters.py --pairs      # naive 2-adapter stacking experiment
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings
from pathlib import Path

from _tiny_common import ADAPTERS, BASE_DIR, THREADS, RowMaker, load_stdlib_text, setup_determinism, train_until

# isort: split
# (above: _tiny_common puts the repository on sys.path, so it is imported before the rest)

import torch  # noqa: E402
from peft import OFTConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from oftmerge.demo.evaluate import format_table, greedy_answers, score  # noqa: E402
from oftmerge.demo.tasks import TASK_NAMES, examples  # noqa: E402

BASE = BASE_DIR  # --base overrides (for experiments)
OUT = ADAPTERS  # --out overrides
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# One expert per task.  lr/max_steps chosen to reach the target while keeping ||Q|| moderate.
ADAPTERS_SPEC = {
    "upper": dict(oft_block_size=8, block_share=False, coft=False, use_cayley_neumann=True, lr=1e-3),
    "reverse": dict(oft_block_size=16, block_share=False, coft=False, use_cayley_neumann=False, lr=1e-3),
    "sort": dict(oft_block_size=32, block_share=True, coft=False, use_cayley_neumann=True, lr=2e-3),
    "add": dict(oft_block_size=16, block_share=False, coft=True, eps=1.0, use_cayley_neumann=False, lr=1e-3),
}


def load_base():
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(BASE)
    return model, tok


def oft_config(spec: dict) -> OFTConfig:
    kw = dict(r=0, oft_block_size=spec["oft_block_size"], target_modules=TARGETS, module_dropout=0.0,
              block_share=spec["block_share"], coft=spec["coft"], use_cayley_neumann=spec["use_cayley_neumann"],
              init_weights=True, task_type="CAUSAL_LM")
    if spec["coft"]:
        kw["eps"] = spec["eps"]
    return OFTConfig(**kw)


@torch.no_grad()
def q_diagnostics(model, adapter_name: str = "default") -> dict:
    """Per adapted module: ||Q||_F of the whole block-diagonal generator (all blocks; a shared block
    counts once per block it is applied to) and the worst per-block ||R^T R - I||_F of the rotation
    PEFT applies (its own Cayley / Cayley-Neumann map)."""
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "oft_R") or adapter_name not in getattr(mod, "oft_R", {}):
            continue
        rot = mod.oft_R[adapter_name]
        w = rot.weight
        if rot.coft:
            w = rot._project_batch(w, eps=rot.eps)
        Q = rot._pytorch_skew_symmetric(w, rot.block_size)
        n_blocks = rot.in_features // rot.block_size
        reps = n_blocks if rot.block_share else 1
        qn = math.sqrt(reps) * float(torch.linalg.matrix_norm(Q).pow(2).sum().sqrt())
        R = rot._cayley_batch(w, rot.block_size, rot.use_cayley_neumann, rot.num_cayley_neumann_terms)
        eye = torch.eye(rot.block_size)
        orth = float(torch.linalg.matrix_norm(R.transpose(-1, -2) @ R - eye).max())
        short = name.split("model.layers.")[-1]
        out[short] = {"q_fro": qn, "orth_err": orth, "block": rot.block_size, "blocks": n_blocks}
    return out


def summarize_q(diag: dict) -> str:
    q = [d["q_fro"] for d in diag.values()]
    o = [d["orth_err"] for d in diag.values()]
    return (f"||Q||_F per module {min(q):.3f}..{max(q):.3f} (median {sorted(q)[len(q) // 2]:.3f}); "
            f"worst block ||R^T R - I||_F {max(o):.2e}")


def base_answer_pools(args, tasks) -> dict[str, list[tuple[str, str]]]:
    """The base model's own greedy answers on ``--pool-n`` training prompts of each task.

    Replay uses these instead of the gold answers for the *other* tasks: the expert is taught to
    keep the base's behaviour there (self-distillation), not to improve it, so it stays a
    specialist and a merge of experts has something to add."""
    base, tok = load_base()
    pools = {}
    for t in tasks:
        exs = examples(t, args.pool_n, split="train", seed=args.seed + 1000)
        outs = greedy_answers(base, tok, [e.prompt for e in exs], max_new_tokens=12)
        pools[t] = [(e.prompt, o + "\n") for e, o in zip(exs, outs)]
        agree = sum(o.strip() == e.target for e, o in zip(exs, outs)) / len(exs)
        print(f"  base answers for {t} replay: {len(exs)} prompts, {100 * agree:.1f}% correct", flush=True)
    return pools


def train_one(task: str, spec: dict, args, text: bytes, pools: dict) -> dict:
    setup_determinism(args.seed)
    base, tok = load_base()
    model = get_peft_model(base, oft_config(spec))
    rows = RowMaker(text, seed=args.seed + 1 + TASK_NAMES.index(task))
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, betas=(0.9, 0.98))
    replay_pool = [pa for t in TASK_NAMES if t != task for pa in pools[t]]
    n_own = round(args.batch_size * args.own_share)
    n_distill = round((args.batch_size - n_own) * args.replay_task_share)
    n_text = args.batch_size - n_own - n_distill
    step, history, stopped = train_until(model, opt, rows, tok, task, replay_pool, n_own, n_distill, n_text, args, task)
    diag = q_diagnostics(model)
    print(f"  [{task}] stopped at step {step} ({stopped}); {n_train:,} trainable; {summarize_q(diag)}", flush=True)
    out = OUT / f"oft-{task}"
    model.save_pretrained(out, safe_serialization=True)
    log = {"task": task, "spec": spec, "steps": step, "stopped": stopped, "trainable": n_train,
           "args": {k: v for k, v in vars(args).items() if k not in ("only",)}, "history": history,
           "q_diagnostics": diag}
    with open(out / "training_log.json", "w") as f:
        json.dump(log, f, indent=1)
    return log


def report(args) -> None:
    base, tok = load_base()
    results = {"base": score(base, tok, TASK_NAMES, args.report_n, split="test", seed=0)}
    q_lines = []
    for task in TASK_NAMES:
        path = OUT / f"oft-{task}"
        if not path.exists():
            continue
        base, _ = load_base()
        model = PeftModel.from_pretrained(base, path)
        results[f"oft-{task}"] = score(model, tok, TASK_NAMES, args.report_n, split="test", seed=0)
        cfg = model.peft_config["default"]
        q_lines.append(f"| oft-{task} | {cfg.oft_block_size} | {cfg.block_share} | {cfg.coft}"
                       f"{f' (eps={cfg.eps})' if cfg.coft else ''} | "
                       f"{'Neumann, ' + str(cfg.num_cayley_neumann_terms) + ' terms' if cfg.use_cayley_neumann else 'exact'}"
                       f" | {summarize_q(q_diagnostics(model))} |")
    text = "\n".join([
        f"Test split, {args.report_n} prompts per task, seed 0; cell = exact-match accuracy % ± SE "
        f"(answer NLL, nats/token):", "", format_table(results), "",
        "| adapter | oft_block_size | block_share | coft | Cayley map | generator norms / orthogonality |",
        "|---|---|---|---|---|---|", *q_lines, ""])
    print("\n" + text)
    (OUT / "report.md").write_text("<!-- written by: .venv/bin/python scripts/train_oft_adapters.py --report -->\n\n" + text)


def pairs(args) -> None:
    """Naive stacking: load two experts into one PeftModel and activate both (PEFT rotates the
    input by both, one after the other).  Not a merge; context for what a merge must beat."""
    _, tok = load_base()
    tasks = [t for t in TASK_NAMES if (OUT / f"oft-{t}").exists()]
    results = {}
    for a, b in itertools.combinations(tasks, 2):
        base, _ = load_base()
        model = PeftModel.from_pretrained(base, OUT / f"oft-{a}", adapter_name=a)
        model.load_adapter(OUT / f"oft-{b}", adapter_name=b)
        model.base_model.set_adapter([a, b])
        results[f"stack {a}+{b}"] = score(model, tok, TASK_NAMES, args.report_n, split="test", seed=0)
    text = (f"Naive stacking of two experts (both active), test split, {args.report_n} prompts per task:\n\n"
            + format_table(results) + "\n")
    print("\n" + text)
    (OUT / "pairs.md").write_text("<!-- written by: .venv/bin/python scripts/train_oft_adapters.py --pairs -->\n\n" + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", choices=TASK_NAMES, help="train only these experts")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--own-share", type=float, default=0.5, help="share of rows from the expert's own task")
    ap.add_argument("--replay-task-share", type=float, default=0.6,
                    help="share of task-format rows (other tasks, base's own answers) inside the replay; rest is text")
    ap.add_argument("--pool-n", type=int, default=1000, help="train prompts per task answered by the base for replay")
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--report", action="store_true", help="only print the score table of base + experts")
    ap.add_argument("--pairs", action="store_true", help="only run the naive 2-adapter stacking experiment")
    ap.add_argument("--report-n", type=int, default=200)
    ap.add_argument("--base", default=str(BASE_DIR), help="base model directory")
    ap.add_argument("--out", default=str(ADAPTERS), help="where the oft-<task>/ directories go")
    args = ap.parse_args()
    global BASE, OUT
    BASE, OUT = Path(args.base), Path(args.out)
    warnings.filterwarnings("ignore", message=".*Cayley-Neumann.*")

    torch.set_num_threads(THREADS)
    if args.report or args.pairs:
        if args.report:
            report(args)
        if args.pairs:
            pairs(args)
        return
    text = load_stdlib_text()
    t0 = time.time()
    setup_determinism(args.seed)
    pools = base_answer_pools(args, TASK_NAMES)
    for task in args.only or TASK_NAMES:
        print(f"training oft-{task}: {ADAPTERS_SPEC[task]}", flush=True)
        train_one(task, ADAPTERS_SPEC[task], args, text, pools)
    print(f"trained in {time.time() - t0:.0f}s", flush=True)
    report(args)


if __name__ == "__main__":
    main()
