"""Read PEFT LoRA adapters as experts: ``W_i = W0 + s B A``, one layer at a time.

:func:`read_lora` returns a :class:`LoraAdapter`, a frozen description of what is
in the adapter; the factors stay on disk and :meth:`LoraAdapter.tensor` forms one
expert weight at a time, the way PEFT's ``merge_and_unload`` would:

================================  ===========================================================
stored                            expert tensor (torch layout of the base weight)
================================  ===========================================================
``lora_A/B.weight``               ``W0 + s B A`` (transposed when ``fan_in_fan_out``; conv:
                                  ``B A`` reshaped to the kernel)
``lora_embedding_A/B``            ``E0 + s (B A)^T``
``lora_magnitude_vector`` (DoRA)  ``(m / ||W0 + s B A||_row) * (W0 + s B A)`` — linear layers
                                  only; DoRA on embeddings and convolutions is refused
``lora_B.bias`` (``lora_bias``)   ``b0 + s b_B``
``base_layer.*``, ``*`` of        the stored tensor replaces the base tensor (``bias="all"``,
``modules_to_save``               ``modules_to_save``, the embedding copies of
                                  ``save_embedding_layers``); a LoRA update applies on top
================================  ===========================================================

with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
``lora_alpha`` follow ``rank_pattern`` / ``alpha_pattern`` with PEFT's own matching rule
(a pattern matches a module whose path ends with it after a dot). LoRA variants that
are not a weight update of this form (aLoRA, Arrow, QALoRA, BD-LoRA, trainable token
indices, ``target_parameters``, ``layer_replication``) are refused with
:class:`UnsupportedLoraError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError
from oftmerge.formats.config_values import config_bool, config_float, config_int
from oftmerge.formats.io import TensorFile, read_json
from oftmerge.formats.peft_oft import KEY_PREFIX

__all__ = ["LoraAdapter", "LoraModule", "UnsupportedLoraError", "is_lora_adapter", "read_lora"]

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_B.bias": ("bias", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
    ".lora_magnitude_vector": ("m", "linear"),
    ".lora_magnitude_vector.weight": ("m", "linear"),
}
#: config keys of LoRA variants that are not ``W0 + s B A``: refused when set.
_UNSUPPORTED = (
    "alora_invocation_tokens",
    "arrow_config",
    "use_qalora",
    "use_bdlora",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
)


class UnsupportedLoraError(AdapterFormatError):
    """A LoRA adapter uses a feature oftmerge cannot turn into an expert weight."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module as stored."""

    name: str  #: module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``
    kind: Literal["linear", "embedding", "conv"]
    rank: int
    alpha: float
    scaling: float  #: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)
    a_key: str
    b_key: str
    fan_in_fan_out: bool = False
    magnitude_key: str | None = None  #: DoRA
    bias_key: str | None = None  #: ``lora_B.bias`` (``lora_bias=True``)


