"""Build the bundled tiny diffusion model and its small, really trained OFT adapters (issue 17 item 7).

Run (CPU, one torch thread, a few minutes)::

    .venv/bin/python scripts/make_diffusion_fixtures.py                 # everything -> adapters/diffusion/
    .venv/bin/python scripts/make_diffusion_fixtures.py --reuse-base    # keep adapters/diffusion/base, redo the adapters
    .venv/bin/python scripts/make_diffusion_fixtures.py --only kohya-oft-frames,peft-stripes --reuse-base

What it writes under ``--out`` (default ``adapters/diffusion``):

* ``base/unet/{config.json,diffusion_pytorch_model.safetensors}``: a tiny diffusers
  ``UNet2DConditionModel`` (``unet_config()``; Linear attention / feed-forward layers, 1x1
  ``proj_in``/``proj_out`` and 3x3 resnet Conv2d), and ``base/text_encoder/{config.json,model.safetensors}``:
  a tiny transformers ``CLIPTextModel``; float32, trained jointly for ``--base-steps`` on the
  synthetic tasks of ``oftmerge/demo/diffusion_tasks.py`` (epsilon prediction).
* one OFT adapter per entry of ``ADAPTERS`` (see there), trained on one task by the real tool
  where the tool is a library (LyCORIS 4.1.3 ``create_lycoris`` / ``lycoris.kohya.create_network``,
  PEFT ``get_peft_model`` + ``OFTConfig``), and by the re-implementations below for kohya
  sd-scripts (``SDScriptsOFT``) and OneTrainer (``OneTrainerOFT``), which are not installable
  libraries: ``<name>.safetensors`` (single-file formats) or ``<name>/`` (PEFT ``save_pretrained``).
* ``manifest.json``: per adapter the tool and version, algorithm, options, steps, seed, task,
  the file's key layout (example keys), per-module block size / count (BOFT: stages), whether the
  tool's norm clamp is active, and the held-out task losses (``diffusion_tasks.task_losses``) of
  the base and of the base with that adapter applied by its own tool, loaded back from the file
  (LyCORIS ``create_lycoris_from_weights`` / ``lycoris.kohya.create_network_from_weights``, PEFT
  ``PeftModel.from_pretrained``, the re-implementations' loaders for kohya / OneTrainer).

Deterministic: fixed seeds, ``torch.set_num_threads(1)``, ``torch.use_deterministic_algorithms(True)``.
Independent of oftmerge.

Re-implemented tools (written from what the code does, not copied):

* kohya sd-scripts ``networks/oft.py``, repo ``kohya-ss/sd-scripts`` at commit
  ``af01a027fd5ca1ccd9162019c88574396df8990c`` (identical OFT code at ``077f6a4ff2ae39d43db738644b9ac6419e8812aa``).
* OneTrainer OFT v2, repo ``Nerogar/OneTrainer``: ``modules/module/oft_utils.py``
  (``OFTRotationModule``; commits ``080ae164bb2c66ee0a904c9603fcd6db0cac6f17`` and
  ``4895d09d36bf5f4d946ef06dff187d89ee574987``), ``modules/module/LoRAModule.py`` (``OFTModule``,
  ``LoRAModuleWrapper``), ``modules/util/optimizer/tag_util.py`` at
  ``4af24905aa8319bd0523a22948bb2880421be6f3`` (``oft_scaled``: factor ``2 sqrt(b - 1)``),
  ``modules/modelSetup/StableDiffusionLoRASetup.py`` at ``9a9328b3dbb4c5c820c73edce4075ea6bc800bba``
  (prefixes ``lora_te`` / ``lora_unet``), ``modules/modelSaver/mixin/LoRASaverMixin.py`` at
  ``4822e8e5493e871e5b503eae7b9db61105ba546c`` and ``modules/util/convert/lora/convert_lora_util.py`` at
  ``ee01e6a63d296fd3c876c68fc94607cc11de5cea`` (the default SAFETENSORS save converts to "legacy
  diffusers" keys: the module path with ``.`` -> ``_``, the suffix ``.oft_R.weight`` kept).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import oftmerge.demo.diffusion_tasks as dt  # noqa: E402  (torch only: the tasks live in the package so that `oftmerge demo` scores them)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
#: rows per base-training batch: mostly the pretraining family, a little of each task
BASE_MIX = {dt.PRETRAIN: 26, "frames": 2, "stripes": 2, "diagonals": 2}
PROBE_SEED = 777


# --------------------------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------------------------


def unet_config() -> dict:
    """The tiny UNet: 16/32 channels, one cross-attention transformer at 16 (down 0, up 1 x2) and 32 (mid)."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers reads this as the number of heads here
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        norm_num_groups=8,
        use_linear_projection=False,  # proj_in / proj_out are 1x1 Conv2d
    )


def text_encoder_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=dt.VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=dt.SEQ_LEN,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=dt.BOS,
        eos_token_id=dt.EOS,
        pad_token_id=dt.EOS,
    )


