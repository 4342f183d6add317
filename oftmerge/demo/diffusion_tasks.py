"""Synthetic text-to-latent denoising tasks of the bundled tiny diffusion model (``adapters/diffusion/``).

It needs torch only and imports nothing else of oftmerge (and a diffusers ``UNet2DConditionModel`` +
transformers ``CLIPTextModel`` to score), so tests and the demo can re-score any model, e.g. one
that oftmerge folded::

    from oftmerge.demo.diffusion_tasks import TASKS, load_base, task_losses
    unet, text_encoder = load_base("adapters/diffusion/base")
    print({task: task_losses(unet, text_encoder, task) for task in TASKS})

A "latent" is ``4 x 8 x 8``: a colour (a 4-vector, one per latent channel) painted as ``+colour``
on a binary 8 x 8 pattern and ``-colour`` elsewhere. The "prompt" is 8 token ids
``[BOS, family, colour, a, b, c, EOS, EOS]`` (no tokenizer; ``EOS`` doubles as padding):

* ``frames``: the 1-pixel outline of a 4 x 4 square, top-left corner at (row ``a``, column ``b``), 0..4 each;
* ``stripes``: horizontal or vertical stripes (``a``), period 2 or 4 (``b``), phase (``c``);
* ``diagonals``: a 2-pixel-wide main or anti diagonal (``a``), offset -3..4 (``b``).

The base is pretrained mostly on a fourth family, ``rectangles`` (``PRETRAIN``: an ``h x w``
rectangle, 1..6 each, at (row, column); prompt ``[BOS, 5, colour, row, col, h, w, EOS]``), with
only a little of each task, so that an adapter trained on one task has room to improve it.

Loss: epsilon prediction, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with a fixed linear
beta schedule (``NUM_TIMESTEPS`` steps, ``betas = linspace(BETA_START, BETA_END)``), ``t`` uniform;
``task_losses`` is the mean squared error over a fixed held-out set (``EVAL_SIZE`` prompts drawn
with a per-task seed, their own noise and timesteps; nothing random at call time).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "BETA_END",
    "BETA_START",
    "DEFAULT_BASE",
    "EVAL_SIZE",
    "LATENT_SHAPE",
    "NUM_TIMESTEPS",
    "SEQ_LEN",
    "PRETRAIN",
    "TASKS",
    "VOCAB_SIZE",
    "alphas_cumprod",
    "denoise_loss",
    "eval_set",
    "load_base",
    "noisy",
    "sample_batch",
    "task_losses",
]

TASKS = ("frames", "stripes", "diagonals")
PRETRAIN = "rectangles"
LATENT_SHAPE = (4, 8, 8)
SEQ_LEN = 8
VOCAB_SIZE = 100
NUM_TIMESTEPS = 100
BETA_START, BETA_END = 1e-3, 0.12
EVAL_SIZE = 256
EVAL_SEED = 20_000  # + task index

BOS, EOS = 0, 1
FAMILY = {"frames": 2, "stripes": 3, "diagonals": 4, "rectangles": 5}
COLOUR0, ROW0, COL0 = 10, 20, 30
ORIENT0, PERIOD0, PHASE0 = 40, 42, 44
DIRECTION0, OFFSET0 = 50, 52
HEIGHT0, WIDTH0 = 60, 70

#: one 4-vector per colour token (entries in {-1, 0, 1}); a latent is +colour on the pattern, -colour off it
COLOURS = torch.tensor(
    [
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, 0.0, 1.0, 1.0],
        [1.0, 0.0, 0.0, 1.0],
        [1.0, -1.0, 1.0, -1.0],
        [-1.0, 1.0, 1.0, -1.0],
    ]
)


def alphas_cumprod() -> torch.Tensor:
    """``abar_t`` for ``t = 0 .. NUM_TIMESTEPS - 1`` (float32)."""
    betas = torch.linspace(BETA_START, BETA_END, NUM_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(8).view(8, 1).expand(8, 8)
    return i, i.t()


def _pattern(task: str, a: int, b: int, c: int, d: int = 0) -> torch.Tensor:
    i, j = _grid()
    if task == "rectangles":
        return ((i >= a) & (i < a + c) & (j >= b) & (j < b + d)).float()
    if task == "frames":
        inside = (i >= a) & (i < a + 4) & (j >= b) & (j < b + 4)
        return (inside & ((i == a) | (i == a + 3) | (j == b) | (j == b + 3))).float()
    if task == "stripes":
        period = 2 if b == 0 else 4
        axis = i if a == 0 else j
        return (((axis + c) % period) < period // 2).float()
    if task == "diagonals":
        offset = b - 3
        diag = (i - j - offset) if a == 0 else (i + j - 7 - offset)
        return ((diag == 0) | (diag == 1)).float()
    raise KeyError(f"unknown task {task!r}; tasks: {TASKS}")


def _draw(task: str, gen: torch.Generator) -> tuple[int, ...]:
    def r(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    if task == "rectangles":
        h, w = 1 + r(6), 1 + r(6)
        return r(9 - h), r(9 - w), h, w
    if task == "frames":
        return r(5), r(5), 0
    if task == "stripes":
        a, b = r(2), r(2)
        return a, b, r(2 if b == 0 else 4)
    if task == "diagonals":
        return r(2), r(8), 0
    raise KeyError(f"unknown task {task!r}; tasks: {TASKS}")


def _prompt(task: str, colour: int, a: int, b: int, c: int, d: int = 0) -> list[int]:
    if task == "rectangles":
        return [BOS, FAMILY[task], COLOUR0 + colour, ROW0 + a, COL0 + b, HEIGHT0 + c, WIDTH0 + d, EOS]
    if task == "frames":
        body = [ROW0 + a, COL0 + b, EOS]
    elif task == "stripes":
        body = [ORIENT0 + a, PERIOD0 + b, PHASE0 + c]
    else:
        body = [DIRECTION0 + a, OFFSET0 + b, EOS]
    return [BOS, FAMILY[task], COLOUR0 + colour, *body, EOS, EOS]


def sample_batch(task: str, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random prompts of ``task`` (or ``PRETRAIN``): token ids ``(batch, SEQ_LEN)`` int64 and
    clean latents ``(batch, 4, 8, 8)``."""
    ids, x0 = [], []
    for _ in range(batch):
        colour = int(torch.randint(len(COLOURS), (1,), generator=gen))
        params = _draw(task, gen)
        ids.append(_prompt(task, colour, *params))
        x0.append(COLOURS[colour].view(4, 1, 1) * (2.0 * _pattern(task, *params) - 1.0))
    return torch.tensor(ids, dtype=torch.long), torch.stack(x0)


