"""OneTrainer OFT v2 files (``PeftType.OFT_2``), read from OneTrainer's own code.

Sources (repository ``Nerogar/OneTrainer``):

* ``modules/module/LoRAModule.py`` @ ``9de9c447ca6d793822985120dd8fad75f5745a9e`` (newest stored
  version with OFT): ``OFTModule``. A ``Linear`` rotates its **input**, ``self.oft_R(x)`` then the
  layer (``W' = W R^T``); a ``Conv2d`` rotates its weight, ``weight.reshape(out, r, b)`` and
  ``einsum("ork,rkc->orc", w, R)`` (``W' = W R``: the *inverse* rotation), its width being
  ``in_channels * kh * kw`` flattened in PyTorch's order (exactly oftmerge's ``(out, in*kh*kw)``
  view). The rotation is always the Cayley-Neumann series with 5 terms; ``oft_scaled`` divides
  the stored parameter by ``2 sqrt(b - 1)`` first. The block size is adjusted per layer to a
  divisor of the width (``adjust_oft_parameters``), so one file mixes block sizes.
* ``modules/module/oft_utils.py`` @ ``a44be3243384cb33afdd7aa3d5ddbaf247c2a7e7``:
  ``OFTRotationModule``: ``weight`` ``(r, b(b-1)/2)``, the strict upper triangles
  (``torch.triu_indices(b, b, 1)``) scattered into ``Q = U - U^T``; the series
  ``I + 2Q + 2Q^2 + 2Q^3 + Q^4`` (PEFT 0.18's, :func:`oftmerge.linalg.neumann_series`); the
  input reshaped to ``(..., r, b)`` and ``x_k -> x_k R_k``. Forks' versions of the file
  (``BitcrushedHeart/OneTrainer`` @ ``1cc6f096``) register the marker buffer
  ``scaled_oft = torch.tensor(True)`` (key ``<module>.oft_R.scaled_oft``) and divide by
  ``2 sqrt(b - 1)`` as ``OFTModule`` does.
* ``LoRAModule.py`` and ``oft_utils.py`` @ ``080ae164bb2c66ee0a904c9603fcd6db0cac6f17`` (an older
  OFT v2): the same marker, but the divisor was ``sqrt(b(b-1)/2)`` (``n_elements ** 0.5``), the
  train config key ``scaled_oft`` (now ``oft_scaled``), and COFT projected the parameter of Linear
  layers in every forward. The file alone does not say which rule applies: the train config
  OneTrainer may embed (metadata ``ot_config``) does; without it the current rule is used and a
  note says so. The two agree for ``b = 8``.
* ``modules/util/convert/convert_lora_util.py`` @ ``05fc224f`` with
  ``modules/modelSaver/mixin/LoRASaverMixin.py`` @ ``2676d330``: modules are created as
  ``<prefix>.<module path>`` with the prefixes ``lora_unet``, ``lora_te`` (SD 1.x/2.x),
  ``lora_te1`` / ``lora_te2`` (SDXL: ``modules/modelSetup/StableDiffusionXLLoRASetup.py``). The
  default SAFETENSORS save converts them to the *legacy* naming, ``'.' -> '_'`` in the module path
  (``lora_unet_down_blocks_0_attentions_0_proj_in.oft_R.weight``): the kohya / LyCORIS stems of
  :data:`oftmerge.formats.diffusion.COMPONENTS`. The INTERNAL format keeps the dots
  (``lora_unet.down_blocks.0...``), read here by the same ``'.' -> '_'``. The OMI format (LDM names:
  ``unet.input_blocks.1.1...``, ``clip_l.``, ``clip_g.``) is refused. No ``alpha`` is saved (musubi
  -tuner's OneTrainer-compatible export adds ``.alpha`` and ``*_metadata`` tensors: read, and
  ignored by every loader of these files).

Refused, each in one line: DoRA-OFT (``dora_scale`` / ``initial_norm``: per-row magnitudes),
block-shared rotations (``block_share``), forks' CANS map (``oft_R.cans_oft`` / ``cans_exp``).
Forks' ``oft_R.clipped_oft`` (a spectral-norm clip estimated by one power-iteration step from a
random state) is read only where no block reaches the clip, so that the clip is the identity.

In oftmerge's convention (``side="input"``: ``W' = W D^T``, ``D = blockdiag(neumann(G))``) the
generator of a Linear module is ``G = skew(U) / s``; of a Conv2d it is ``-skew(U) / s``: the series
is a polynomial in ``Q`` and ``Q^T = -Q``, so ``R(Q)^T = R(-Q)`` term by term. The file does not
say which modules are convolutions. The U-Net's ``conv_in``, ``conv_out``, ``resnets_*_conv1`` /
``conv2`` / ``conv_shortcut`` and ``down``/``upsamplers_*_conv`` are, text encoders and the rest of
the U-Net are Linear, but ``attentions_*_proj_in`` / ``proj_out`` are 1x1 convolutions in SD 1.x
and Linear in SD 2.x / SDXL. Those are read in the **Linear** convention and carry
``extra["conv"] = None`` (with ``extra["conv_hint"]`` from the metadata where it tells the model):
a fold must take the sign from the base weight (negated where it is 4-D): :meth:`DiffusionAdapter.fold_rotation`
(:func:`base_generator` for the generator alone). The writer
uses the same rule, so a read, merge and write of OneTrainer files is exact for every module.

Written files hold unscaled parameters (``U = triangle(G)``, or of ``-G`` for a convolution) and no
marker: the loaders apply them as they are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError
from oftmerge.formats.diffusion import DiffusionAdapter, DiffusionModule, MergedModule, conv_by_base, refuse_unheld, register_diffusion_format, split_keys
from oftmerge.formats.io import TensorDict, TensorFile
from oftmerge.linalg import RotationMap, pack_skew, unpack_skew

__all__ = ["ONETRAINER", "base_generator", "conv_kind"]

#: OneTrainer's series: Cayley-Neumann, 5 terms (``OFTModule.initialize_weights``), PEFT 0.18's form
TERMS = 5
#: canonical (legacy) prefixes OneTrainer writes for U-Net / CLIP models
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")
_OMI_PREFIXES = ("unet.", "clip_l.", "clip_g.", "t5.", "transformer.")
_ROLES = {
    ".oft_R.weight": "weight",
    ".oft_R.scaled_oft": "scaled",
    ".oft_R.clipped_oft": "clipped",
    ".oft_R.cans_oft": "cans",
    ".oft_R.cans_exp": "cans",
    ".alpha": "alpha",
    ".oft_block_size_metadata": "meta_block_size",
    ".oft_block_share_metadata": "meta_block_share",
    ".oft_coft_metadata": "meta_coft",
    ".coft_eps_metadata": "meta_coft_eps",
    ".scaled_oft_metadata": "meta_scaled",
    ".dora_scale": "dora",
    ".initial_norm": "dora",
    ".dora_multiplier": "dora",
    ".dora_log_multiplier": "dora",
}
_CONV = re.compile(r"^lora_unet_(conv_in|conv_out|.*_resnets_\d+_(conv1|conv2|conv_shortcut)|.*_(down|up)samplers_\d+_conv)$")
_PROJ = re.compile(r"^lora_unet_.*_attentions_\d+_proj_(in|out)$")
#: the rule that turns the stored parameter into the generator when the marker is present
SCALE_RULES = {"2*sqrt(b-1)": lambda b: 2.0 * math.sqrt(b - 1), "sqrt(b(b-1)/2)": lambda b: math.sqrt(b * (b - 1) / 2)}


def conv_kind(name: str) -> bool | None:
    """Whether canonical module ``name`` is a Conv2d in the models OneTrainer trains (None: depends on the model)."""
    if _CONV.match(name):
        return True
    if _PROJ.match(name):
        return None
    return False


def base_generator(mod: DiffusionModule, generator: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The generator to fold into base ``weight``: negated for a module read in the Linear convention whose weight is a Conv2d's.

    Only OneTrainer modules whose kind the file does not tell (``extra["conv"] is None``: attention
    ``proj_in`` / ``proj_out``, 1x1 convolutions in SD 1.x) change; every other module, of any
    format, keeps ``generator``.
    """
    return -generator if conv_by_base(mod, weight) else generator