def build_base(out: Path, steps: int, seed: int) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    te = CLIPTextModel(text_encoder_config())
    params = [p for p in list(unet.parameters()) + list(te.parameters())]
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    te.train()
    mix = BASE_MIX
    history = []
    t0 = time.time()
    for step in range(steps):
        parts = [dt.sample_batch(task, n, gen) for task, n in mix.items()]
        ids = torch.cat([p[0] for p in parts])
        x0 = torch.cat([p[1] for p in parts])
        x_t, t, eps = dt.noisy(x0, gen)
        loss = dt.denoise_loss(unet, te, ids, x_t, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            history.append({"step": step, "train_loss": round(float(loss), 5)})
    seconds = time.time() - t0
    (out / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    write_model_index(out)
    return {
        "steps": steps,
        "seed": seed,
        "batch": sum(mix.values()),
        "mix (rows per batch)": mix,
        "optimizer": "AdamW lr 2e-3 (warmup 50, linear decay to 0.1x), betas 0.9/0.99, wd 0.01, clip 1",
        "history": history,
        "train_seconds": round(seconds, 1),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in te.parameters()),
    }


def load_base(base: Path):
    unet, te = dt.load_base(base)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    return unet, te


def all_losses(unet, te) -> dict[str, float]:
    return {task: round(dt.task_losses(unet, te, task), 6) for task in dt.TASKS}


@torch.no_grad()
def probe_output(unet, te) -> torch.Tensor:
    gen = torch.Generator().manual_seed(PROBE_SEED)
    ids, x0 = dt.sample_batch(dt.TASKS[0], 4, gen)
    x_t, t, _ = dt.noisy(x0, gen)
    unet.eval()
    te.eval()
    return unet(x_t, t, encoder_hidden_states=te(input_ids=ids).last_hidden_state).sample.clone()


def train_adapter(params: list[torch.nn.Parameter], unet, te, task: str, steps: int, lr: float, seed: int,
                  after_step: Callable[[], None] | None = None) -> list[dict]:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    te.train()
    history = []
    for step in range(steps):
        ids, x0 = dt.sample_batch(task, BATCH, gen)
        x_t, t, eps = dt.noisy(x0, gen)
        loss = dt.denoise_loss(unet, te, ids, x_t, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "train_loss": round(float(loss), 5)})
    return history


# --------------------------------------------------------------------------------------------
# kohya sd-scripts OFT (networks/oft.py), re-implemented
# --------------------------------------------------------------------------------------------


