"""Single-file diffusion OFT adapters (LyCORIS, kohya sd-scripts, OneTrainer): one description for merge, convert, fold.

Each tool stores a different parameter, clamps it differently, uses the opposite Cayley sign or
the other side of the weight (``docs/diffusion.md`` has the table, with where each rule was
read). A format module (:mod:`~oftmerge.formats.lycoris`, :mod:`~oftmerge.formats.kohya`,
:mod:`~oftmerge.formats.onetrainer`) reads a file into a :class:`DiffusionAdapter` whose
:meth:`~DiffusionAdapter.generator` is the **effective** generator in oftmerge's convention, so
that the merge kernels see one thing whatever tool wrote the file:

* ``side="output"`` (LyCORIS, kohya): ``W' = D^T W`` on the weight's rows (Conv2d kernels viewed
  as ``(out, in * kh * kw)``), ``D = blockdiag(rotation_map.rotation(Q))``, then every output row
  times ``rescale``. That is PEFT 0.7-0.13's convention (:mod:`oftmerge.kernels.fold`).
* ``side="input"`` (OneTrainer): ``W' = W D^T`` on the columns, as PEFT >= 0.14.

``Q`` is what the tool applies *after* its clamp at multiplier 1: a file merged, converted or
folded by oftmerge means what the tool that loads it computes. Module names are canonical across
formats: the kohya / LyCORIS stem (``lora_unet_down_blocks_0_attentions_0_proj_in``); each format
maps its own key prefix to it (:attr:`DiffusionModule.name`, :attr:`DiffusionModule.key`).

A merged result is written back through :meth:`DiffusionFormat.write` (tensors + safetensors
metadata); the engine commits the file atomically (:func:`oftmerge.engine.commit.output_file`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError
from oftmerge.formats.io import TensorDict, TensorFile, content_hash
from oftmerge.formats.peft_oft import ModuleSpec
from oftmerge.linalg import RotationMap

__all__ = [
    "COMPONENTS",
    "DIFFUSION_FORMATS",
    "DiffusionAdapter",
    "DiffusionFormat",
    "DiffusionModule",
    "MergedModule",
    "component_of",
    "conv_by_base",
    "detect_diffusion_format",
    "diffusion_formats",
    "is_diffusion_file",
    "read_diffusion_adapter",
    "refuse_unheld",
    "register_diffusion_format",
    "safe_alpha",
]

#: canonical name prefix -> the model component it adapts (kohya / LyCORIS naming; ``lycoris_`` is
#: LyCORIS's generic wrapper, applied to whichever model the user wrapped)
COMPONENTS: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
    "lycoris_": "model",
}


def component_of(name: str) -> tuple[str, str]:
    """``(component, module path with '_' for '.')`` of a canonical module name.

    >>> component_of("lora_te2_text_model_encoder_layers_0_mlp_fc1")
    ('text_encoder_2', 'text_model_encoder_layers_0_mlp_fc1')
    """
    for prefix, component in COMPONENTS.items():
        if name.startswith(prefix):
            return component, name[len(prefix) :]
    raise AdapterFormatError(f"module {name!r}: not a kohya/LyCORIS module name (expected one of the prefixes {', '.join(COMPONENTS)})")


@dataclass(frozen=True)
class DiffusionModule:
    """One adapted module of a diffusion OFT file, as stored."""

    name: str  #: canonical name (see the module docstring)
    key: str  #: key of the stored OFT parameter
    stages: int  #: BOFT butterfly stages; 1 for block-diagonal OFT
    num_blocks: int
    block_size: int
    alpha: float | None = None  #: the stored ``alpha`` (None: the format has none)
    constraint: float | None = None  #: bound the tool clamps ``||Q||_F`` of the whole module to (None: no clamp)
    rescale_key: str | None = None  #: LyCORIS ``rescale``: per-output-row scale after the rotation
    alpha_key: str | None = None
    #: format-specific facts a writer or reader needs back (e.g. OneTrainer's ``scaled`` marker)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> int:
        """Width of the rotated axis (output rows for LyCORIS/kohya, input columns for OneTrainer)."""
        return self.num_blocks * self.block_size

    @property
    def grid_block(self) -> int:
        """Block size of the rotation the module applies: BOFT's ``m`` stages mix ``2^(m-1) b`` rows."""
        return self.block_size * 2 ** (self.stages - 1)

    def spec(self, side: Literal["input", "output"]) -> ModuleSpec:
        """The module as the merge and fold kernels describe a PEFT module (block-diagonal, one rotation)."""
        b = self.grid_block
        return ModuleSpec(name=self.name, kind="linear", side=side, block_size=b, rows=self.features // b, shared=False, features=self.features, key=self.key)


@dataclass(frozen=True)
class MergedModule:
    """One module of a result to write: the effective generator in oftmerge's convention, and its rescale."""

    name: str
    generator: torch.Tensor  #: (blocks, b, b) float64
    rescale: torch.Tensor | None = None  #: (features,) float64
    rescale_shape: tuple[int, ...] | None = None  #: how the format stores it, e.g. (out, 1, 1, 1) for a Conv2d


class DiffusionFormat(Protocol):
    """What a diffusion format module provides."""

    name: str
    side: Literal["input", "output"]

    def detect(self, keys: Sequence[str]) -> bool: ...

    def read(self, path: Path, source: TensorFile | TensorDict, metadata: Mapping[str, str]) -> DiffusionAdapter: ...

    def rotation_map(self) -> RotationMap: ...

    def check_writable(self, modules: Sequence[MergedModule], where: str) -> None:
        """Raise :class:`~oftmerge.errors.OftMergeError` with the reason when the format cannot hold ``modules`` exactly."""

    def write_tensors(self, modules: Sequence[MergedModule], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...


_FORMATS: dict[str, DiffusionFormat] = {}

#: the built-in diffusion formats (CLI choices)
DIFFUSION_FORMATS = ("lycoris", "kohya", "onetrainer")


def register_diffusion_format(fmt: DiffusionFormat) -> DiffusionFormat:
    if fmt.name in _FORMATS:
        raise RuntimeError(f"diffusion format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def diffusion_formats() -> dict[str, DiffusionFormat]:
    """The registered diffusion formats by name."""
    from oftmerge import formats  # noqa: F401  (the package imports the built-in formats, which register themselves)

    return dict(_FORMATS)


def get_diffusion_format(name: str) -> DiffusionFormat:
    fmts = diffusion_formats()
    if name not in fmts:
        raise AdapterFormatError(f"unknown diffusion OFT format {name!r}; choose one of: {', '.join(fmts)}")
    return fmts[name]


def is_diffusion_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a single-file adapter (``.safetensors`` file, not a PEFT adapter directory)."""
    p = Path(path)
    return p.suffix == ".safetensors" and not p.is_dir()


@dataclass(frozen=True)
class DiffusionAdapter:
    """What was read from one diffusion OFT file (frozen; tensors are loaded lazily)."""

    path: Path
    format: str  #: ``lycoris``, ``kohya`` or ``onetrainer``
    algo: str  #: ``diag-oft``, ``boft`` or ``oft``
    side: Literal["input", "output"]
    rotation_map: RotationMap
    modules: Mapping[str, DiffusionModule]
    metadata: Mapping[str, str]
    _source: TensorFile | TensorDict = field(repr=False, compare=False)
    #: format function: the module's stored tensor (float64) -> effective generator ``(grid blocks, B, B)``
    _effective: Callable[[DiffusionModule, torch.Tensor], torch.Tensor] = field(repr=False, compare=False)
    notes: tuple[str, ...] = ()
    #: format function: the stored tensor -> the rotation blocks ``D`` the fold applies, where the format builds
    #: them more directly than ``rotation_map.rotation(generator)`` (BOFT: the product of its stages)
    _rotation: Callable[[DiffusionModule, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def raw(self, name: str) -> torch.Tensor:
        """Module ``name``'s stored OFT parameter in float64, checked finite."""
        mod = self.modules[name]
        t = self._source.get(mod.key).to(torch.float64)
        if not _finite(t):
            raise NumericalError(f"{self.path}: module {name!r} ({mod.key}) contains NaN or Inf values; the file is broken (re-train or re-export it)")
        return t

    def dtype(self, name: str) -> torch.dtype:
        return self._source.dtype(self.modules[name].key)

    def generator(self, name: str) -> torch.Tensor:
        """The effective generator ``(blocks, B, B)`` (float64) of module ``name`` in oftmerge's convention (module docstring)."""
        return self._effective(self.modules[name], self.raw(name))

    def raw_and_generator(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`raw` and :meth:`generator` of module ``name``, the file read once."""
        raw = self.raw(name)
        return raw, self._effective(self.modules[name], raw)

    def fold_rotation(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The rotation blocks ``D`` (float64) to fold into module ``name``'s base ``weight`` (``kernels.fold.fold_rescaled``).

        ``rotation_map.rotation(generator)``, except that a module whose kind the file does not tell
        (``extra["conv"] is None``: OneTrainer's attention ``proj_in`` / ``proj_out``, 1x1 convolutions
        in SD 1.x, Linear elsewhere) takes its sign from the base: negated for a 4-D (Conv2d) weight.
        """
        mod = self.modules[name]
        if self._rotation is not None:
            return self._rotation(mod, self.raw(name))
        q = self.generator(name)
        if conv_by_base(mod, weight):
            q = -q
        return self.rotation_map.rotation(q)

    def rescale(self, name: str) -> torch.Tensor | None:
        """The module's per-output-row scale ``(out,)`` (float64), or None."""
        key = self.modules[name].rescale_key
        if key is None:
            return None
        s = self._source.get(key).to(torch.float64)
        if not _finite(s):
            raise NumericalError(f"{self.path}: {key} contains NaN or Inf values; the file is broken")
        return s.reshape(-1)

    def rescale_shape(self, name: str) -> tuple[int, ...] | None:
        key = self.modules[name].rescale_key
        return None if key is None else tuple(self._source.shape(key))

    def content_hash(self) -> str:
        return content_hash(self._source)

    def describe(self) -> str:
        return f"{self.path} ({self.format} {self.algo})"


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t`` (one min/max pass: cheaper than ``isfinite().all()`` on large tensors)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def conv_by_base(mod: DiffusionModule, weight: torch.Tensor) -> bool:
    """Whether module ``mod``, read in the Linear convention because its kind was unknown, is a Conv2d of this base (its weight is 4-D)."""
    return "conv" in mod.extra and mod.extra["conv"] is None and weight.dim() == 4


def read_diffusion_adapter(path: str | os.PathLike[str], *, format: str | None = None) -> DiffusionAdapter:
    """Read a diffusion OFT file with its detected format (or ``format``)."""
    p = Path(path)
    if p.is_dir():
        raise AdapterFormatError(f"{p}: is a directory; a diffusion OFT adapter is one .safetensors file (a PEFT adapter directory is read as PEFT)")
    if p.suffix != ".safetensors":
        raise AdapterFormatError(f"{p}: diffusion OFT files are read from .safetensors only; convert a .pt/.ckpt file to safetensors first")
    source = TensorFile(p)
    metadata = source.metadata()
    fmt = get_diffusion_format(format) if format is not None else detect_diffusion_format(p, source.keys())
    return fmt.read(p, source, metadata)


def detect_diffusion_format(path: Path, keys: Sequence[str]) -> DiffusionFormat:
    found = [f for f in diffusion_formats().values() if f.detect(keys)]
    if len(found) == 1:
        return found[0]
    if not found:
        sample = ", ".join(list(keys)[:3]) or "no tensors"
        raise AdapterFormatError(
            f"{path}: not a diffusion OFT file oftmerge knows (keys like {sample}); expected LyCORIS/kohya `.oft_blocks`+`.alpha` "
            "or OneTrainer `.oft_R.weight` keys (a LoRA/LoHa file is not OFT); pass --format to force one"
        )
    raise AdapterFormatError(f"{path}: keys of several formats ({', '.join(f.name for f in found)}); pass --format to pick one")


def split_keys(path: Path, keys: Sequence[str], known: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Group ``keys`` by module stem: ``{stem: {role: key}}`` for the suffixes in ``known`` (``suffix -> role``).

    A key with none of the suffixes is refused in one line: LyCORIS's loader silently ignores
    names it does not know, so a file with other tensors is not one oftmerge can merge faithfully.
    """
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        for suffix, role in known.items():
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[role] = key
                break
        else:
            raise AdapterFormatError(
                f"{path}: unknown tensor {key!r} (expected keys ending in {', '.join(known)}); the file mixes another adapter type in, or is not OFT"
            )
    return out


def refuse_unheld(modules: Sequence[MergedModule], where: str, *, prefixes: tuple[str, ...], names: str, tool: str, instead: str) -> None:
    """Refuse, in one line, modules a format cannot hold: a name without one of ``prefixes``, or a rescale vector that is not ones."""
    for m in modules:
        if not m.name.startswith(prefixes):
            raise IncompatibleAdaptersError(f"{where}: module {m.name!r} {names}; {instead}")
        if m.rescale is not None and not bool(torch.all(m.rescale == 1)):
            raise IncompatibleAdaptersError(f"{where}: module {m.name!r} has a rescale vector; {tool} has none ({instead})")


def clamp_factor(norm: float, constraint: float | None) -> float:
    """LyCORIS's clamp: ``Q`` is scaled by ``c / (||Q|| + 1e-8)`` when ``||Q|| + 1e-8 > c`` (and ``c > 0``)."""
    if constraint is None or constraint <= 0:
        return 1.0
    q_norm = norm + 1e-8
    return constraint / q_norm if q_norm > constraint else 1.0


def frobenius(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.reshape(-1)))


def safe_alpha(norm: float) -> float:
    """An ``alpha`` no loader's clamp reaches for a module whose stored generator has ``||Q||_F = norm``.

    LyCORIS, kohya and A1111 clamp ``||Q||`` to ``alpha * out``, ComfyUI to ``alpha`` itself
    (``docs/dev/diffusion_loaders.md``); ``alpha = 0`` turns LyCORIS's clamp off but makes one
    A1111 release clamp every rotation to the identity. ``alpha >= ||Q||`` with a margin of 1e-4
    relative (and 1e-6 absolute, above the loaders' 1e-8) is safe under every rule, in float32.
    """
    alpha = float(torch.tensor(norm * (1 + 1e-4) + 1e-6, dtype=torch.float32))
    while alpha <= norm * (1 + 1e-5) + 1e-7:  # pragma: no cover  (float32 rounded down)
        alpha = math.nextafter(alpha, math.inf)
    return alpha