def _block_size(n: int) -> int | None:
    b = int(round((1 + math.sqrt(1 + 8 * n)) / 2))
    return b if b * (b - 1) // 2 == n else None


def _train_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get("ot_config")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _proj_is_conv(metadata: Mapping[str, str]) -> bool | None:
    """Whether the model's attention ``proj_in`` / ``proj_out`` are convolutions (SD 1.x), from the metadata OneTrainer writes."""
    arch = metadata.get("modelspec.architecture", "")
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl") or arch.startswith(("stable-diffusion-xl", "stable-diffusion-v2")):
        return False
    if str(metadata.get("ss_v2", "")) == "True":
        return False
    if arch.startswith("stable-diffusion-v1"):
        return True
    return None


def _effective(mod: DiffusionModule, raw: torch.Tensor) -> torch.Tensor:
    q = unpack_skew(raw) / float(mod.extra.get("divisor", 1.0))
    clip = mod.extra.get("clip")
    if clip is not None and q.numel():
        sigma = float(torch.linalg.matrix_norm(q, ord=2).max())
        if sigma > clip:
            raise AdapterFormatError(
                f"module {mod.name!r} ({mod.key}): its rotation is clipped at spectral norm {clip:g} (clipped_oft) and reaches {sigma:.4g}; the loader "
                "estimates the norm by one power-iteration step from a random start, so what it applies is not determined by the file. "
                "Re-export it without the clip"
            )
    return -q if mod.extra.get("conv") is True else q