class SDScriptsOFT(torch.nn.Module):
    """One module of sd-scripts' ``OFTModule`` (kohya-ss/sd-scripts networks/oft.py @ af01a027).

    What the original does: ``dim`` is the number of blocks (the same for every module),
    ``block_size = out_dim // dim``; parameter ``oft_blocks (dim, b, b)`` (zeros), buffer ``alpha``;
    ``Q = B - B^T`` over all blocks, its Frobenius norm is **always** clamped to
    ``constraint = alpha * out_dim`` (``Q * (min(|Q|, c) + 1e-8) / (|Q| + 1e-8)``);
    ``R = (I + Q)(I - Q)^-1`` per block, ``R_w = multiplier (R - I) + I``; the weight's output rows,
    grouped in blocks (Conv2d: the whole ``(in, kh, kw)`` slice), become
    ``W'[block] = R_w^T W[block]`` (einsum ``k n m, k n ... -> k m ...``); bias unchanged. The
    forward is monkey-patched onto the original module.
    """

    def __init__(self, name: str, org: torch.nn.Module, multiplier: float, dim: int, alpha: float):
        super().__init__()
        self.oft_name = name
        out_dim = org.out_features if isinstance(org, torch.nn.Linear) else org.out_channels
        self.num_blocks = dim
        self.block_size = out_dim // dim
        self.out_dim = out_dim
        self.constraint = alpha * out_dim
        self.register_buffer("alpha", torch.tensor(alpha))
        self.oft_blocks = torch.nn.Parameter(torch.zeros(dim, self.block_size, self.block_size))
        self.multiplier = multiplier
        self.org_module = [org]

    def apply_to(self):
        self.org_forward = self.org_module[0].forward
        self.org_module[0].forward = self.forward

    def generator(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(clamped Q, raw norm)"""
        q = self.oft_blocks - self.oft_blocks.transpose(1, 2)
        norm = torch.norm(q.flatten())
        clamped = torch.clamp(norm, max=self.constraint)
        return q * ((clamped + 1e-8) / (norm + 1e-8)), norm

    def rotation(self) -> torch.Tensor:
        q, _ = self.generator()
        eye = torch.eye(self.block_size).unsqueeze(0).expand_as(q)
        r = torch.matmul(eye + q, (eye - q).float().inverse())
        return self.multiplier * (r - eye) + eye

    def forward(self, x, *args, **kwargs):
        if self.multiplier == 0.0:
            return self.org_forward(x)
        org = self.org_module[0]
        r = self.rotation().float()
        w = org.weight.float()
        blocks = w.reshape(self.num_blocks, self.block_size, *w.shape[1:])
        rw = torch.einsum("knm,kn...->km...", r, blocks).reshape(w.shape).to(x.dtype)
        if w.dim() == 4:
            return F.conv2d(x, rw, org.bias, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, rw, org.bias)


class SDScriptsOFTNetwork(torch.nn.Module):
    """sd-scripts' ``OFTNetwork`` for a diffusers UNet: modules inside ``CrossAttention`` blocks.

    sd-scripts' own UNet (``library/original_unet.py``) names that class ``CrossAttention``; in
    diffusers it is ``Attention``. Targets: every child whose class name contains ``Linear``, plus
    1x1 ``Conv2d`` (none inside ``Attention``); with ``enable_all_linear`` the parent class is
    ``Transformer2DModel`` (not used here). Name: ``oft_unet`` + ``.`` + parent path + ``.`` +
    child path, ``.`` -> ``_``. The text encoder is never adapted.
    """

    PREFIX = "oft_unet"
    TARGETS = ("Attention", "CrossAttention")

    def __init__(self, unet, multiplier: float, dim: int, alpha: float):
        super().__init__()
        self.ofts: list[SDScriptsOFT] = []
        for name, module in unet.named_modules():
            if module.__class__.__name__ not in self.TARGETS:
                continue
            for child_name, child in module.named_modules():
                is_linear = "Linear" in child.__class__.__name__
                is_conv1x1 = "Conv2d" in child.__class__.__name__ and child.kernel_size == (1, 1)
                if is_linear or is_conv1x1:
                    oft_name = f"{self.PREFIX}.{name}.{child_name}".replace(".", "_")
                    self.ofts.append(SDScriptsOFT(oft_name, child, multiplier, dim, alpha))
        assert len({o.oft_name for o in self.ofts}) == len(self.ofts)

    def apply_to(self):
        for oft in self.ofts:
            oft.apply_to()
            self.add_module(oft.oft_name, oft)

    @classmethod
    def from_weights(cls, file: Path, unet, multiplier: float = 1.0) -> SDScriptsOFTNetwork:
        """sd-scripts' ``create_network_from_weights``: ONE dim (the first tensor's ``size(0)``) and
        ONE alpha (the first ``.alpha``) for every module; conv 3x3 only if a key holds
        ``in_layers_2`` (LDM naming, never true for diffusers names), all-linear if one holds ``_ff_``."""
        sd = load_file(str(file))
        dim = alpha = None
        for key, value in sd.items():
            if key.endswith(".alpha"):
                alpha = value.item() if alpha is None else alpha
            elif dim is None:
                dim = value.size(0)
        assert not any("_ff_" in k or "in_layers_2" in k for k in sd)
        net = cls(unet, multiplier, dim, alpha)
        net.apply_to()
        missing, unexpected = net.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        return net


# --------------------------------------------------------------------------------------------
# OneTrainer OFT v2, re-implemented
# --------------------------------------------------------------------------------------------


def onetrainer_block_size(in_features: int, block_size: int) -> int:
    """``OFTModule.adjust_oft_parameters``: the divisor of ``in_features`` nearest ``block_size`` (ties: the lower)."""
    if in_features % block_size == 0 and block_size <= in_features:
        return block_size
    if block_size >= in_features:
        return in_features
    higher = block_size
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = block_size
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (block_size - lower) <= (higher - block_size) else higher


class OneTrainerRotation(torch.nn.Module):
    """``OFTRotationModule`` (oft_utils.py): packed upper triangles ``weight (r, b(b-1)/2)``.

    ``Q = U - U^T`` with ``U``'s strict upper triangle = the row (``torch.triu_indices(b, b, 1)``
    order); Cayley-Neumann with 5 terms: ``R = I + 2Q + 2Q^2 + 2Q^3 + Q^4`` (series of
    ``(I + Q)(I - Q)^-1``). Scaled OFT registers a persistent buffer ``scaled_oft`` (saved as
    ``<prefix>.oft_R.scaled_oft``) and divides the weight by ``2 sqrt(b - 1)`` before the map
    (current OneTrainer; oft_utils.py @ 080ae164 divided by ``sqrt(b(b-1)/2)`` instead; the two
    agree for ``b = 8``, the only block size used with it here). The input rotation
    ``x -> x R`` is ``einsum('...rk,rkc->...rc')`` on ``x`` reshaped ``(..., r, b)``.
    """

    def __init__(self, r: int, block_size: int, scaled: bool):
        super().__init__()
        self.r, self.block_size = r, block_size
        self.n_elements = block_size * (block_size - 1) // 2
        self.weight = torch.nn.Parameter(torch.zeros(r, self.n_elements))
        self.scaled = scaled
        if scaled:
            self.register_buffer("scaled_oft", torch.tensor(True))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def divisor(self) -> float:
        return 2.0 * math.sqrt(self.block_size - 1) if self.scaled else 1.0

    def skew(self) -> torch.Tensor:
        w = self.weight / self.divisor
        m = torch.zeros(self.r, self.block_size, self.block_size, dtype=w.dtype)
        m = m.index_put((torch.arange(self.r)[:, None], self.rows, self.cols), w)
        return m - m.transpose(-2, -1)

    def rotation(self) -> torch.Tensor:
        q = self.skew()
        eye = torch.eye(self.block_size, dtype=q.dtype).expand_as(q)
        q2 = q @ q
        return eye + 2 * q + 2 * q2 + 2 * (q2 @ q) + q2 @ q2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xr = x.reshape(*shape[:-1], self.r, self.block_size)
        return torch.einsum("...rk,rkc->...rc", xr, self.rotation()).reshape(shape)


class OneTrainerOFT(torch.nn.Module):
    """``OFTModule`` (LoRAModule.py): Linear rotates the input, ``y = W (x R)`` i.e. ``W' = W R^T``
    per input block; Conv2d rotates the weight viewed ``(out, r, b)`` over ``in * kh * kw``
    (``einsum('ork,rkc->orc')``), ``W' = W R``: the other rotation; bias unchanged."""

    def __init__(self, key_prefix: str, org: torch.nn.Module, block_size: int, scaled: bool):
        super().__init__()
        self.key_prefix = key_prefix
        if isinstance(org, torch.nn.Linear):
            in_features = org.in_features
        else:
            in_features = org.in_channels * org.kernel_size[0] * org.kernel_size[1]
        self.requested_block_size = block_size
        b = onetrainer_block_size(in_features, block_size)
        self.in_features = in_features
        self.oft_R = OneTrainerRotation(in_features // b, b, scaled)
        self.org_module = [org]

    def apply_to(self):
        self.org_forward = self.org_module[0].forward
        self.org_module[0].forward = self.forward

    def forward(self, x, *args, **kwargs):
        org = self.org_module[0]
        if isinstance(org, torch.nn.Linear):
            return self.org_forward(self.oft_R(x))
        w = org.weight
        rw = torch.einsum("ork,rkc->orc", w.reshape(w.shape[0], self.oft_R.r, self.oft_R.block_size),
                          self.oft_R.rotation()).reshape(w.shape)
        return F.conv2d(x, rw, org.bias, org.stride, org.padding, org.dilation, org.groups)


class OneTrainerOFTNetwork(torch.nn.Module):
    """``LoRAModuleWrapper`` over the UNet (prefix ``lora_unet``, layer filter = substrings) and
    optionally the text encoder (``lora_te``, no filter): every Linear / Conv2d whose path matches.
    Saved keys are OneTrainer's legacy-diffusers form: ``<prefix>_<path with . -> _>.oft_R.weight``;
    text-encoder paths as transformers 4.x names them (``lora_te_text_model_encoder_layers_0_...``)."""

    def __init__(self, unet, te, block_size: int, scaled: bool, unet_filter: Iterable[str], with_te: bool):
        super().__init__()
        self.ofts: list[OneTrainerOFT] = []
        # OneTrainer runs transformers 4.x, where CLIPTextModel's modules live under ``text_model.``; transformers 5
        # dropped that level (``encoder.layers.0...``): write the 4.x path, as OneTrainer's files have it
        te_path = "" if te is None or hasattr(te, "text_model") else "text_model."
        parts = [("lora_unet", unet, tuple(unet_filter), "")] + ([("lora_te", te, (), te_path)] if with_te else [])
        for prefix, model, filt, path in parts:
            for name, module in model.named_modules():
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                if filt and not any(f in name for f in filt):
                    continue
                key = f"{prefix}_{(path + name).replace('.', '_')}"
                self.ofts.append(OneTrainerOFT(key, module, block_size, scaled))

    def apply_to(self):
        for oft in self.ofts:
            oft.apply_to()
            self.add_module(oft.key_prefix, oft)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for oft in self.ofts:
            out[f"{oft.key_prefix}.oft_R.weight"] = oft.oft_R.weight.detach().clone().contiguous()
            if oft.oft_R.scaled:
                out[f"{oft.key_prefix}.oft_R.scaled_oft"] = oft.oft_R.scaled_oft.clone()
        return out

    @classmethod
    def from_weights(cls, file: Path, unet, te) -> OneTrainerOFTNetwork:
        """Hook exactly the modules named in ``file``; block size from ``n_elements = b(b-1)/2``."""
        sd = load_file(str(file))
        net = cls.__new__(cls)
        torch.nn.Module.__init__(net)
        net.ofts = []
        by_key = {f"lora_unet_{n.replace('.', '_')}": m for n, m in unet.named_modules()}
        by_key |= {f"lora_te_{n.replace('.', '_')}": m for n, m in te.named_modules()}
        by_key |= {f"lora_te_text_model_{n.replace('.', '_')}": m for n, m in te.named_modules()}
        for key, value in sd.items():
            if not key.endswith(".oft_R.weight"):
                continue
            prefix = key[: -len(".oft_R.weight")]
            b = int(round((1 + math.sqrt(1 + 8 * value.shape[1])) / 2))
            oft = OneTrainerOFT(prefix, by_key[prefix], b, f"{prefix}.oft_R.scaled_oft" in sd)
            assert oft.oft_R.weight.shape == value.shape, (key, value.shape)
            with torch.no_grad():
                oft.oft_R.weight.copy_(value)
            net.ofts.append(oft)
        net.apply_to()
        return net


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------

#: name -> spec. tool: lycoris (generic wrapper, ``lycoris_`` keys), lycoris-kohya (``lora_unet_`` /
#: ``lora_te_``), peft, kohya (sd-scripts re-implementation), onetrainer (re-implementation)
ADAPTERS: dict[str, dict] = {
    "lycoris-diag-oft-stripes": dict(
        tool="lycoris", task="stripes", steps=250, lr=5e-3, seed=101,
        algo="diag-oft", linear_dim=8, constraint=0.0, rescaled=False,
        preset={"target_module": ["Transformer2DModel", "ResnetBlock2D"], "target_name": []},
    ),
    "lycoris-diag-oft-constrained-diagonals": dict(
        tool="lycoris", task="diagonals", steps=250, lr=5e-3, seed=102,
        algo="diag-oft", linear_dim=8, constraint=1e-2, rescaled=False,
        preset={"target_module": ["Transformer2DModel", "ResnetBlock2D"], "target_name": []},
    ),
    "lycoris-diag-oft-rescaled-frames": dict(
        tool="lycoris", task="frames", steps=250, lr=5e-3, seed=103,
        algo="diag-oft", linear_dim=8, constraint=0.0, rescaled=True,
        preset={"target_module": ["Transformer2DModel", "ResnetBlock2D"], "target_name": []},
    ),
    "lycoris-boft-stripes": dict(
        tool="lycoris", task="stripes", steps=250, lr=3e-3, seed=104,
        algo="boft", linear_dim=8, constraint=0.0, rescaled=False,
        preset={"target_module": ["Attention"], "target_name": ["conv_out"]},
    ),
    "lycoris-kohya-diag-oft-diagonals": dict(
        tool="lycoris-kohya", task="diagonals", steps=250, lr=5e-3, seed=105,
        # preset "full" (and "full-lin", "unet-only") fail on a diffusers UNet in LyCORIS 4.1.3: TimestepEmbedding is a
        # target class AND time_embedding.linear_1/2 are target names -> "duplicated lora name"; attn-mlp has no names
        algo="diag-oft", network_dim=8, network_alpha=1.0, constraint=0.0, rescaled=False, preset="attn-mlp",
    ),
    "peft-frames": dict(tool="peft", task="frames", steps=250, lr=5e-3, seed=201, oft_block_size=4),
    "peft-stripes": dict(tool="peft", task="stripes", steps=250, lr=5e-3, seed=202, oft_block_size=4),
    "peft-diagonals": dict(tool="peft", task="diagonals", steps=250, lr=5e-3, seed=203, oft_block_size=4),
    "kohya-oft-frames": dict(tool="kohya", task="frames", steps=250, lr=3e-3, seed=301, dim=4, alpha=2.5e-2),
    "onetrainer-oft-frames": dict(
        tool="onetrainer", task="frames", steps=250, lr=5e-3, seed=401, oft_block_size=8, scaled=False,
        unet_filter=["attentions", "conv_in", "down_blocks.0.resnets.0.conv1"], text_encoder=True,
    ),
    "onetrainer-oft-scaled-stripes": dict(
        tool="onetrainer", task="stripes", steps=250, lr=2e-2, seed=402, oft_block_size=8, scaled=True,
        unet_filter=["attentions", "down_blocks.0.resnets.0.conv1"], text_encoder=False,
    ),
}

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]

