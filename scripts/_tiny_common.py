"""Shared helpers for scripts/train_tiny_base.py and scripts/train_oft_adapters.py.

Byte-level tokenizer, the pretraining text (the Python standard library's own .py sources),
row builders for the training mix, and determinism settings.  Not part of the package.
"""

from __future__ import annotations

import os
import random
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from oftmerge.demo.tasks import TASK_NAMES, sample_example  # noqa: E402

ADAPTERS = REPO / "adapters"
BASE_DIR = ADAPTERS / "base"

# Token ids: id == byte value for the 256 bytes, then the specials.
PAD, BOS, EOS, UNK = 256, 257, 258, 259
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB_SIZE = 260
NEWLINE = 10

SEQ_LEN = 64  # tokens per training row (BOS included)
THREADS = 1  # one thread: bit-reproducible, and robust when the 2 cores are shared


def setup_determinism(seed: int) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    random.seed(seed)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map (what tokenizers' ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    """A byte-level PreTrainedTokenizerFast: 256 byte tokens (id = byte) + 4 specials, no merges.

    ``tokenizer(text)`` prepends ``<bos>``; padding is on the left (for batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for i, s in enumerate(SPECIALS):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=512)
    assert len(fast) == VOCAB_SIZE
    return fast


def encode_bytes(text: str) -> list[int]:
    """Same ids as the tokenizer without specials (id == byte)."""
    return list(text.encode("utf-8"))


def load_stdlib_text(max_bytes: int = 3_000_000) -> bytes:
    """The top-level ``*.py`` files of this Python's standard library, in sorted order, concatenated.

    Only files directly in ``sysconfig.get_paths()["stdlib"]`` (no packages, no site-packages),
    read as bytes, capped at ``max_bytes``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    for p in sorted(root.glob("*.py")):
        data = p.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(parts)[:max_bytes]


class RowMaker:
    """Builds training rows of ``SEQ_LEN`` tokens with a loss mask.

    * text rows: ``<bos>`` + a random window of the stdlib text; loss on every token;
    * task rows: ``<bos>`` + whole task examples packed back to back (task drawn per example
      with the given weights), padded; loss on the answer tokens only (``" OUTPUT\\n"``).
    """

    def __init__(self, text: bytes, seed: int):
        self.text = torch.tensor(list(text), dtype=torch.long)
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def text_row(self) -> tuple[list[int], list[int]]:
        start = int(torch.randint(0, len(self.text) - SEQ_LEN, (1,), generator=self.gen))
        ids = [BOS] + self.text[start:start + SEQ_LEN - 1].tolist()
        return ids, [1] * SEQ_LEN

    def task_row(self, weights: dict[str, float]) -> tuple[list[int], list[int]]:
        names = list(weights)
        w = [weights[n] for n in names]
        ids, loss = [BOS], [0]
        while True:
            ex = sample_example(self.rng.choices(names, w)[0], self.rng, "train")
            p, a = encode_bytes(ex.prompt), encode_bytes(ex.answer)
            if len(ids) + len(p) + len(a) > SEQ_LEN:
                break
            ids += p + a
            loss += [0] * len(p) + [1] * len(a)
        pad = SEQ_LEN - len(ids)
        return ids + [PAD] * pad, loss + [0] * pad

    def pool_row(self, pool: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Like ``task_row`` but packs (prompt, answer) pairs drawn from ``pool`` (e.g. the base
        model's own answers, for self-distillation replay); loss on the answers only."""
        ids, loss = [BOS], [0]
        while True:
            prompt, answer = pool[self.rng.randrange(len(pool))]
            p, a = encode_bytes(prompt), encode_bytes(answer)
            if len(ids) + len(p) + len(a) > SEQ_LEN:
                break
            ids += p + a
            loss += [0] * len(p) + [1] * len(a)
        pad = SEQ_LEN - len(ids)
        return ids + [PAD] * pad, loss + [0] * pad

    @staticmethod
    def collate(rows):
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        labels[:, 0] = -100
        return ids, labels

    def batch(self, batch_size: int, task_share: float, weights: dict[str, float]):
        """(input_ids, labels): ``task_share`` of the rows are task rows, the rest text rows."""
        n_task = round(batch_size * task_share)
        rows = [self.task_row(weights) for _ in range(n_task)] + [self.text_row() for _ in range(batch_size - n_task)]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        # labels[t] is the token at t; the model shifts internally (predict t from < t)
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        labels[:, 0] = -100
        return ids, labels


def lm_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1, :].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def train_until(model, opt, rows: RowMaker, tok, task: str, replay: list, n_own: int, n_distill: int,
                n_text: int, args, label: str) -> tuple[int, list[dict], str]:
    """Train an expert on ``task`` (own rows + self-distilled replay + text) until its validation
    accuracy reaches ``args.target`` or ``args.max_steps``; returns (steps, history, why it stopped)."""
    import time

    from oftmerge.demo.evaluate import score

    t0, step, history, stopped = time.time(), 0, [], "max-steps"
    while step < args.max_steps:
        model.train()
        ids, labels = rows.collate([rows.task_row({task: 1.0}) for _ in range(n_own)]
                                   + [rows.pool_row(replay) for _ in range(n_distill)]
                                   + [rows.text_row() for _ in range(n_text)])
        loss = lm_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            acc = score(model, tok, [task], args.eval_n, split="validation", seed=args.seed)[task]["acc"]
            history.append({"step": step, "loss": float(loss.detach()), "val_acc": acc})
            print(f"  [{label}] step {step:4d} loss {float(loss.detach()):.3f} val {100 * acc:.1f}%"
                  f"  [{time.time() - t0:.0f}s]", flush=True)
            if acc >= args.target:
                stopped = f"val acc >= {args.target}"
                break
    return step, history, stopped


def uniform_weights(tasks=TASK_NAMES) -> dict[str, float]:
    return {t: 1.0 for t in tasks}