class OneTrainerFormat:
    """OneTrainer's OFT v2 (``oft_R``) files of U-Net models and their CLIP text encoders."""

    name = "onetrainer"
    side: Literal["input", "output"] = "input"

    def detect(self, keys: Sequence[str]) -> bool:
        return any(k.endswith(".oft_R.weight") for k in keys) and not any(k.endswith(".oft_blocks") for k in keys)

    def rotation_map(self) -> RotationMap:
        return RotationMap("neumann", TERMS, "0.18")

    def read(self, path: Path, source: TensorFile | TensorDict, metadata: Mapping[str, str]) -> DiffusionAdapter:
        keys = list(source.keys())
        omi = [k for k in keys if k.startswith(_OMI_PREFIXES)]
        if omi:
            raise AdapterFormatError(
                f"{path}: key {omi[0]!r} is in OneTrainer's OMI naming (original LDM module names); oftmerge reads the legacy naming "
                "(lora_unet_<diffusers path>...). Save the model from OneTrainer with the legacy safetensors format"
            )
        groups = split_keys(path, keys, _ROLES)
        config = _train_config(metadata)
        proj_conv = _proj_is_conv(metadata)
        notes: list[str] = []
        rule = "2*sqrt(b-1)"
        if "oft_scaled" not in config and "scaled_oft" in config:
            rule = "sqrt(b(b-1)/2)"
        modules: dict[str, DiffusionModule] = {}
        unknown_rule = False
        single: list[str] = []
        for stem, roles in sorted(groups.items()):
            if "weight" not in roles:
                raise AdapterFormatError(f"{path}: {', '.join(sorted(roles.values()))} without {stem}.oft_R.weight; the file is incomplete")
            if "dora" in roles:
                raise AdapterFormatError(
                    f"{path}: module {stem} is DoRA-OFT (dora_scale / initial_norm): its per-row magnitudes are not an orthogonal "
                    "rotation and oftmerge does not merge them. Train or export it without weight decomposition"
                )
            if "cans" in roles:
                raise AdapterFormatError(
                    f"{path}: module {stem} uses CANS (Newton-Schulz orthogonalisation: {roles['cans']}), not the Cayley-Neumann series; "
                    "oftmerge does not reproduce that map. Re-train it with the default rotation"
                )
            name = stem.replace(".", "_")
            if not name.startswith(PREFIXES):
                raise AdapterFormatError(
                    f"{path}: module {stem!r} is not a U-Net or CLIP text-encoder module (expected a prefix {', '.join(p.rstrip('_') for p in PREFIXES)}); "
                    "oftmerge reads OneTrainer OFT files of SD 1.x / 2.x / SDXL models"
                )
            if name in modules:
                raise AdapterFormatError(f"{path}: module {name} is stored twice (dotted and legacy naming: {stem!r}); the file is broken")
            shape = tuple(source.shape(roles["weight"]))
            b = _block_size(shape[1]) if len(shape) == 2 else None
            if b is None:
                raise AdapterFormatError(
                    f"{path}: {roles['weight']} has shape {shape}; OneTrainer's oft_R.weight is (blocks, b(b-1)/2), the packed upper triangles of b x b blocks"
                )
            r = shape[0]
            if "meta_block_size" in roles:
                stored_b = int(round(float(source.get(roles["meta_block_size"]).reshape(-1)[0])))
                if stored_b != b:
                    raise AdapterFormatError(f"{path}: {roles['meta_block_size']} says block size {stored_b}, {roles['weight']} holds blocks of {b}")
            shared = bool(config.get("oft_block_share")) or ("meta_block_share" in roles and float(source.get(roles["meta_block_share"]).reshape(-1)[0]) != 0)
            if shared:
                raise AdapterFormatError(
                    f"{path}: module {stem} shares one rotation block across its width (block_share); oftmerge needs the layer's width to expand "
                    "it and does not read block-shared files. Train without block_share"
                )
            if r == 1 and b > 1:
                single.append(name)
            scaled = "scaled" in roles
            divisor = SCALE_RULES[rule](b) if scaled and b > 1 else 1.0
            if scaled and "ot_config" not in metadata and b not in (1, 8):
                unknown_rule = True
            kind = conv_kind(name)
            extra: dict[str, Any] = {"conv": kind, "scaled": scaled, "divisor": divisor, "scale_rule": rule if scaled else None}
            if kind is None:
                extra["conv_hint"] = proj_conv
            if "clipped" in roles:
                extra["clip"] = float(source.get(roles["clipped"]).to(torch.float64).reshape(-1)[0])
            alpha = float(source.get(roles["alpha"]).to(torch.float64).reshape(-1)[0]) if "alpha" in roles else None
            modules[name] = DiffusionModule(
                name=name, key=roles["weight"], stages=1, num_blocks=r, block_size=b, alpha=alpha, constraint=None,
                alpha_key=roles.get("alpha"), extra=extra,
            )  # fmt: skip
        if not modules:
            raise AdapterFormatError(f"{path}: no OFT modules (no .oft_R.weight tensors)")
        if unknown_rule:
            notes.append(
                f"{path}: scaled OFT (oft_R.scaled_oft) without OneTrainer's train config in the metadata: read with today's divisor 2*sqrt(b-1); "
                "files from OneTrainer builds of the first OFT v2 (train config key 'scaled_oft') divided by sqrt(b(b-1)/2) instead"
            )
        if single:
            notes.append(
                f"{path}: {len(single)} module(s) store one block (e.g. {single[0]}): read as one block as wide as the layer, what OneTrainer trains "
                "there; a block-shared file (block_share) would repeat it across the layer, which only the base model shows"
            )
        if config.get("oft_coft"):
            notes.append(f"{path}: trained with COFT; OneTrainer's first OFT v2 re-projected Linear modules at every forward, loaders do not; read as stored")
        if any(m.extra["conv"] is None for m in modules.values()):
            hint: dict[bool | None, str] = {
                True: "the metadata names SD 1.x, where they are 1x1 convolutions",
                False: "the metadata names SD 2.x / SDXL, where they are Linear",
                None: "the model is not named in the metadata",
            }
            notes.append(
                f"{path}: attention proj_in / proj_out modules are read in the Linear convention ({hint[proj_conv]}); a fold takes the sign from the base"
            )
        return DiffusionAdapter(
            path=path, format=self.name, algo="oft", side=self.side, rotation_map=self.rotation_map(), modules=modules,
            metadata=dict(metadata), _source=source, _effective=_effective, notes=tuple(notes),
        )  # fmt: skip

    def check_writable(self, modules: Sequence[MergedModule], where: str) -> None:
        refuse_unheld(
            modules, where, prefixes=PREFIXES, names="has no OneTrainer name (lora_unet_ / lora_te_ / lora_te1_ / lora_te2_)", tool="OneTrainer's OFT",
            instead="write --to lycoris, or fold it into the model: oftmerge fold --base MODEL",
        )  # fmt: skip
        for m in modules:
            g = m.generator
            if g.dim() != 3 or g.shape[1] != g.shape[2]:
                raise IncompatibleAdaptersError(f"{where}: module {m.name!r} has generator blocks of shape {tuple(g.shape)}; OneTrainer stores square blocks")
            asym = float(torch.linalg.vector_norm((g + g.transpose(-1, -2)).reshape(-1)))
            if asym > 1e-9 * max(1.0, float(torch.linalg.vector_norm(g.reshape(-1)))):
                raise IncompatibleAdaptersError(f"{where}: module {m.name!r}: its merged generator is not skew-symmetric; OneTrainer stores an upper triangle")

    def write_tensors(self, modules: Sequence[MergedModule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in modules:
            g = -m.generator if conv_kind(m.name) is True else m.generator
            out[f"{m.name}.oft_R.weight"] = pack_skew(g.to(torch.float64)).to(dtype).contiguous()
        return out


ONETRAINER = register_diffusion_format(OneTrainerFormat())
