"""Small, deterministic text tasks that a ~1M-parameter byte-level model can learn.

Every example is a prompt ``"<task>: <input> ="`` and an answer ``" <output>\\n"``; the model
sees ``prompt + answer`` and, at test time, must produce the answer greedily after the prompt.
The task word at the start of the prompt is what conditions the model on the task.

Splits never overlap: whether an input belongs to ``train``, ``validation`` or ``test`` is a
pure function of ``(task, input)`` (a stable hash), and the generators draw inputs with a seeded
``random.Random`` and keep only those whose split matches.  Pure Python, no torch.

Public API::

    TASKS: dict[str, Task]                       # name -> task
    TASK_NAMES: tuple[str, ...]                  # ("upper", "reverse", "sort", "add")
    Example(task, input, prompt, answer)         # .text == prompt + answer
    make_example(task_name, input_text) -> Example
    split_of(task_name, input_text) -> "train" | "validation" | "test"
    examples(task_name, n, split="test", seed=0) -> list[Example]   # distinct inputs
    sample_example(task_name, rng, split="train") -> Example        # one draw, repeats allowed
    mixed_examples(task_names, n_per_task, split="test", seed=0) -> list[Example]
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")
# Share of the input space (per task) that goes to each split, in 1/20ths.
_SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}


@dataclass(frozen=True)
class Example:
    task: str
    input: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer

    @property
    def target(self) -> str:
        """The answer without the leading space and the trailing newline."""
        return self.answer.strip()


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    draw: Callable[[random.Random], str]  # one random input
    solve: Callable[[str], str]  # input -> output (no spaces around it)


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def _add_input(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}"


def _add_solve(s: str) -> str:
    a, b = s.split("+")
    return str(int(a) + int(b))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("upper", "uppercase 3-6 random lowercase letters",
             lambda r: _letters(r, 3, 6), lambda s: s.upper()),
        Task("reverse", "reverse 3-6 random lowercase letters",
             lambda r: _letters(r, 3, 6), lambda s: s[::-1]),
        Task("sort", "sort 4-7 random digits ascending",
             lambda r: _digits(r, 4, 7), lambda s: "".join(sorted(s))),
        Task("add", "add two integers in 0..99",
             _add_input, _add_solve),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def make_example(task_name: str, input_text: str) -> Example:
    task = TASKS[task_name]
    return Example(task_name, input_text, f"{task_name}: {input_text} =", f" {task.solve(input_text)}\n")


def split_of(task_name: str, input_text: str) -> str:
    """The split an input belongs to: a stable function of (task, input), about 80/10/10."""
    h = hashlib.blake2b(f"{task_name}\x00{input_text}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(h, "little") % 20
    for name, rng_ in _SPLIT_BUCKETS.items():
        if bucket in rng_:
            return name
    raise AssertionError(bucket)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_example(task_name: str, rng: random.Random, split: str = "train") -> Example:
    """One example of ``split`` drawn with ``rng`` (inputs may repeat across calls)."""
    _check_split(split)
    task = TASKS[task_name]
    while True:
        x = task.draw(rng)
        if split_of(task_name, x) == split:
            return make_example(task_name, x)


def _seed_int(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def examples(task_name: str, n: int, split: str = "test", seed: int = 0) -> list[Example]:
    """``n`` examples of ``task_name`` with distinct inputs, all from ``split``; deterministic in ``seed``.

    The same ``(task_name, split, seed)`` gives the same list, and a longer list starts with the
    shorter one (so ``examples(t, 100)`` is a prefix of ``examples(t, 200)``).
    """
    _check_split(split)
    if task_name not in TASKS:
        raise KeyError(f"unknown task {task_name!r}; known: {TASK_NAMES}")
    rng = random.Random(_seed_int("examples", task_name, split, seed))
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10000:
            raise ValueError(f"could not draw {n} distinct {split} inputs for {task_name!r}")
        ex = sample_example(task_name, rng, split)
        if ex.input in seen:
            continue
        seen.add(ex.input)
        out.append(ex)
    return out


def mixed_examples(task_names: Iterable[str], n_per_task: int, split: str = "test", seed: int = 0) -> list[Example]:
    """``examples`` for each task in turn, concatenated (task order as given)."""
    out: list[Example] = []
    for t in task_names:
        out.extend(examples(t, n_per_task, split, seed))
    return out
