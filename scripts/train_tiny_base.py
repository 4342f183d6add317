#!/usr/bin/env python
"""Pretrain the tiny byte-level Llama used by the demo and the quality tables -> adapters/base/.

Recipe (docs/orthomerge spec section 6): the model is built from a config (no download) and
trained on a mix of the Python standard library's own .py sources and task-format examples of
every task (task share 0.6).  Every ``--eval-every`` steps the validation accuracy of each task is
measured; the task mix is re-weighted towards the weakest task, and training stops as soon as
every task reaches ``--min-acc`` — so the base model does each task *partially*, and task
experts trained from it are refinements that a merge can combine.

    .venv/bin/python scripts/train_tiny_base.py            # ~3-5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time

from _tiny_common import BASE_DIR, BOS, EOS, PAD, SEQ_LEN, THREADS, VOCAB_SIZE, RowMaker, build_tokenizer, lm_loss, load_stdlib_text, setup_determinism

# isort: split
# (above: _tiny_common puts the repository on sys.path, so it is imported before the rest)

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from oftmerge.demo.evaluate import format_table, score  # noqa: E402
from oftmerge.demo.tasks import TASK_NAMES  # noqa: E402


def model_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, hidden_act="silu", initializer_range=0.02,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, use_cache=True, torch_dtype="float32",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--min-steps", type=int, default=500)
    ap.add_argument("--task-share", type=float, default=0.6)
    ap.add_argument("--min-acc", type=float, default=0.25,
                    help="stop once every task's validation accuracy is >= this (and <= --max-acc)")
    ap.add_argument("--max-acc", type=float, default=0.75,
                    help="... and <= this; tasks above it get (almost) no task rows")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=100, help="validation prompts per task at each check")
    ap.add_argument("--out", default=str(BASE_DIR))
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()

    setup_determinism(args.seed)
    tok = build_tokenizer()
    text = load_stdlib_text()
    rows = RowMaker(text, seed=args.seed)
    model = LlamaForCausalLM(model_config(args.layers))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}  stdlib text {len(text):,} bytes  threads {THREADS}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))

    weights = {t: 1.0 for t in TASK_NAMES}
    history = []
    t0 = time.time()
    step = 0
    run_loss = 0.0
    stopped = "max-steps"
    while step < args.max_steps:
        model.train()
        ids, labels = rows.batch(args.batch_size, args.task_share, weights)
        loss = lm_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        run_loss += float(loss.detach())
        if step % args.eval_every == 0:
            res = score(model, tok, TASK_NAMES, args.eval_n, split="validation", seed=args.seed)
            accs = {t: res[t]["acc"] for t in TASK_NAMES}
            # re-weight towards the weakest task: weight ~ (max_acc - acc), floored, so a task
            # that is already above the window gets almost no task rows (and drifts back)
            weights = {t: max(0.03, args.max_acc - accs[t]) for t in TASK_NAMES}
            history.append({"step": step, "loss": run_loss / args.eval_every, "val_acc": accs})
            print(f"step {step:5d}  loss {run_loss / args.eval_every:.3f}  val "
                  + " ".join(f"{t}={100 * a:5.1f}" for t, a in accs.items())
                  + f"  [{time.time() - t0:.0f}s]", flush=True)
            run_loss = 0.0
            if step >= args.min_steps and min(accs.values()) >= args.min_acc and max(accs.values()) <= args.max_acc:
                stopped = f"every task in [{args.min_acc:.2f}, {args.max_acc:.2f}] val acc"
                break
    print(f"stopped at step {step} ({stopped}) after {time.time() - t0:.0f}s", flush=True)

    res = score(model, tok, TASK_NAMES, 200, split="test", seed=0)
    print(format_table({"base": res}), flush=True)
    if args.no_save:
        return
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=[10, EOS], pad_token_id=PAD,
                                               do_sample=False, max_new_tokens=16)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    meta = {"args": vars(args), "params": n_params, "steps": step, "stopped": stopped, "seq_len": SEQ_LEN,
            "history": history, "test": res}
    with open(f"{args.out}/training_log.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