def _patterns(config: Mapping[str, Any], key: str, where: str, check: Callable[[Mapping[str, Any], str], Any]) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern``: an object of module pattern -> value, every value checked by ``check``."""
    table = config.get(key) or {}
    if not isinstance(table, Mapping):
        raise AdapterFormatError(f"{where}: {key} is {table!r}; expected an object of module pattern -> value (e.g. \"{key}\": {{}})")
    return {str(p): check({f"{key}[{p!r}]": v}, f"{key}[{p!r}]") for p, v in table.items()}


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraAdapter:
    """What was read from one LoRA adapter directory (factors are loaded lazily)."""

    path: Path
    weights_path: Path
    config: Mapping[str, Any]
    modules: Mapping[str, LoraModule]  #: by module path
    replaced: Mapping[str, str]  #: base tensor name -> key of a stored full replacement
    _file: TensorFile = field(repr=False, compare=False)

    kind = "lora"

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def changed(self) -> set[str]:
        """Names of the base tensors this adapter changes."""
        out = set(self.replaced)
        for m in self.modules.values():
            out.add(f"{m.name}.weight")
            if m.bias_key is not None:
                out.add(f"{m.name}.bias")
        return out

    def delta(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """``s B A`` of module ``name`` in the layout of its base weight (``shape``), float64."""
        m = self.modules[name]
        a = self._get(m.a_key)
        b = self._get(m.b_key)
        if m.kind == "embedding":  # A (r, num), B (dim, r): delta (num, dim)
            return m.scaling * (b @ a).T
        if m.kind == "conv":
            return m.scaling * (b.reshape(b.shape[0], m.rank) @ a.reshape(m.rank, -1)).reshape(shape)
        d = b @ a
        return m.scaling * (d.T if m.fan_in_fan_out else d)

    def tensor(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The expert's version of base tensor ``name`` (float64); ``base`` is the base tensor."""
        # a stored copy (bias="all", modules_to_save, or the base_layer copy PEFT saves with targeted
        # embeddings) replaces the base tensor; a LoRA update of the same module applies on top of it
        w0 = self._get(self.replaced[name]) if name in self.replaced else base.to(torch.float64)
        module, _, param = name.rpartition(".")
        m = self.modules.get(module)
        if m is None:
            return w0
        if param == "bias":
            return w0 + m.scaling * self._get(m.bias_key) if m.bias_key else w0
        w = w0 + self.delta(module, tuple(base.shape))
        if m.magnitude_key is not None:  # DoRA: rescale each output row to the stored magnitude
            wt = w.T if m.fan_in_fan_out else w
            norm = torch.linalg.vector_norm(wt, dim=1)
            factor = (self._get(m.magnitude_key) / norm).view(-1, 1)
            w = (factor * wt).T if m.fan_in_fan_out else factor * wt
        return w

    def check_base(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise :class:`IncompatibleAdaptersError` unless every factor fits the base model's tensors."""
        for m in self.modules.values():
            key = f"{m.name}.weight"
            if key not in shapes:
                raise IncompatibleAdaptersError(
                    f"{self.path}: LoRA module {m.name!r} has no tensor {key!r} in the base model; the adapter was "
                    f"trained on another model (its config names {self.base_model!r})"
                )
            shape = shapes[key]
            a, b = self._file.shape(m.a_key), self._file.shape(m.b_key)
            want: tuple[int, ...]
            if m.kind == "embedding":
                want = (a[1], b[0])
            elif m.kind == "conv":
                want = (b[0], a[1], *a[2:])
            else:
                want = (b[0], a[1]) if not m.fan_in_fan_out else (a[1], b[0])
            if tuple(shape) != tuple(want):
                raise IncompatibleAdaptersError(
                    f"{self.path}: LoRA module {m.name!r} has factors A {tuple(a)}, B {tuple(b)} for a weight of shape "
                    f"{tuple(want)}, but the base model's {key!r} has shape {tuple(shape)}; the adapter was trained on "
                    f"another model (its config names {self.base_model!r})"
                )
        for name, key in self.replaced.items():
            if name not in shapes:
                raise IncompatibleAdaptersError(f"{self.path}: stored tensor {key!r} replaces {name!r}, which the base model does not have")
            if tuple(shapes[name]) != self._file.shape(key):
                raise IncompatibleAdaptersError(
                    f"{self.path}: stored tensor {key!r} has shape {self._file.shape(key)}, the base model's {name!r} "
                    f"has shape {tuple(shapes[name])}"
                )

    def _get(self, key: str) -> torch.Tensor:
        t = self._file.get(key).to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{self.weights_path}: tensor {key!r} contains NaN or Inf values; the adapter is broken")
        return t


def is_lora_adapter(path: str | Path) -> bool:
    """True when ``path`` holds an ``adapter_config.json`` whose ``peft_type`` is LORA."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return False
    return str(read_json(cfg).get("peft_type", "")).upper() == "LORA"


def _classify(key: str) -> tuple[str, str, str]:
    """``(module, role, kind)`` of a stored key; role ``A``, ``B``, ``bias``, ``m``, ``replace`` or ``ignore``."""
    body = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for suffix, (role, kind) in _FACTOR_SUFFIXES.items():
        if body.endswith(suffix):
            return body[: -len(suffix)], role, kind
    for marker, role in ((".base_layer.", "replace"), (".modules_to_save.", "replace"), (".original_module.", "ignore")):
        if marker in body:
            module, _, param = body.partition(marker)
            return f"{module}.{param}", role, ""
    return body, "replace", ""


def read_lora(path: str | Path) -> LoraAdapter:
    """Read the config and tensor layout of a PEFT LoRA adapter directory (no factors are loaded)."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: no adapter_config.json; point oftmerge at the directory `save_pretrained` wrote")
    config = read_json(cfg_path)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterFormatError(f"{path}: peft_type is {config.get('peft_type')!r}, not LORA")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise UnsupportedLoraError(
                f"{path}: the adapter uses {key}={config[key]!r}, a LoRA variant that is not a plain weight update "
                "W0 + s B A; merge it with PEFT first (merge_and_unload) and pass the full model instead"
            )
    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise AdapterFormatError(f"{path}: no adapter weights found (looked for {', '.join(_WEIGHT_FILES)})")
    tf = TensorFile(weights)
    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    replaced: dict[str, str] = {}
    for key in tf.keys():
        module, role, kind = _classify(key)
        if role == "ignore":
            continue
        if role == "replace":
            if module in replaced and ".modules_to_save." not in key:
                continue  # modules_to_save's copy wins over the wrapper's duplicate
            replaced[module] = key
            continue
        parts.setdefault(module, {})[role] = key
        if kind == "embedding":
            kinds[module] = "embedding"
    where = str(cfg_path)
    use_rslora = config_bool(config, "use_rslora", False, where=where)
    fifo = config_bool(config, "fan_in_fan_out", False, where=where)
    rank_pattern = _patterns(config, "rank_pattern", where, lambda table, key: config_int(table, key, 8, where=where, minimum=1))
    alpha_pattern = _patterns(config, "alpha_pattern", where, lambda table, key: config_float(table, key, 8.0, where=where, example="16"))
    config_int(config, "r", 8, where=where, minimum=1)
    config_float(config, "lora_alpha", 8.0, where=where, example="16")
    modules: dict[str, LoraModule] = {}
    for name, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise AdapterFormatError(f"{weights}: module {name!r} has {sorted(p)} but not both LoRA factors A and B")
        a_shape = tf.shape(p["A"])
        kind = kinds.get(name, "conv" if len(a_shape) > 2 else "linear")
        rank = a_shape[0]
        r_cfg = int(_pattern_value(rank_pattern, name, config_int(config, "r", rank, where=where, minimum=1)))
        if r_cfg != rank:
            raise AdapterFormatError(
                f"{weights}: module {name!r} stores rank-{rank} factors but the config says r={r_cfg}; the config does "
                "not belong to these weights"
            )
        alpha = float(_pattern_value(alpha_pattern, name, config_float(config, "lora_alpha", 8.0, where=where)))
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if "m" in p and kind != "linear":
            raise UnsupportedLoraError(
                f"{path}: module {name!r} is a DoRA {kind}; oftmerge forms DoRA experts for linear layers only. "
                "Merge the adapter with PEFT (merge_and_unload) and pass the full model instead"
            )
        if kind == "conv" and any(d != 1 for d in tf.shape(p["B"])[2:]):
            raise UnsupportedLoraError(f"{path}: module {name!r}: a LoRA B factor with a kernel larger than 1 is not supported")
        modules[name] = LoraModule(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            rank=rank,
            alpha=alpha,
            scaling=scaling,
            a_key=p["A"],
            b_key=p["B"],
            fan_in_fan_out=fifo and kind == "linear",
            magnitude_key=p.get("m"),
            bias_key=p.get("bias"),
        )
    return LoraAdapter(path, weights, config, modules, replaced, tf)
