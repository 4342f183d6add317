"""Score a causal LM on the tiny tasks of :mod:`oftmerge.demo.tasks`.

Two numbers per task:

* ``acc`` — exact-match accuracy of greedy decoding after the prompt (batched, left-padded,
  stopping at the first newline or after ``max_new_tokens``), with its binomial standard error
  ``acc_se = sqrt(acc (1 - acc) / n)``;
* ``nll`` — answer loss: teacher-forced negative log-likelihood (nats) of the answer bytes
  (``" <output>\\n"``, newline included) given the prompt, averaged over all answer tokens of the task.

Works with a plain ``transformers`` model or a ``peft.PeftModel`` around it (whatever adapters are
active are used).  The model is put in eval mode; nothing is trained or changed.

Public API::

    score(model, tokenizer, task_names=TASK_NAMES, n_per_task=200, split="test", seed=0,
          batch_size=256, max_new_tokens=None) -> dict[task, {"acc", "acc_se", "nll", "n"}]
    score_examples(model, tokenizer, examples, batch_size=256, max_new_tokens=None)
          -> {"acc", "acc_se", "nll", "n", "correct": list[bool], "outputs": list[str]}
    greedy_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=256) -> list[str]
    answer_nll(model, tokenizer, examples, batch_size=256) -> (total_nll, n_tokens)
    format_table(results_by_model: dict[str, dict[task, dict]], task_names) -> str  (markdown)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence

import torch

from .tasks import TASK_NAMES, Example, examples as _examples


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _encode(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _cache_kwarg(model) -> str:
    """The name of the KV-cache argument (and output): ``cache`` from transformers 5.x (``past_key_values``
    is deprecated there), ``past_key_values`` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards **kwargs
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12,
                   batch_size: int = 256) -> list[str]:
    """Greedy continuation of each prompt, cut at the first newline (newline not included).

    Hand-written greedy loop with a KV cache: left padding, explicit position ids, and the whole
    batch stops as soon as every row has produced a newline.
    """
    model.eval()
    dev = _device(model)
    newline_ids = set(_encode(tokenizer, ["\n"], add_special_tokens=False)[0])
    pad_id = _pad_id(tokenizer)
    encoded = _encode(tokenizer, prompts, add_special_tokens=True)
    out: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = _left_pad(chunk, pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        generated = torch.full((len(chunk), max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=dev)
        past = None
        cache_kwarg = _cache_kwarg(model)
        cur_ids, cur_pos = ids, pos
        for step in range(max_new_tokens):
            res = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos,
                        use_cache=True, **({} if past is None else {cache_kwarg: past}))
            past = getattr(res, cache_kwarg)
            nxt = res.logits[:, -1, :].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            generated[:, step] = nxt
            for nl in newline_ids:
                done |= nxt == nl
            if bool(done.all()):
                break
            cur_ids = nxt[:, None]
            cur_pos = cur_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=mask.dtype, device=dev)], dim=1)
        for row in generated.tolist():
            toks = []
            for t in row:
                if t in newline_ids or t == pad_id:
                    break
                toks.append(t)
            out.append(tokenizer.decode(toks, skip_special_tokens=True))
    return out


@torch.no_grad()
def answer_nll(model, tokenizer, examples: Sequence[Example], batch_size: int = 256) -> tuple[float, int]:
    """Sum of teacher-forced NLL (nats) over the answer tokens of ``examples``, and their count."""
    model.eval()
    dev = _device(model)
    pad_id = _pad_id(tokenizer)
    p_ids = _encode(tokenizer, [e.prompt for e in examples], add_special_tokens=True)
    a_ids = _encode(tokenizer, [e.answer for e in examples], add_special_tokens=False)
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        seqs = [p + a for p, a in zip(p_ids[start:start + batch_size], a_ids[start:start + batch_size])]
        n_ans = [len(a) for a in a_ids[start:start + batch_size]]
        ids, mask = _left_pad(seqs, pad_id)
        width = ids.shape[1]
        labels = torch.full_like(ids, -100)
        for i, k in enumerate(n_ans):
            labels[i, width - k:] = ids[i, width - k:]
        ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
        tgt = labels[:, 1:]
        sel = tgt != -100
        nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        total += float(nll[sel].sum())
        count += int(sel.sum())
    return total, count


def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 256,
                   max_new_tokens: int | None = None) -> dict:
    """Accuracy (+ standard error) and answer NLL on a list of examples (any mix of tasks)."""
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to score")
    if max_new_tokens is None:
        max_new_tokens = max(len(e.answer.encode()) for e in examples) + 2
    outs = greedy_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    correct = [o.strip() == e.target and o.startswith(" ") for o, e in zip(outs, examples)]
    n = len(examples)
    acc = sum(correct) / n
    tot, cnt = answer_nll(model, tokenizer, examples, batch_size)
    return {"acc": acc, "acc_se": math.sqrt(acc * (1 - acc) / n), "nll": tot / cnt, "n": n,
            "correct": correct, "outputs": outs}


def score(model, tokenizer, task_names: Iterable[str] = TASK_NAMES, n_per_task: int = 200,
          split: str = "test", seed: int = 0, batch_size: int = 256,
          max_new_tokens: int | None = None) -> dict[str, dict]:
    """Per task: ``{"acc", "acc_se", "nll", "n"}`` on ``n_per_task`` examples of ``split``.

    Examples come from :func:`oftmerge.demo.tasks.examples` with the given ``seed`` (distinct
    inputs, never from another split), so every caller with the same arguments scores the same
    prompts.
    """
    results: dict[str, dict] = {}
    for t in task_names:
        r = score_examples(model, tokenizer, _examples(t, n_per_task, split, seed), batch_size, max_new_tokens)
        results[t] = {k: r[k] for k in ("acc", "acc_se", "nll", "n")}
    return results


def format_table(results_by_model: dict[str, dict[str, dict]], task_names: Sequence[str] = TASK_NAMES) -> str:
    """Markdown table: one row per model, one ``acc ± se (nll)`` cell per task, plus the mean accuracy."""
    head = "| model | " + " | ".join(f"{t}: acc ± SE (NLL)" for t in task_names) + " | mean acc |"
    sep = "|---" * (len(task_names) + 2) + "|"
    rows = [head, sep]
    for name, res in results_by_model.items():
        cells = []
        for t in task_names:
            r = res[t]
            cells.append(f"{100 * r['acc']:.1f} ± {100 * r['acc_se']:.1f} ({r['nll']:.3f})")
        mean = sum(res[t]["acc"] for t in task_names) / len(task_names)
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.1f} |")
    return "\n".join(rows)