NOTES = [
    "LyCORIS 4.1.3 kohya presets full / full-lin / unet-only fail on a diffusers UNet2DConditionModel "
    "('duplicated lora name: lora_unet_time_embedding_linear_1': TimestepEmbedding is a target class and "
    "time_embedding.linear_1/2 are target names); lycoris-kohya-* uses preset attn-mlp. The same assertion "
    "makes lycoris.kohya.create_network_from_weights fail on a diffusers UNet in a fresh process (it first builds "
    "LycorisNetworkKohya(te, unet) with the default targets): call "
    "LycorisNetworkKohya.apply_preset(lycoris.config.PRESET['attn-mlp']) before it",
    "transformers 5 CLIPTextModel has no text_model level (modules encoder.layers.N...): LyCORIS writes "
    "lora_te_encoder_layers_N_...; the OneTrainer file uses the transformers-4 paths OneTrainer writes, "
    "lora_te_text_model_encoder_layers_N_...",
    "PEFT adapters target 1x1 convs only: PEFT's OFT forward on k > 1 convs is not its merged weight "
    "(scripts/peft_conv_disagreement.py)",
    "OneTrainer scaled_oft: current OneTrainer divides oft_R.weight by 2 sqrt(b - 1) before the Cayley map "
    "(tag_util.py @ 4af24905 records the same factor); oft_utils.py @ 080ae164 and ComfyUI's loader divide by "
    "sqrt(b (b - 1) / 2); both are sqrt(28) for b = 8, the only block size of the scaled file",
    "OneTrainer: Linear W' = W R^T per input block, Conv2d W' = W R on the weight viewed (out, in*kh*kw); "
    "LyCORIS diag-oft / kohya sd-scripts: W' = R^T W per output block (Conv2d: whole (in, kh, kw) rows), "
    "R = (I + Q)(I - Q)^-1 with Q = B - B^T; PEFT: W' = W R^T per input block, R Cayley-Neumann 5 terms",
    "PEFT adapter_config.json: target_modules sorted (PEFT writes a set); safetensors headers rewritten with "
    "sorted keys (same tensors) so reruns are byte-identical",
]


