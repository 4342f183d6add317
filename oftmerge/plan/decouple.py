"""Planning a decoupled merge: the experts (LoRA adapters or full finetunes), their order, each tensor's path.

:func:`plan_decouple` reads the base's headers and every expert's config and headers, checks that
each expert is a finetune of the base, puts the experts in a canonical order (by the SHA-256 of
their weight files, so the order they are given in changes no byte of the output) and decides
for every tensor some expert changes whether it is decoupled (a 2-D weight) or merged by the
Euclidean method alone (embeddings, tensors that are not 2-D, ``euclidean_only`` patterns, or
every tensor when no orthogonal method is asked for). :mod:`oftmerge.ops.decouple` runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oftmerge.errors import IncompatibleAdaptersError, NumericalError, OftMergeError
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.io import read_json, sha256_file
from oftmerge.formats.lora import LoraAdapter, is_lora_adapter, read_lora
from oftmerge.formats.sources import resolve_source, source_record
from oftmerge.methods.decoupling import Settings

__all__ = ["EMBEDDING_PATTERN", "DecouplePlan", "Expert", "plan_decouple"]

#: tensors treated as embeddings (Euclidean only), by name.
EMBEDDING_PATTERN = (
    r"(^|\.)(embed_tokens|embed_positions|embeddings?|wte|wpe|word_embeddings|position_embeddings"
    r"|token_type_embeddings|tok_embeddings|shared)\.weight$"
)


@dataclass(frozen=True)
class Expert:
    """One input: a PEFT LoRA adapter (kept factored) or a full finetuned checkpoint."""

    path: Path
    kind: str  #: "lora" or "full"
    sha256: str
    lora: LoraAdapter | None = None
    checkpoint: Checkpoint | None = None
    changes: frozenset[str] | None = None  #: base tensors a LoRA expert changes (None: any)
    hub: Mapping[str, Any] | None = None  #: for a Hub expert: ``repo_id``, ``revision`` asked for, ``commit``

    def may_change(self, name: str) -> bool:
        return self.changes is None or name in self.changes

    def tensor(self, name: str, base: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.lora is not None:
            return self.lora.tensor(name, base).to(dtype)
        assert self.checkpoint is not None
        t = self.checkpoint.read(name).to(dtype)
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{self.path}: tensor {name!r} contains NaN or Inf values; the checkpoint is broken")
        return t

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": str(self.path), "kind": self.kind, "sha256": self.sha256}
        if self.hub:
            d["hub"] = dict(self.hub)
        if self.lora is not None:
            c = self.lora.config
            d["lora"] = {
                "r": c.get("r"),
                "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")),
                "use_dora": bool(c.get("use_dora")),
                "modules": len(self.lora.modules),
                "base_model_name_or_path": self.lora.base_model,
            }
        return d


def _fingerprint(files: Sequence[Path]) -> str:
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def _load_expert(path: str | os.PathLike[str], base: Checkpoint, shapes: Mapping[str, tuple[int, ...]]) -> Expert:
    p = Path(path)
    if not p.is_dir():
        raise OftMergeError(f"{p}: expert not found (give a PEFT LoRA adapter directory or a model directory)")
    if (p / "adapter_config.json").is_file():
        if not is_lora_adapter(p):
            kind = read_json(p / "adapter_config.json").get("peft_type")
            hint = " (OFT adapters: `oftmerge merge`, or `oftmerge fold` then pass the folded model)" if kind == "OFT" else ""
            raise IncompatibleAdaptersError(f"{p}: a {kind} adapter; decouple takes LoRA adapters or full models{hint}")
        lora = read_lora(p)
        lora.check_base(shapes)
        return Expert(p, "lora", _fingerprint([lora.weights_path]), lora=lora, changes=frozenset(lora.changed()))
    ckpt = Checkpoint(p)
    theirs = set(ckpt.keys())
    missing = [k for k in shapes if k not in theirs]
    extra = sorted(theirs - set(shapes))
    if missing or extra:
        detail = (f"missing {len(missing)} of the base's tensors (e.g. {missing[0]!r})" if missing else "") + (
            ("; " if missing else "") + f"{len(extra)} tensors the base does not have (e.g. {extra[0]!r})" if extra else ""
        )
        raise IncompatibleAdaptersError(
            f"{p}: not the architecture of the base model {base.path}: {detail}. Full experts must be finetunes of "
            "that base saved with save_pretrained"
        )
    for k, shape in shapes.items():
        if tuple(ckpt.shape(k)) != tuple(shape):
            raise IncompatibleAdaptersError(
                f"{p}: tensor {k!r} has shape {tuple(ckpt.shape(k))}, the base model's has {tuple(shape)}; not a finetune of {base.path}"
            )
    return Expert(p, "full", _fingerprint([p / s for s in ckpt.shards]), checkpoint=ckpt)


@dataclass(frozen=True)
class DecouplePlan:
    """Everything a decoupled merge will do, from the inputs' configs and headers alone."""

    config: Any  #: the :class:`~oftmerge.config.DecoupleConfig`
    settings: Settings
    base: Path
    checkpoint: Checkpoint
    experts: tuple[Expert, ...]  #: canonical order
    weights: tuple[float, ...]  #: canonical order
    tensors: Mapping[str, str]  #: tensor -> "decouple" or "euclidean" (tensors some expert changes), file order
    transposed: frozenset[str]  #: tensors LoRA stores transposed (``fan_in_fan_out``)
    base_hub: Mapping[str, Any] | None = None  #: for a Hub base: ``repo_id``, ``revision`` asked for, ``commit``

    @property
    def inputs(self) -> tuple[tuple[str, str], ...]:
        """What the output must not replace (``(role, path)``): the base and every expert (LoRA adapter or full model)."""
        return (("the base model", str(self.base)), *(("expert", str(e.path)) for e in self.experts))

    def cost(self, name: str, shape: tuple[int, ...]) -> float:
        """Rough work of one tensor, to balance processes: its entries, and for a decoupled one its solves."""
        numel = math.prod(shape)
        if self.tensors.get(name) != "decouple":
            return float(numel)
        width = min(shape[1], 2 * shape[0])  # the Procrustes size (row space for wide layers)
        return float(len(self.experts) * (numel * shape[1] + 20 * width**3))


