"""Read OFT adapters written by any PEFT release into one frozen description.

PEFT changed its OFT checkpoint layout twice and its Cayley–Neumann series
once. :func:`read_adapter` detects which release wrote a checkpoint (from the
config's ``peft_version`` when present, else from the tensor layout) and
returns an :class:`OftAdapter`: what was read, per module. Generators are
loaded lazily, one module at a time, with :meth:`OftAdapter.generator`.

===============  ======================================  ================  ========  ==========================
release family   tensor(s) per module                    shape             side      generator Q of a block
===============  ======================================  ================  ========  ==========================
``0.13``         ``<m>.oft_r``                           (r, b, b)         output    0.5 (A - A^T)
``0.15``         ``<m>.oft_r``, ``<m>.oft_s``            (r, b, b), (o,1)  input     0.5 (A - A^T), rows scaled
``0.16``         ``<m>.oft_R.weight``                    (r, b(b-1)/2)     input     U - U^T
``0.18``         as 0.16, + ``<m>.oft_embedding_R...``   (r, b(b-1)/2)     input     U - U^T
===============  ======================================  ================  ========  ==========================

``0.13`` stands for 0.7–0.13, ``0.15`` for 0.14–0.15, ``0.16`` for 0.16–0.17
and ``0.18`` for 0.18 and later (the Neumann series changed in 0.18).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.version import InvalidVersion, Version

from oftmerge.errors import AdapterFormatError, IncompatibleAdaptersError, NumericalError
from oftmerge.formats.config_values import config_bool, config_float, config_int, config_path
from oftmerge.formats.io import TensorDict, TensorFile, content_hash, read_json
from oftmerge.linalg import RotationMap, block_size_from_packed, coft_project, skew_from_full, unpack_skew

__all__ = [
    "NEWEST_KNOWN", "RELEASES", "ModuleSpec", "OftAdapter", "adapter_from_tensors", "newer_than_known", "read_adapter",
    "release_family", "in_saved_module", "saved_key", "saved_tensors",
]  # fmt: skip

log = logging.getLogger(__name__)

Release = Literal["0.13", "0.15", "0.16", "0.18"]
#: Release families, oldest first, with the PEFT versions each covers.
RELEASES: dict[str, str] = {"0.13": "0.7-0.13", "0.15": "0.14-0.15", "0.16": "0.16-0.17", "0.18": "0.18+"}

KEY_PREFIX = "base_model.model."
_SUFFIXES = {
    ".oft_R.weight": ("packed", "linear"),
    ".oft_embedding_R.weight": ("packed", "embedding"),
    ".oft_r": ("full", "linear"),
}
_SCALE_SUFFIX = ".oft_s"
_BASE_COPY_SUFFIX = ".base_layer.weight"
_BIAS_COPY_SUFFIX = ".base_layer.bias"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def release_family(version: str) -> Release:
    """Map a PEFT version string (``"0.17.1"``, ``"0.18.0@abc"``) to its release family."""
    try:
        v = Version(version.partition("@")[0])
    except InvalidVersion:
        raise AdapterFormatError(f"cannot parse PEFT version {version!r}") from None
    if v < Version("0.14.0"):
        return "0.13"
    if v < Version("0.16.0"):
        return "0.15"
    if v < Version("0.18.0"):
        return "0.16"
    return "0.18"


#: the newest PEFT minor release whose OFT checkpoints oftmerge was checked against (the ``peft`` extra allows < 0.22)
NEWEST_KNOWN = (0, 21)


def newer_than_known(version: str) -> bool:
    """Whether PEFT ``version`` is a minor release after :data:`NEWEST_KNOWN` (read as 0.18+, with a warning)."""
    try:
        return Version(version.partition("@")[0]).release[:2] > NEWEST_KNOWN
    except InvalidVersion:
        return False


def _version_note(path: Path, version: str | None) -> str | None:
    """The warning for an adapter written by a PEFT release newer than any oftmerge knows (None otherwise)."""
    if version is None or version in RELEASES or not newer_than_known(str(version)):
        return None
    known = ".".join(map(str, NEWEST_KNOWN))
    return (
        f"{path}: written by PEFT {version}, newer than the newest release oftmerge knows ({known}.x): it is read as "
        "PEFT 0.18+ (packed oft_R, the 0.18 Cayley-Neumann series); if that release changed the OFT layout or series, "
        "results are wrong: please report it (and check the result against PEFT's own merge_and_unload)"
    )


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module as stored: where its tensors are and how to read them."""

    name: str  #: module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``
    kind: Literal["linear", "embedding"]  #: ``linear`` also covers Conv2d (flattened kernel)
    side: Literal["input", "output"]  #: which axis of the weight is rotated
    block_size: int
    rows: int  #: stored blocks (1 with block_share)
    shared: bool
    features: int | None  #: width of the rotated axis; None when unknown (block_share, no base)
    key: str
    scale_key: str | None = None  #: PEFT 0.14-0.15 ``oft_s``
    out_features: int | None = None
    coft_radius: float | None = None  #: COFT projection radius, None when COFT is off

    @property
    def num_blocks(self) -> int | None:
        """Number of diagonal blocks in the module's rotation (None when unknown)."""
        if not self.shared:
            return self.rows
        return None if self.features is None else self.features // self.block_size