@contextlib.contextmanager
def lycoris_preset(preset: dict):
    """Apply a generic-wrapper preset (class attributes of ``LycorisNetwork``) and restore them after."""
    from lycoris.wrapper import LycorisNetwork

    names = ["ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
             "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"]
    saved = {n: getattr(LycorisNetwork, n) for n in names}
    LycorisNetwork.apply_preset(preset)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(LycorisNetwork, n, v)


def quiet():
    return contextlib.redirect_stdout(io.StringIO())


def module_table_lycoris(sd: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for key in sorted(k for k in sd if k.endswith(".oft_blocks")):
        name = key[: -len(".oft_blocks")]
        blocks = sd[key].double()
        c = float(sd[f"{name}.alpha"])
        q = blocks - blocks.transpose(-1, -2)
        if blocks.ndim == 3:
            n, b, _ = blocks.shape
            row = {"module": name, "block_size": b, "num_blocks": n, "out_dim": n * b}
        else:
            m, n, b, _ = blocks.shape
            row = {"module": name, "block_size": b, "num_blocks": n, "boft_stages": m, "out_dim": n * b}
        qn = float(q.norm())
        row |= {"constraint_alpha": c, "q_norm": round(qn, 6)}
        if c > 0:
            row |= {"constraint": round(c * row["out_dim"], 6), "clamp_active": qn > c * row["out_dim"]}
        else:
            row["clamp_active"] = False
        if f"{name}.rescale" in sd:
            r = sd[f"{name}.rescale"].double()
            row["rescale_range"] = [round(float(r.min()), 6), round(float(r.max()), 6)]
        rows.append(row)
    return rows


def run_lycoris(name: str, spec: dict, base: Path, out: Path) -> dict:
    import lycoris

    unet, te = load_base(base)
    path = out / f"{name}.safetensors"
    with lycoris_preset(spec["preset"]), quiet():
        torch.manual_seed(spec["seed"])
        net = lycoris.create_lycoris(unet, 1.0, linear_dim=spec["linear_dim"], linear_alpha=1.0, algo=spec["algo"],
                                     constraint=spec["constraint"], rescaled=spec["rescaled"])
        net.apply_to()
    params = [p for p in net.parameters() if p.requires_grad]
    hist = train_adapter(params, unet, te, spec["task"], spec["steps"], spec["lr"], spec["seed"])
    trained = all_losses(unet, te)
    meta = {"ss_network_module": "lycoris.wrapper", "ss_network_args": json.dumps(
        {k: spec[k] for k in ("algo", "linear_dim", "constraint", "rescaled")} | {"preset": spec["preset"]}),
        "oftmerge_fixture": name}
    net.save_weights(str(path), torch.float32, meta)
    # reload with LyCORIS's own loader into a fresh base
    unet2, te2 = load_base(base)
    before = probe_output(unet2, te2)
    with quiet():
        net2, _ = lycoris.create_lycoris_from_weights(1.0, str(path), unet2)
        net2.apply_to()
    after = probe_output(unet2, te2)
    loaded = all_losses(unet2, te2)
    sd = load_file(str(path))
    return {
        "tool": "lycoris", "api": "lycoris.create_lycoris(unet, 1.0, linear_dim, linear_alpha=1, algo=..., "
        "constraint=..., rescaled=...) after LycorisNetwork.apply_preset(preset); .apply_to(); .save_weights",
        "loader": "lycoris.create_lycoris_from_weights(1.0, file, unet); .apply_to()",
        "options": {k: spec[k] for k in ("algo", "linear_dim", "constraint", "rescaled", "preset")} | {"linear_alpha": 1.0},
        "history": hist, "loss_after_training": trained, "adapted": loaded,
        "loaded_modules": len(net2.loras), "probe_change": float((after - before).abs().max()),
        "modules": module_table_lycoris(sd), "keys": sorted(sd)[:4], "num_keys": len(sd),
    }


def run_lycoris_kohya(name: str, spec: dict, base: Path, out: Path) -> dict:
    from lycoris import kohya

    unet, te = load_base(base)
    path = out / f"{name}.safetensors"
    with quiet():
        torch.manual_seed(spec["seed"])
        net = kohya.create_network(1.0, spec["network_dim"], spec["network_alpha"], None, te, unet, algo=spec["algo"],
                                   constraint=spec["constraint"], rescaled=spec["rescaled"], preset=spec["preset"])
        net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    params = [p for p in net.parameters() if p.requires_grad]
    hist = train_adapter(params, unet, te, spec["task"], spec["steps"], spec["lr"], spec["seed"])
    trained = all_losses(unet, te)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(spec["network_dim"]),
            "ss_network_alpha": str(spec["network_alpha"]),
            "ss_network_args": json.dumps({"algo": spec["algo"], "preset": spec["preset"]}), "oftmerge_fixture": name}
    net.save_weights(str(path), torch.float32, meta)
    unet2, te2 = load_base(base)
    before = probe_output(unet2, te2)
    with quiet():
        # the loader first builds LycorisNetworkKohya(te, unet) with the class's current targets: in a fresh
        # process those are the defaults, which hit the same duplicate-name assertion; apply a preset first
        from lycoris.config import PRESET

        kohya.LycorisNetworkKohya.apply_preset(PRESET[spec["preset"]])
        net2, _ = kohya.create_network_from_weights(1.0, str(path), None, te2, unet2)
        net2.apply_to(te2, unet2, apply_text_encoder=True, apply_unet=True)
    after = probe_output(unet2, te2)
    loaded = all_losses(unet2, te2)
    sd = load_file(str(path))
    return {
        "tool": "lycoris", "api": "lycoris.kohya.create_network(1.0, network_dim, network_alpha, None, text_encoder, unet, "
        "algo=..., preset='attn-mlp'); .apply_to(te, unet, True, True); .save_weights",
        "loader": "lycoris.kohya.LycorisNetworkKohya.apply_preset(lycoris.config.PRESET['attn-mlp']); "
        "lycoris.kohya.create_network_from_weights(1.0, file, None, text_encoder, unet); .apply_to(te, unet, True, True)",
        "options": {k: spec[k] for k in ("algo", "network_dim", "network_alpha", "constraint", "rescaled", "preset")},
        "history": hist, "loss_after_training": trained, "adapted": loaded,
        "loaded_modules": {"unet": len(net2.unet_loras), "text_encoder": len(net2.text_encoder_loras)},
        "probe_change": float((after - before).abs().max()),
        "modules": module_table_lycoris(sd), "keys": sorted(k for k in sd if "lora_te" in k)[:2]
        + sorted(k for k in sd if "lora_unet" in k)[:2], "num_keys": len(sd),
    }