def plan_decouple(config: Any) -> DecouplePlan:
    """Read the base and the experts of ``config`` (a :class:`~oftmerge.config.DecoupleConfig`) and plan the merge."""
    settings = config.settings()
    base = resolve_source(config.base, "base model")
    base_ckpt = Checkpoint(base.path)
    shapes = base_ckpt.shapes()
    loaded = []
    for e in config.experts:
        src = resolve_source(e, "expert")
        loaded.append(dataclasses.replace(_load_expert(src.path, base_ckpt, shapes), hub=source_record(src)))
    ws = [1.0] * len(loaded) if config.weights is None else list(config.weights)
    order = sorted(range(len(loaded)), key=lambda i: (loaded[i].sha256, str(loaded[i].path), ws[i]))
    loaded, ws = [loaded[i] for i in order], [ws[i] for i in order]
    transposed = {f"{m.name}.weight" for e in loaded if e.lora for m in e.lora.modules.values() if m.fan_in_fan_out}
    lora_embeddings = {f"{m.name}.weight" for e in loaded if e.lora for m in e.lora.modules.values() if m.kind == "embedding"}
    only = re.compile("|".join(f"(?:{p})" for p in (EMBEDDING_PATTERN, *settings.euclidean_only)))
    tensors: dict[str, str] = {}
    for name in base_ckpt.keys_in_file_order():
        if not any(e.may_change(name) for e in loaded):
            continue
        flat = len(shapes[name]) != 2 or name in lora_embeddings or only.search(name) is not None
        tensors[name] = "euclidean" if flat or settings.orthogonal is None else "decouple"
    return DecouplePlan(
        config, settings, base.path, base_ckpt, tuple(loaded), tuple(ws), tensors, frozenset(transposed), source_record(base)
    )