@dataclass(frozen=True)
class OftAdapter:
    """What was read from one adapter directory (frozen; tensors are loaded lazily)."""

    path: Path
    weights_path: Path
    release: Release
    release_source: str  #: how the release was decided, for messages and reports
    peft_version: str | None
    rotation_map: RotationMap
    config: Mapping[str, Any]
    modules: Mapping[str, ModuleSpec]
    _file: TensorFile | TensorDict = field(repr=False, compare=False)
    #: module -> key of a copy of its base weight that PEFT saved with the adapter
    #: (``save_embedding_layers``, automatic when an embedding is targeted)
    saved_base: Mapping[str, str] = field(default_factory=dict)
    #: module -> key of a copy of its base weight, for modules this adapter does *not* adapt: PEFT's
    #: ``save_embedding_layers="auto"`` saves a copy of every input/output embedding a tuner wraps,
    #: also one that another adapter of the same model wraps. They are never written out; a merge only
    #: checks that its inputs' copies of a module it merges agree (see :mod:`oftmerge.ops.merge`)
    base_copies: Mapping[str, str] = field(default_factory=dict)

    #: model tensor name (``classifier.weight``, ``encoder.layer.0.query.bias``) -> stored key, for the
    #: non-OFT tensors PEFT saved with the adapter (``modules_to_save``, trained biases); on load they
    #: replace the base model's tensors of that name (see :func:`saved_tensors`)
    saved: Mapping[str, str] = field(default_factory=dict)
    #: warnings about how the adapter was read (a PEFT release newer than oftmerge knows); reports carry them
    notes: tuple[str, ...] = ()

    def saved_base_weight(self, name: str) -> torch.Tensor:
        """The copy of module ``name``'s base weight PEFT saved with the adapter (of :attr:`saved_base` or :attr:`base_copies`)."""
        return self._file.get(self.saved_base[name] if name in self.saved_base else self.base_copies[name])

    def saved_tensor(self, name: str) -> torch.Tensor:
        """Saved tensor ``name`` (a model tensor name, a key of :attr:`saved`) as stored, checked finite."""
        t = self._file.get(self.saved[name])
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{self.weights_path}: saved tensor {self.saved[name]} contains NaN or Inf values; the adapter is broken")
        return t

    def saved_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.shape(self.saved[name]))

    def saved_dtype(self, name: str) -> torch.dtype:
        return self._file.dtype(self.saved[name])

    def content_hash(self) -> str:
        """SHA-256 of the stored tensors (names, dtypes, shapes, bytes), whatever file they came from."""
        return content_hash(self._file)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def side(self) -> str:
        return "output" if self.release == "0.13" else "input"

    def _raw(self, name: str, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
        spec = self.modules[name]
        raw = self._file.get(spec.key)
        raw = raw if dtype is None else raw.to(dtype)
        if not bool(torch.isfinite(raw).all()):
            raise NumericalError(
                f"{self.weights_path}: module {name!r} ({spec.key}) contains NaN or Inf values; "
                "the adapter is broken (re-train or re-export it)"
            )
        return raw

    def is_packed(self, name: str) -> bool:
        """Whether module ``name``'s stored tensor is already its effective generator, packed.

        PEFT >= 0.16 stores each block's strict upper triangle ``(rows, b(b-1)/2)``; without COFT
        that vector *is* the generator (:func:`oftmerge.linalg.unpack_skew` makes the blocks).
        """
        spec = self.modules[name]
        return spec.side == "input" and self.release in ("0.16", "0.18") and spec.coft_radius is None

    def stores_packed(self, name: str) -> bool:
        """Whether module ``name`` is stored as packed upper triangles (PEFT >= 0.16), COFT or not."""
        return self.modules[name].side == "input" and self.release in ("0.16", "0.18")

    def packed_generator(self, name: str) -> torch.Tensor:
        """The stored upper triangles ``(rows, b(b-1)/2)`` of a packed module (:meth:`stores_packed`), checked finite.

        In the stored dtype: the caller converts it once, into its own buffer. With COFT this is
        the tensor *before* COFT's projection (:meth:`is_packed` says whether it is the effective generator).
        """
        if not self.stores_packed(name):
            raise ValueError(f"module {name!r} of {self.path} is not stored as a packed generator")
        return self._raw(name, dtype=None)

    def generator(self, name: str) -> torch.Tensor:
        """The effective skew generator blocks ``(rows, b, b)`` of module ``name``, float64.

        Effective means what PEFT turns into a rotation: COFT's projection is
        applied, and the stored sign is kept (``rotation_map.sign`` tells the
        sign of the ideal rotation).
        """
        spec = self.modules[name]
        raw = self._raw(name)
        if spec.side == "input" and self.release in ("0.16", "0.18"):
            q = unpack_skew(raw)
            if spec.coft_radius is not None:
                q = coft_project(q, spec.coft_radius)
            return q
        if spec.coft_radius is not None:  # PEFT <= 0.15 projects the raw matrix, then skews it
            raw = coft_project(raw, spec.coft_radius)
        return skew_from_full(raw)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of module ``name``'s generator tensor."""
        return self._file.dtype(self.modules[name].key)

    def scale(self, name: str) -> torch.Tensor | None:
        """PEFT 0.14–0.15's per-output-row scale ``oft_s`` ``(out, 1)``, float64, or None."""
        spec = self.modules[name]
        if spec.scale_key is None:
            return None
        s = self._file.get(spec.scale_key).to(torch.float64)
        if not bool(torch.isfinite(s).all()):
            raise NumericalError(f"{self.weights_path}: {spec.scale_key} contains NaN or Inf values")
        return s

    def has_nontrivial_scale(self) -> bool:
        return any(
            (s := self.scale(n)) is not None and not bool((s == 1).all()) for n in self.modules
        )


def _find_weights(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise AdapterFormatError(
        f"{path}: no adapter weights found (looked for {', '.join(WEIGHT_FILES)}). "
        "Point oftmerge at the directory that `save_pretrained` wrote."
    )


def _module_name(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    return name[len(KEY_PREFIX) :] if name.startswith(KEY_PREFIX) else name


def _decide_release(
    path: Path, config: Mapping[str, Any], layouts: set[str], override: str | None
) -> tuple[Release, str, str | None]:
    recorded = config.get("peft_version")
    if override is not None:
        family = release_family(override) if override not in RELEASES else override
        return family, f"given by the caller ({override})", recorded  # type: ignore[return-value]
    if recorded:
        family = release_family(str(recorded))
        return family, f"peft_version {recorded} in adapter_config.json", str(recorded)
    if "packed" in layouts:
        log.info(
            "%s: adapter_config.json records no peft_version: assuming PEFT 0.16-0.17 "
            "(peft_version is recorded since 0.18); pass peft_release to override",
            path,
        )
        return "0.16", "packed oft_R layout without peft_version (assumed PEFT 0.16-0.17)", None
    if "scale" in layouts:
        return "0.15", "oft_r with oft_s (PEFT 0.14-0.15 layout)", None
    if "oft_block_size" in config:
        return "0.15", "oft_r with oft_block_size in the config (PEFT 0.14-0.15 layout)", None
    return "0.13", "oft_r without oft_s nor oft_block_size (PEFT 0.7-0.13 layout)", None


def _rotation_map(config: Mapping[str, Any], release: Release, where: str) -> RotationMap:
    if release == "0.13" or release == "0.15":  # (== narrows the Literal for mypy; `in` does not)
        return RotationMap("exact")
    if config_bool(config, "use_cayley_neumann", True, where=where):  # default True since 0.16 (whatever the docstring says)
        return RotationMap("neumann", config_int(config, "num_cayley_neumann_terms", 5, where=where, minimum=1), release)
    return RotationMap("exact")


def _check_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse OFT settings of the wrong type or range before anything reads them (one line: file, key, value).

    Types are checked whether or not the setting is in use; ranges where it is: ``eps > 0`` with
    COFT, ``num_cayley_neumann_terms >= 1`` with the Cayley-Neumann series.
    """
    config_int(config, "r", 0, where=where, example="8")
    config_int(config, "oft_block_size", 0, where=where, example="32")
    config_bool(config, "block_share", False, where=where)
    coft = config_bool(config, "coft", False, where=where)
    config_float(config, "eps", 6e-5, where=where, positive=coft)
    neumann = config_bool(config, "use_cayley_neumann", True, where=where)
    config_int(config, "num_cayley_neumann_terms", 5, where=where, minimum=1 if neumann else 0)


def _coft_radius(
    config: Mapping[str, Any], release: Release, rows: int, block: int, features: int | None, out: int | None, where: str
) -> float | None:
    """The norm bound COFT enforces on each block, as each release computes it."""
    if not config_bool(config, "coft", False, where=where):
        return None
    eps = config_float(config, "eps", 6e-5, where=where, positive=True)
    if release == "0.13":
        eps = eps * block * block  # eps * ceil(out / r)^2, and b = ceil(out / r) there
    elif release == "0.15":
        if out is None or features is None:
            return math.nan
        r = features // block
        eps = eps * math.ceil(out / r) ** 2
    return eps / math.sqrt(rows)


def read_adapter(
    path: str | os.PathLike[str],
    *,
    peft_release: str | None = None,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> OftAdapter:
    """Read the OFT adapter in directory ``path`` (as written by PEFT's ``save_pretrained``).

    ``peft_release`` overrides the detected release (a version such as
    ``"0.17.1"`` or a family name ``"0.16"``); it matters for checkpoints with
    the packed layout that record no ``peft_version``, which are assumed to
    come from PEFT 0.16–0.17. ``base_shapes`` maps base weight names
    (``model.layers.0.mlp.up_proj.weight``) to shapes and lets the reader know
    the width of ``block_share`` modules and check the adapter fits the base.
    """
    path = Path(path)
    if not path.is_dir():
        if path.name in WEIGHT_FILES or path.name == "adapter_config.json":
            path = path.parent
        else:
            raise AdapterFormatError(f"{path}: not a directory; pass the adapter directory that save_pretrained wrote")
    config = read_json(path / "adapter_config.json")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "OFT":
        hint = ""
        if peft_type in ("LORA", "ADALORA", "LOHA", "LOKR"):
            hint = " For LoRA experts use the orthogonal-residual decoupling path (`oftmerge decouple`)."
        elif peft_type == "BOFT":
            hint = " BOFT (butterfly OFT) is not supported yet."
        raise AdapterFormatError(
            f"{path / 'adapter_config.json'}: peft_type is {config.get('peft_type')!r}, not 'OFT'.{hint}"
        )
    weights_path = _find_weights(path)
    return adapter_from_tensors(path, config, TensorFile(weights_path), peft_release=peft_release, base_shapes=base_shapes)


def in_saved_module(name: str, modules_to_save: Sequence[str]) -> bool:
    """Whether tensor ``name`` belongs to a module PEFT wraps for ``modules_to_save`` (PEFT matches by suffix)."""
    parts = name.split(".")
    return any(".".join(parts[:k]).endswith(entry) for k in range(1, len(parts)) for entry in modules_to_save)


def saved_tensors(keys: Sequence[str], oft_modules: set[str], config: Mapping[str, Any], where: Path) -> dict[str, str]:
    """Model tensor name -> stored key, for the non-OFT tensors of an adapter file; refuse what PEFT would not load.

    PEFT loads every such tensor into the base model's tensor of the same name (``strict=False``),
    so after ``merge_and_unload`` it replaces the base's:

    * ``<m>.base_layer.bias`` of an OFT module ``m`` and ``<name>.bias`` elsewhere (``bias="oft_only"`` /
      ``"all"``) stand for the bias ``<m>.bias`` / ``<name>.bias``;
    * tensors of the modules in ``modules_to_save`` (every ``SEQ_CLS`` adapter's head) stand for
      that module's tensors.

    With ``bias="all"`` PEFT also writes ``<head>.original_module.*`` (the base's untrained copy) and
    ``<head>.modules_to_save.*`` (a duplicate of ``<head>.*``); PEFT's loader ignores both, and so
    does oftmerge. Anything else (e.g. ``trainable_token_indices`` deltas) is refused.
    """
    modules_to_save = [str(m) for m in (config.get("modules_to_save") or [])]
    saved: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    refused: list[str] = []
    for key in keys:
        name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        if ".original_module." in name:
            continue
        if ".modules_to_save." in name:
            duplicates[name.replace(".modules_to_save.", ".", 1)] = key
            continue
        if name.endswith(_BIAS_COPY_SUFFIX) and name[: -len(_BIAS_COPY_SUFFIX)] in oft_modules:
            saved[name[: -len(_BIAS_COPY_SUFFIX)] + ".bias"] = key
        elif name.endswith(".bias") or in_saved_module(name, modules_to_save):
            saved[name] = key
        else:
            refused.append(key)
    for name, key in duplicates.items():
        saved.setdefault(name, key)
    if refused:
        raise AdapterFormatError(
            f"{where}: holds tensors that are neither OFT rotations, trained biases, nor modules_to_save modules "
            f"({', '.join(refused[:3])}{', ...' if len(refused) > 3 else ''}); oftmerge cannot tell what PEFT makes "
            "of them. Remove them from the adapter, or list their module in modules_to_save in adapter_config.json."
        )
    return dict(sorted(saved.items()))


def saved_key(name: str, oft_modules: set[str] | Mapping[str, Any]) -> str:
    """The key PEFT stores saved tensor ``name`` under (the inverse of :func:`saved_tensors`)."""
    if name.endswith(".bias") and name[: -len(".bias")] in oft_modules:
        return KEY_PREFIX + name[: -len(".bias")] + _BIAS_COPY_SUFFIX
    return KEY_PREFIX + name


def adapter_from_tensors(
    path: Path,
    config: Mapping[str, Any],
    tf: TensorFile | TensorDict,
    *,
    peft_release: str | None = None,
    base_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> OftAdapter:
    """Build an :class:`OftAdapter` from a config dict and tensors keyed as PEFT saves them."""
    weights_path = tf.path
    where = config_path(path)
    _check_config(config, where)
    _refuse_prefix_duplicates(tf.keys(), weights_path)
    found: dict[str, tuple[str, str, str]] = {}
    scales: dict[str, str] = {}
    extra: list[str] = []
    for key in tf.keys():
        if key.endswith(_SCALE_SUFFIX):
            scales[_module_name(key, _SCALE_SUFFIX)] = key
            continue
        for suffix, (layout, kind) in _SUFFIXES.items():
            if key.endswith(suffix):
                found[_module_name(key, suffix)] = (key, layout, kind)
                break
        else:
            extra.append(key)
    saved_base: dict[str, str] = {}
    base_copies: dict[str, str] = {}
    for key in list(extra):  # PEFT saves base copies of the embeddings tuners wrap (save_embedding_layers)
        name = _module_name(key, _BASE_COPY_SUFFIX) if key.endswith(_BASE_COPY_SUFFIX) else None
        if name is None:
            continue
        if name in found:
            saved_base[name] = key
        else:  # wrapped by another adapter of the model: a copy of the base weight, not part of this adapter
            _check_base_copy(tf, weights_path, name, key, base_shapes)
            base_copies[name] = key
        extra.remove(key)
    saved = saved_tensors(extra, set(found), config, weights_path)
    if not found:
        raise AdapterFormatError(f"{weights_path}: no OFT tensors (oft_R / oft_r) found; is this an OFT adapter?")
    layouts = {layout for _, layout, _ in found.values()}
    if scales:
        layouts.add("scale")
    if len(layouts - {"scale"}) > 1:
        raise AdapterFormatError(f"{weights_path}: mixes packed (oft_R) and full (oft_r) OFT tensors")
    _refuse_non_float(tf, weights_path, [key for key, _, _ in found.values()] + list(scales.values()))
    release, source, recorded = _decide_release(path, config, layouts, peft_release)
    note = _version_note(path, peft_release if peft_release is not None else recorded)
    if note is not None:
        log.info(note)  # a warning in the report of the command that reads it (merge, fold, inspect)
    packed = "packed" in layouts
    if packed != (release in ("0.16", "0.18")):
        raise AdapterFormatError(
            f"{weights_path}: tensor layout ({'packed oft_R' if packed else 'full oft_r'}) does not match the "
            f"release decided from {source}; fix peft_version in adapter_config.json or pass peft_release"
        )
    rmap = _rotation_map(config, release, where)
    modules = {
        name: _module_spec(tf, weights_path, config, name, key, layout, kind, release, scales.get(name), base_shapes, where)
        for name, (key, layout, kind) in sorted(found.items())
    }
    stray = sorted(set(scales) - set(found))
    if stray:
        raise AdapterFormatError(f"{weights_path}: oft_s without oft_r for module(s) {', '.join(stray)}")
    return OftAdapter(
        path=path,
        weights_path=weights_path,
        release=release,
        release_source=source,
        peft_version=recorded,
        rotation_map=rmap,
        config=dict(config),
        modules=modules,
        _file=tf,
        saved_base=saved_base,
        base_copies=base_copies,
        saved=saved,
        notes=() if note is None else (note,),
    )


def _refuse_prefix_duplicates(keys: Sequence[str], weights_path: Path) -> None:
    """Refuse a file that stores one tensor twice, with and without PEFT's ``base_model.model.`` prefix.

    Both name the same model tensor; which of the two PEFT loads depends on its loader, so keeping
    either one silently could merge another adapter than the one PEFT applies.
    """
    bare: dict[str, str] = {}
    for key in keys:
        name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        if name in bare:
            raise AdapterFormatError(
                f"{weights_path}: stores {bare[name]!r} and {key!r}, the same tensor with and without the {KEY_PREFIX!r} "
                "prefix, possibly with different values; remove one of them (PEFT saves keys with the prefix)"
            )
        bare[name] = key


def _refuse_non_float(tf: TensorFile | TensorDict, weights_path: Path, keys: Sequence[str]) -> None:
    """Refuse OFT tensors that are not floating point (int8, bool, ...): casting them would invent a generator."""
    for key in keys:
        dtype = tf.dtype(key)
        if not dtype.is_floating_point:
            raise AdapterFormatError(
                f"{weights_path}: {key} is stored as {str(dtype).removeprefix('torch.')}; OFT generators are floating point "
                "(float32, bfloat16, float16, float64). A quantised or corrupted adapter cannot be merged or folded; "
                "re-export it from the trained model"
            )


def _check_base_copy(
    tf: TensorFile | TensorDict, weights_path: Path, name: str, key: str, base_shapes: Mapping[str, tuple[int, ...]] | None
) -> None:
    """Refuse a copy of a base weight whose shape is not the base's: the adapter was trained on a resized vocabulary."""
    wkey = f"{name}.weight"
    if base_shapes is None or wkey not in base_shapes:
        return
    shape, base = tuple(tf.shape(key)), tuple(base_shapes[wkey])
    if shape != base:
        raise IncompatibleAdaptersError(
            f"{weights_path}: {key} is PEFT's copy of base weight {wkey} with shape {shape}, but the base model stores "
            f"{wkey} with shape {base}; the adapter was trained on another base model (a resized vocabulary?)"
        )


def _module_spec(
    tf: TensorFile | TensorDict,
    weights_path: Path,
    config: Mapping[str, Any],
    name: str,
    key: str,
    layout: str,
    kind: str,
    release: Release,
    scale_key: str | None,
    base_shapes: Mapping[str, tuple[int, ...]] | None,
    where: str,
) -> ModuleSpec:
    """One module's stored layout: block size, rows, width, COFT radius; checked against the base when given."""
    shared = config_bool(config, "block_share", False, where=where)
    shape = tf.shape(key)
    where = f"{weights_path}: module {name!r} ({key}, shape {shape})"
    if layout == "packed":
        if len(shape) != 2:
            raise AdapterFormatError(f"{where}: expected (blocks, b*(b-1)/2)")
        try:
            b = block_size_from_packed(shape[1])
        except ValueError as exc:
            raise AdapterFormatError(f"{where}: {exc}") from None
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise AdapterFormatError(f"{where}: expected (blocks, b, b)")
        b = shape[1]
    rows = shape[0]
    if shared and rows != 1:
        raise AdapterFormatError(f"{where}: block_share is set in the config but {rows} blocks are stored")
    out = tf.shape(scale_key)[0] if scale_key else None
    features = None if shared else rows * b
    r = config_int(config, "r", 0, where=where)
    if shared and release == "0.13" and r > 0:
        features = r * b  # 0.7-0.13: r blocks of ceil(out / r), padded
    if base_shapes is not None:
        features = _check_against_base(where, name, kind, release, b, rows, shared, features, base_shapes)
    radius = _coft_radius(config, release, rows, b, features, out, where)
    if radius is not None and math.isnan(radius):
        raise IncompatibleAdaptersError(
            f"{where}: COFT with block_share in a PEFT 0.14-0.15 adapter needs the layer width; "
            "pass the base model (--base) so oftmerge can read it"
        )
    return ModuleSpec(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        side="output" if release == "0.13" else "input",
        block_size=b,
        rows=rows,
        shared=shared,
        features=features,
        key=key,
        scale_key=scale_key,
        out_features=out,
        coft_radius=radius,
    )


def rotated_width(weight_shape: tuple[int, ...], kind: str, side: str) -> int:
    """Width of the axis PEFT rotates for a base weight of this shape."""
    if kind == "embedding":
        return weight_shape[1]
    if side == "output":
        return weight_shape[0]
    return int(math.prod(weight_shape[1:]))  # in_features (* k * k for Conv2d)


def _check_against_base(
    where: str,
    name: str,
    kind: str,
    release: str,
    b: int,
    rows: int,
    shared: bool,
    features: int | None,
    base_shapes: Mapping[str, tuple[int, ...]],
) -> int:
    wkey = f"{name}.weight"
    if wkey not in base_shapes:
        head, _, rest = wkey.partition(".")
        if rest in base_shapes:  # a bare backbone checkpoint (BertModel) for an adapter of a model with a head
            raise IncompatibleAdaptersError(
                f"{where}: the base model stores {rest!r} without the {head + '.'!r} prefix: it is a checkpoint of the bare "
                "backbone, while the adapter was trained on a model with a head around it; load the base with that model "
                "class (e.g. AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)), save_pretrained it, "
                "and use that directory"
            )
        raise IncompatibleAdaptersError(
            f"{where}: the base model has no weight {wkey!r}; this adapter was trained on another base model"
        )
    side = "output" if release == "0.13" else "input"
    width = rotated_width(base_shapes[wkey], kind, side)
    if release == "0.13":  # r blocks of ceil(out / r), the padding cut off when folding
        ok = features is None or (features >= width > features - b)
    else:
        ok = width % b == 0 and (shared or rows * b == width)
    if not ok:
        raise IncompatibleAdaptersError(
            f"{where}: does not fit base weight {wkey} of shape {tuple(base_shapes[wkey])} "
            f"(rotated width {width}); the adapter belongs to another base model"
        )
    return width if release != "0.13" else (features if features is not None else width)