def run_peft(name: str, spec: dict, base: Path, out: Path) -> dict:
    from peft import OFTConfig, PeftModel, get_peft_model

    unet, te = load_base(base)
    path = out / name
    cfg = OFTConfig(r=0, oft_block_size=spec["oft_block_size"], target_modules=PEFT_TARGETS, module_dropout=0.0,
                    init_weights=True)
    torch.manual_seed(spec["seed"])
    model = get_peft_model(unet, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    hist = train_adapter(params, model, te, spec["task"], spec["steps"], spec["lr"], spec["seed"])
    trained = all_losses(model, te)
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "README.md").unlink(missing_ok=True)
    # PEFT stores target_modules from a set (order varies with PYTHONHASHSEED): sort it so reruns are byte-identical
    cfg_path = path / "adapter_config.json"
    saved_cfg = json.loads(cfg_path.read_text())
    saved_cfg["target_modules"] = sorted(saved_cfg["target_modules"])
    cfg_path.write_text(json.dumps(saved_cfg, indent=2, sort_keys=True) + "\n")
    unet2, te2 = load_base(base)
    before = probe_output(unet2, te2)
    loaded_model = PeftModel.from_pretrained(unet2, str(path))
    after = probe_output(loaded_model, te2)
    loaded = all_losses(loaded_model, te2)
    sd = load_file(str(path / "adapter_model.safetensors"))
    rows = []
    for key in sorted(sd):
        r, n_el = sd[key].shape
        b = int(round((1 + math.sqrt(1 + 8 * n_el)) / 2))
        rows.append({"module": key, "block_size": b, "num_blocks": r, "in_features": r * b})
    return {
        "tool": "peft", "api": "peft.get_peft_model(unet, OFTConfig(r=0, oft_block_size, target_modules)); .save_pretrained",
        "loader": "peft.PeftModel.from_pretrained(unet, dir)",
        "options": {"r": 0, "oft_block_size": spec["oft_block_size"], "target_modules": PEFT_TARGETS,
                    "use_cayley_neumann": True, "num_cayley_neumann_terms": 5, "coft": False, "block_share": False},
        "history": hist, "loss_after_training": trained, "adapted": loaded,
        "probe_change": float((after - before).abs().max()),
        "modules": rows, "keys": sorted(sd)[:4], "num_keys": len(sd),
    }