def noisy(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``t`` and ``eps`` for ``x0``: returns ``(x_t, t, eps)``."""
    t = torch.randint(NUM_TIMESTEPS, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    abar = alphas_cumprod()[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps, t, eps


def denoise_loss(unet, text_encoder, ids, x_t, t, eps) -> torch.Tensor:
    """Mean squared error of the epsilon prediction (differentiable; the training loss)."""
    hidden = text_encoder(input_ids=ids).last_hidden_state
    pred = unet(x_t, t, encoder_hidden_states=hidden).sample
    return torch.nn.functional.mse_loss(pred.float(), eps)


_EVAL_CACHE: dict[str, tuple[torch.Tensor, ...]] = {}


def eval_set(task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed held-out set of ``task``: ``(ids, x_t, t, eps)``, ``EVAL_SIZE`` rows, same on every call."""
    if task not in _EVAL_CACHE:
        gen = torch.Generator().manual_seed(EVAL_SEED + TASKS.index(task))
        ids, x0 = sample_batch(task, EVAL_SIZE, gen)
        x_t, t, eps = noisy(x0, gen)
        _EVAL_CACHE[task] = (ids, x_t, t, eps)
    return _EVAL_CACHE[task]  # type: ignore[return-value]


@torch.no_grad()
def task_losses(unet, text_encoder, task: str, batch: int = 64) -> float:
    """Mean denoising MSE of ``(unet, text_encoder)`` on the held-out set of ``task`` (lower is better).

    Works with anything called like a diffusers ``UNet2DConditionModel`` and a transformers
    ``CLIPTextModel`` (a PEFT ``PeftModel`` around them, one with LyCORIS modules hooked in, ...).
    Both are put in eval mode.
    """
    unet.eval()
    text_encoder.eval()
    ids, x_t, t, eps = eval_set(task)
    total = 0.0
    for s in range(0, ids.shape[0], batch):
        sl = slice(s, s + batch)
        hidden = text_encoder(input_ids=ids[sl]).last_hidden_state
        pred = unet(x_t[sl], t[sl], encoder_hidden_states=hidden).sample
        total += float(((pred.double() - eps[sl].double()) ** 2).sum())
    return total / eps.numel()


#: the bundled base written by scripts/make_diffusion_fixtures.py
DEFAULT_BASE = Path(__file__).resolve().parents[2] / "adapters" / "diffusion" / "base"


def load_base(path: str | Path = DEFAULT_BASE):
    """``(unet, text_encoder)`` of the bundled base (float32, eval mode), loaded offline from ``path``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    return unet, text_encoder