def run_kohya(name: str, spec: dict, base: Path, out: Path) -> dict:
    unet, te = load_base(base)
    path = out / f"{name}.safetensors"
    net = SDScriptsOFTNetwork(unet, 1.0, spec["dim"], spec["alpha"])
    net.apply_to()
    hist = train_adapter(list(net.parameters()), unet, te, spec["task"], spec["steps"], spec["lr"], spec["seed"])
    trained = all_losses(unet, te)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path), {"ss_network_module": "networks.oft", "ss_network_dim": str(spec["dim"]),
                              "ss_network_alpha": str(spec["alpha"]), "oftmerge_fixture": name})
    unet2, te2 = load_base(base)
    before = probe_output(unet2, te2)
    net2 = SDScriptsOFTNetwork.from_weights(path, unet2)
    after = probe_output(unet2, te2)
    loaded = all_losses(unet2, te2)
    rows = []
    for oft in net2.ofts:
        q, norm = oft.generator()
        rows.append({"module": oft.oft_name, "block_size": oft.block_size, "num_blocks": oft.num_blocks,
                     "out_dim": oft.out_dim, "constraint": round(oft.constraint, 6), "q_norm": round(float(norm), 6),
                     "clamp_active": bool(norm > oft.constraint)})
    return {
        "tool": "kohya sd-scripts (re-implemented here: SDScriptsOFT)",
        "reference": {"repo": "kohya-ss/sd-scripts", "path": "networks/oft.py",
                      "commit": "af01a027fd5ca1ccd9162019c88574396df8990c"},
        "loader": "SDScriptsOFTNetwork.from_weights (sd-scripts create_network_from_weights logic)",
        "options": {"network_dim (num blocks)": spec["dim"], "network_alpha": spec["alpha"],
                    "targets": "Linear children of diffusers Attention (sd-scripts: CrossAttention)",
                    "constraint": "alpha * out_dim, clamp always applied", "multiplier": 1.0},
        "history": hist, "loss_after_training": trained, "adapted": loaded,
        "probe_change": float((after - before).abs().max()),
        "modules": rows, "keys": sorted(sd)[:4], "num_keys": len(sd),
    }


def run_onetrainer(name: str, spec: dict, base: Path, out: Path) -> dict:
    unet, te = load_base(base)
    path = out / f"{name}.safetensors"
    net = OneTrainerOFTNetwork(unet, te, spec["oft_block_size"], spec["scaled"], spec["unet_filter"], spec["text_encoder"])
    net.apply_to()
    params = [o.oft_R.weight for o in net.ofts]
    hist = train_adapter(params, unet, te, spec["task"], spec["steps"], spec["lr"], spec["seed"])
    trained = all_losses(unet, te)
    sd = net.tensors()
    save_file(sd, str(path), {"ot_peft_type": "OFT_2", "oftmerge_fixture": name})
    unet2, te2 = load_base(base)
    before = probe_output(unet2, te2)
    net2 = OneTrainerOFTNetwork.from_weights(path, unet2, te2)
    after = probe_output(unet2, te2)
    loaded = all_losses(unet2, te2)
    rows = []
    for oft in net2.ofts:
        org = oft.org_module[0]
        rows.append({"module": oft.key_prefix, "layer": type(org).__name__, "weight_shape": list(org.weight.shape),
                     "in_features": oft.in_features, "block_size": oft.oft_R.block_size, "num_blocks": oft.oft_R.r,
                     "scaled_divisor": round(oft.oft_R.divisor, 6),
                     "q_norm": round(float(oft.oft_R.skew().norm()), 6)})
    return {
        "tool": "OneTrainer OFT v2 (re-implemented here: OneTrainerOFT)",
        "reference": {"repo": "Nerogar/OneTrainer",
                      "paths": {"modules/module/oft_utils.py": ["080ae164bb2c66ee0a904c9603fcd6db0cac6f17",
                                                                 "4895d09d36bf5f4d946ef06dff187d89ee574987"],
                                "modules/module/LoRAModule.py": "OFTModule / LoRAModuleWrapper (OFT_2)",
                                "modules/util/optimizer/tag_util.py": "4af24905aa8319bd0523a22948bb2880421be6f3",
                                "modules/modelSetup/StableDiffusionLoRASetup.py": "9a9328b3dbb4c5c820c73edce4075ea6bc800bba",
                                "modules/modelSaver/mixin/LoRASaverMixin.py": "4822e8e5493e871e5b503eae7b9db61105ba546c",
                                "modules/util/convert/lora/convert_lora_util.py": "ee01e6a63d296fd3c876c68fc94607cc11de5cea"}},
        "loader": "OneTrainerOFTNetwork.from_weights",
        "options": {"oft_block_size": spec["oft_block_size"], "scaled_oft": spec["scaled"],
                    "unet_layer_filter": spec["unet_filter"], "text_encoder": spec["text_encoder"],
                    "cayley": "Neumann, 5 terms", "coft": False, "block_share": False, "dropout": 0.0,
                    "linear": "y = W (x R): W' = W R^T per input block", "conv2d": "W' = W R on (out, in*kh*kw)",
                    "scaled_divisor": "2 sqrt(b - 1) (= sqrt(b(b-1)/2) of oft_utils.py @ 080ae164 for b = 8)",
                    "text_encoder_key_prefix": "lora_te_text_model_ (transformers 4.x module paths, as OneTrainer "
                                               "writes them; transformers 5 CLIPTextModel has no text_model level)"},
        "history": hist, "loss_after_training": trained, "adapted": loaded,
        "probe_change": float((after - before).abs().max()),
        "modules": rows, "keys": sorted(sd)[:4], "num_keys": len(sd),
    }


RUNNERS = {"lycoris": run_lycoris, "lycoris-kohya": run_lycoris_kohya, "peft": run_peft, "kohya": run_kohya,
           "onetrainer": run_onetrainer}


def canonical_safetensors(path: Path) -> None:
    """Rewrite a safetensors header with sorted JSON keys (same tensors, same bytes of data).

    safetensors serialises the header from a hash map, so with more than one metadata entry the
    key order (and the file's bytes) changes from run to run; sorting makes reruns byte-identical.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def versions() -> dict:
    from importlib.metadata import version

    import diffusers
    import peft
    import safetensors
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "lycoris-lora": version("lycoris-lora"), "safetensors": safetensors.__version__}


def write_model_index(out: Path) -> None:
    """``model_index.json``: the base is a diffusers pipeline directory (its U-Net and text encoder), so files adapting both fold in one run."""
    import diffusers

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"]}  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "adapters" / "diffusion")
    ap.add_argument("--base-steps", type=int, default=700)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-base", action="store_true", help="keep OUT/base (and its manifest entry)")
    ap.add_argument("--only", default="", help="comma-separated adapter names (others keep their manifest entry)")
    ap.add_argument("--adapter-steps", type=int, default=None, help="override every adapter's steps (smoke tests)")
    args = ap.parse_args(argv)
    import lycoris  # noqa: F401  (configures its logger on import; quiet it after)
    import transformers

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    t_all = time.time()
    base = out / "base"
    if args.reuse_base and (base / "unet").exists():
        base_info = old["base"]
        write_model_index(base)
    else:
        if base.exists():
            shutil.rmtree(base)
        base_info = build_base(base, args.base_steps, args.seed)
        base_info["config"] = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config().items()},
                               "text_encoder": {k: getattr(text_encoder_config(), k) for k in (
                                   "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "max_position_embeddings")}}
    unet, te = load_base(base)
    base_info["losses"] = all_losses(unet, te)
    print(f"base: {base_info['losses']}", flush=True)
    only = [n for n in args.only.split(",") if n]
    unknown = set(only) - set(ADAPTERS)
    if unknown:
        ap.error(f"unknown adapters {sorted(unknown)}; known: {sorted(ADAPTERS)}")
    entries = dict(old.get("adapters", {})) if only else {}
    for name, spec in ADAPTERS.items():
        if only and name not in only:
            continue
        t0 = time.time()
        if args.adapter_steps is not None:
            spec = spec | {"steps": args.adapter_steps}
        entry = RUNNERS[spec["tool"]](name, spec, base, out)
        entry = {"task": spec["task"], "steps": spec["steps"], "lr": spec["lr"], "seed": spec["seed"],
                 "batch": BATCH, "optimizer": "AdamW betas 0.9/0.99, no weight decay, clip 1"} | entry
        entry["losses"] = {"base": base_info["losses"], "adapted": entry.pop("adapted")}
        own = spec["task"]
        entry["own_task_improvement"] = round(entry["losses"]["base"][own] - entry["losses"]["adapted"][own], 6)
        entry["seconds"] = round(time.time() - t0, 1)
        # the file loads with its own tool, loading is not a no-op, and the adapter helps its task
        assert entry["probe_change"] > 1e-3, (name, entry["probe_change"])
        assert entry["own_task_improvement"] > 0, (name, entry["losses"])
        assert entry["losses"]["adapted"] == entry["loss_after_training"], (name, "reload differs from training")
        entries[name] = entry
        print(f"{name}: {entry['losses']['adapted']} (own task {own}: {entry['losses']['base'][own]:.4f} -> "
              f"{entry['losses']['adapted'][own]:.4f}); probe change {entry['probe_change']:.3g}; "
              f"{entry['seconds']} s", flush=True)
    manifest = {
        "description": "tiny diffusers UNet + CLIP text encoder and small OFT adapters trained on synthetic "
                       "denoising tasks; see adapters/README.md and scripts/make_diffusion_fixtures.py",
        "generated_by": "scripts/make_diffusion_fixtures.py",
        "tasks": {"module": "oftmerge/demo/diffusion_tasks.py", "names": list(dt.TASKS),
                  "score": "diffusion_tasks.task_losses(unet, text_encoder, task): mean epsilon MSE on "
                           f"{dt.EVAL_SIZE} fixed held-out rows (lower is better)",
                  "schedule": {"num_timesteps": dt.NUM_TIMESTEPS, "beta_start": dt.BETA_START, "beta_end": dt.BETA_END}},
        "versions": versions(),
        "notes": NOTES,
        "base": base_info,
        "adapters": {n: entries[n] for n in ADAPTERS if n in entries},
        "total_seconds": round(time.time() - t_all, 1) if not only else old.get("total_seconds"),
    }
    if only:
        manifest["last_partial_run"] = {"adapters": only, "seconds": round(time.time() - t_all, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for path in sorted(out.rglob("*.safetensors")):
        canonical_safetensors(path)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1024:.0f} kB) in {time.time() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
