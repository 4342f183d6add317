"""Planning a merge of OFT adapters: the modules, their common block grid, the output's layout and config.

Pure decisions from what was read (no generator is loaded): :func:`plan_modules` takes the union
of modules and checks widths and block sizes, :func:`output_layout` picks the PEFT layout the
output can be written in, :func:`block_config` the grid PEFT's single config can express,
:func:`output_config` the output's ``adapter_config.json``, :func:`resolve_rotation_map` the map
the output is written for. :func:`to_grid` and :func:`module_norm` bring one input's stored blocks
to the plan's grid and measure them. :func:`plan_merge` puts them together into a frozen
:class:`MergePlan` (what ``--dry-run`` prints); :mod:`oftmerge.ops.merge` runs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from oftmerge.errors import IncompatibleAdaptersError, OftMergeError
from oftmerge.formats.config_values import config_bool, config_float, config_int, config_path
from oftmerge.formats.io import sha256_file
from oftmerge.formats.peft_oft import RELEASES, ModuleSpec, OftAdapter, in_saved_module
from oftmerge.formats.sources import ResolvedSource, configured_base, describe_source, resolve_source, source_record
from oftmerge.formats.writer import CURRENT_CONFIG_TEMPLATE, BlockConfig, choose_block_config
from oftmerge.linalg import RotationMap, regrid_blocks, scaled_norm, weight_unit
from oftmerge.methods import MergeMethod, get_method
from oftmerge.plan.saved import SavedPlan, plan_saved
from oftmerge.provenance import peft_version

__all__ = [
    "MergeBase",
    "MergePlan",
    "ModulePlan",
    "block_config",
    "keep_coft",
    "merge_base",
    "merged_scale",
    "module_norm",
    "output_config",
    "output_layout",
    "plan_merge",
    "plan_modules",
    "resolve_rotation_map",
    "to_grid",
]

log = logging.getLogger(__name__)


def resolve_rotation_map(maps: Sequence[RotationMap], choice: str, layout: str) -> tuple[RotationMap, list[str]]:
    """The map the output is written for: ``choice`` is ``auto``, ``exact``, ``neumann`` or ``neumann:N``."""
    notes: list[str] = []
    if layout in ("0.13", "0.15"):
        if choice not in ("auto", "exact"):
            raise OftMergeError(f"PEFT {RELEASES[layout]} adapters only know the exact Cayley map; got cayley={choice!r}")
        return RotationMap("exact"), notes
    unique = list(dict.fromkeys(maps))
    if choice == "exact":
        return RotationMap("exact"), notes
    if choice == "neumann" or choice.startswith("neumann:"):
        _, _, n = choice.partition(":")
        if choice != "neumann":
            try:
                terms = int(n)
            except ValueError:
                raise OftMergeError(f"cayley={choice!r}: expected neumann:N with an integer N >= 1, e.g. neumann:5") from None
            if terms < 1:
                raise OftMergeError(
                    f"cayley={choice!r}: the Cayley-Neumann series needs N >= 1 terms (PEFT's default is 5), e.g. neumann:5; "
                    "or cayley='exact' for the exact Cayley map"
                )
        else:
            terms_in = {m.terms for m in unique if m.kind == "neumann"}
            terms = terms_in.pop() if len(terms_in) == 1 else 5
        if any(m.kind == "neumann" and m.variant == "0.16" for m in unique):
            notes.append(
                f"cayley={choice!r}: the output is written for PEFT >= 0.18's Cayley-Neumann series ({terms} terms), while "
                "inputs were trained with PEFT 0.16-0.17's: the merged model's function differs from the inputs' by that "
                "change of series, as after `oftmerge convert --approximate` (cayley='auto' keeps the inputs' series)"
            )
        return RotationMap("neumann", terms, "0.18"), notes
    if choice != "auto":
        raise OftMergeError(f"cayley must be 'auto', 'exact', 'neumann' or 'neumann:N', got {choice!r}")
    if len(unique) > 1:
        notes.append(
            "inputs use different rotation maps (" + "; ".join(m.describe() for m in unique) + "): the output uses the "
            "exact Cayley map, the only one that is a true rotation; pass cayley='neumann' to keep the series"
        )
        return RotationMap("exact"), notes
    m = unique[0]
    if m.kind == "neumann" and m.variant == "0.16":
        notes.append(
            f"inputs use PEFT 0.16-0.17's Cayley-Neumann series ({m.terms} terms): the output keeps it and is written as "
            "PEFT 0.16-0.17 writes adapters (no peft_version), so PEFT 0.16-0.17 and oftmerge's fold apply the inputs' "
            "series, and PEFT >= 0.18 treats the output as it treats the inputs (its own series, with its warning). "
            "Pass cayley='neumann' to write for PEFT >= 0.18's series instead (a change of function, as convert --approximate)"
        )
    return m, notes


@dataclass(frozen=True)
class ModulePlan:
    name: str
    kind: str
    entries: tuple[tuple[int, ModuleSpec], ...]
    features: int | None
    grid: int


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def plan_modules(adapters: Sequence[OftAdapter]) -> list[ModulePlan]:
    names = sorted(set().union(*(a.modules for a in adapters)))
    plans = []
    for name in names:
        entries = tuple((i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules)
        kinds = {s.kind for _, s in entries}
        if len(kinds) > 1:
            raise IncompatibleAdaptersError(f"module {name!r} is an embedding in one adapter and a linear layer in another")
        widths = {s.features for _, s in entries if s.features is not None}
        if len(widths) > 1:
            detail = ", ".join(f"{adapters[i].path} has width {s.features}" for i, s in entries)
            raise IncompatibleAdaptersError(
                f"module {name!r}: the adapters disagree on the layer's width ({detail}); they were trained on "
                "different base models and cannot be merged"
            )
        features = widths.pop() if widths else None
        grid = _lcm([s.block_size for _, s in entries])
        if features is not None and features % grid:
            sizes = ", ".join(f"{adapters[i].path}: {s.block_size}" for i, s in entries)
            raise IncompatibleAdaptersError(
                f"module {name!r} (width {features}): block sizes {sizes} have no common grid "
                f"(their least common multiple {grid} does not divide {features}). Merge adapters with "
                "compatible block sizes (one a multiple of the other, dividing the width)."
            )
        plans.append(ModulePlan(name, kinds.pop(), entries, features, grid))
    return plans


def output_layout(adapters: Sequence[OftAdapter]) -> str:
    sides = {a.side for a in adapters}
    if len(sides) > 1:
        old = [str(a.path) for a in adapters if a.side == "output"]
        raise IncompatibleAdaptersError(
            f"{', '.join(old)}: PEFT 0.7-0.13 adapters rotate the output side of each layer, newer ones the input "
            "side; the two cannot be merged into one adapter. Fold each into the base model instead."
        )
    if sides == {"output"}:
        return "0.13"
    if any(a.release == "0.15" and a.has_nontrivial_scale() for a in adapters):
        return "0.15"
    return "0.18"


def block_config(
    adapters: Sequence[OftAdapter], plans: Sequence[ModulePlan], layout: str
) -> tuple[BlockConfig, bool]:
    shared = all(config_bool(a.config, "block_share", False, where=config_path(a.path)) for a in adapters)
    configs = {
        (config_int(a.config, "r", 0, where=config_path(a.path)), config_int(a.config, "oft_block_size", 0, where=config_path(a.path)))
        for a in adapters
    }
    if layout == "0.13":
        for p in plans:
            if len({(s.block_size, s.rows) for _, s in p.entries}) > 1:
                raise IncompatibleAdaptersError(
                    f"module {p.name!r}: PEFT 0.7-0.13 adapters with different block layouts cannot be merged "
                    "into one adapter of that release; fold them into the base model instead"
                )
        r = configs.pop()[0] if len(configs) == 1 else 0
        return BlockConfig(r=r, oft_block_size=0, sizes={p.name: p.grid for p in plans}), shared
    unknown = [p for p in plans if p.features is None]
    prefer = next(iter(configs)) if len(configs) == 1 else None
    if unknown:
        same_blocks = all(len({s.block_size for _, s in p.entries}) == 1 for p in plans)
        if prefer is not None and same_blocks and shared:
            return BlockConfig(prefer[0], prefer[1], {p.name: p.grid for p in plans}), shared
        raise IncompatibleAdaptersError(
            f"module {unknown[0].name!r}: block_share adapters do not store the layer width, and these adapters "
            "need a common block grid; pass the base model (base=... / --base DIR) so oftmerge can read the widths"
        )
    grids = {p.name: (p.features, p.grid) for p in plans}
    return choose_block_config(grids, prefer=prefer), shared  # type: ignore[arg-type]


def output_config(
    adapters: Sequence[OftAdapter],
    plans: Sequence[ModulePlan],
    layout: str,
    rmap: RotationMap,
    blocks: BlockConfig,
    shared: bool,
    warnings: list[str],
    saved: Sequence[SavedPlan] = (),
) -> dict[str, Any]:
    def common(key: str) -> Any:
        values = [a.config.get(key) for a in adapters]
        first = values[0]
        return first if all(_same(v, first) for v in values) else None

    task_types = {a.config.get("task_type") for a in adapters}
    if len(task_types) > 1:
        warnings.append(f"inputs have different task_type values {sorted(map(str, task_types))}: the output has none")
    same_targets = all(set(a.modules) == set(adapters[0].modules) for a in adapters) and all(
        common(k) is not None or all(a.config.get(k) is None for a in adapters)
        for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
    )
    if layout == "0.18":
        config = dict(CURRENT_CONFIG_TEMPLATE)
        installed = peft_version()
        if rmap.kind == "neumann" and rmap.variant == "0.16":  # as 0.16-0.17 wrote it: readers pick that series
            del config["peft_version"]
        elif installed is not None:
            from packaging.version import Version

            if Version(installed.partition("@")[0]) >= Version("0.18.0"):
                config["peft_version"] = installed
        config["use_cayley_neumann"] = rmap.kind == "neumann"
        config["num_cayley_neumann_terms"] = rmap.terms if rmap.kind == "neumann" else 5
    else:
        config = dict(adapters[0].config)
    config.update(
        {
            "peft_type": "OFT",
            "base_model_name_or_path": adapters[0].base_model,
            "task_type": task_types.pop() if len(task_types) == 1 else None,
            "revision": common("revision"),
            "auto_mapping": common("auto_mapping"),
            "block_share": shared,
            "coft": False,  # COFT's projection is applied on reading; the merged generator is stored as is
            "module_dropout": 0.0,
            "inference_mode": True,
            "bias": "none",
            "modules_to_save": None,
            "fan_in_fan_out": False,
        }
    )
    if layout != "0.13":
        config["r"] = blocks.r
        config["oft_block_size"] = blocks.oft_block_size
    if same_targets:
        for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            value = adapters[0].config.get(k)
            config[k] = sorted(value) if isinstance(value, (list, set, tuple)) else value
    else:
        config["target_modules"] = sorted(p.name for p in plans)
        config.update(exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    kept = [s.name for s in saved if s.action != "drop"]
    if kept:
        config.update(_saved_config(adapters, {p.name for p in plans}, kept))
    entries = [str(e) for a in adapters for e in (a.config.get("modules_to_save") or [])]
    heads = [s.name for s in saved if s.action == "drop" and in_saved_module(s.name, entries)]
    if heads and config["task_type"] in _HEAD_TASKS:
        warnings.append(
            f"the inputs' saved heads ({', '.join(heads[:2])}{', ...' if len(heads) > 2 else ''}) are dropped: the output has "
            f"task_type None instead of {config['task_type']}, because PEFT loads a {config['task_type']} adapter only with "
            "its head; the base model's head is used"
        )
        config["task_type"] = None
    return config


#: task types for which PEFT wraps the model's head (modules_to_save) and loads it from the adapter
_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _saved_config(adapters: Sequence[OftAdapter], oft_modules: set[str], kept: Sequence[str]) -> dict[str, Any]:
    """``modules_to_save`` and ``bias`` of an output that stores the saved tensors ``kept``.

    ``modules_to_save`` lists the inputs' entries that a kept tensor belongs to; ``bias`` is
    ``"oft_only"`` when every kept bias is an OFT module's, ``"all"`` when some other bias is kept.
    """
    entries = sorted({str(e) for a in adapters for e in (a.config.get("modules_to_save") or [])})
    wrapped = [e for e in entries if any(in_saved_module(n, [e]) for n in kept)]
    biases = [n for n in kept if n.endswith(".bias") and not any(in_saved_module(n, [e]) for e in wrapped)]
    bias = "none" if not biases else ("oft_only" if all(n[: -len(".bias")] in oft_modules for n in biases) else "all")
    return {"modules_to_save": wrapped or None, "bias": bias}


def _same(a: Any, b: Any) -> bool:
    """Config values agree; lists of names (``target_modules``, ...) in any order."""
    if isinstance(a, (list, tuple, set)) and isinstance(b, (list, tuple, set)):
        return set(a) == set(b)
    return a == b


def to_grid(q: torch.Tensor, spec: ModuleSpec, shared_out: bool, features: int | None, block: int) -> torch.Tensor:
    """Bring stored blocks ``(rows, b, b)`` to the output grid ``block`` (shared or all blocks)."""
    if spec.shared and not shared_out:
        assert features is not None
        q = q.expand(features // spec.block_size, -1, -1)
    elif spec.shared and shared_out:
        q = q.expand(block // spec.block_size, -1, -1)
    return regrid_blocks(q.contiguous(), block)


def module_norm(q: torch.Tensor, spec: ModuleSpec, features: int | None = None) -> float:
    """``||Q||_F`` of the whole module: a shared block counts once per block it stands for.

    ``features`` (the layer width) is needed for shared blocks when the adapter does not know it;
    without it the norm of the stored block is returned.
    """
    blocks = scaled_norm(q, (-2, -1), plain=torch.linalg.matrix_norm(q))  # no overflow for entries beyond 1e154
    norm = float(scaled_norm(blocks, plain=blocks.square().sum().sqrt()))
    width = spec.features or features
    return norm * math.sqrt(width // spec.block_size) if spec.shared and width else norm


def merged_scale(read: Sequence[OftAdapter], p: ModulePlan, weights: Sequence[float]) -> torch.Tensor:
    """PEFT 0.14-0.15's ``oft_s``: the |weight|-weighted mean of the inputs' scales (ones where absent)."""
    total, acc = 0.0, None
    unit = weight_unit(torch.tensor([weights[i] for i, _ in p.entries], dtype=torch.float64))  # exact; no overflow for 1e200
    for i, spec in p.entries:
        s = read[i].scale(p.name)
        if s is None:
            if spec.out_features is None:
                continue
            s = torch.ones(spec.out_features, 1, dtype=torch.float64)
        w = abs(weights[i]) / unit
        acc = w * s if acc is None else acc + w * s
        total += w
    if acc is None:
        raise IncompatibleAdaptersError(f"module {p.name!r}: no oft_s scale found to merge")
    return acc / total


# -- the whole plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided from the inputs alone (no generator loaded); what ``--dry-run`` shows.

    Inputs are in the canonical order (by content hash, unless the method's result depends on
    the order): float sums then do not depend on the order they were given in.
    """

    config: Any  #: the :class:`~oftmerge.config.MergeConfig`
    adapters: tuple[OftAdapter, ...]  #: canonical order
    weights: tuple[float, ...]  #: canonical order
    given_order: tuple[int, ...]  #: position in the given order of each input
    method: MergeMethod
    options: Mapping[str, Any]
    layout: str  #: "0.18", "0.15" or "0.13"
    rotation_map: RotationMap
    modules: tuple[ModulePlan, ...]
    blocks: BlockConfig
    shared: bool
    adapter_config: Mapping[str, Any]  #: the output's adapter_config.json
    out_dtype: torch.dtype
    packed: frozenset[str]  #: modules merged on the stored upper triangles
    warnings: tuple[str, ...]
    #: the SHA-256 of the input files (hashed in threads meanwhile; the call waits for them)
    file_hashes: Callable[[], list[str]] = field(compare=False, repr=False)
    #: what the output stores for each tensor the inputs saved besides their rotations (heads, biases)
    saved: tuple[SavedPlan, ...] = ()
    #: where each input (canonical order) came from; None for an :class:`OftAdapter` given in memory
    sources: tuple[ResolvedSource | None, ...] = ()
    #: the base the shapes were checked against, if any
    base: MergeBase | None = None
    #: COFT's eps when the output keeps COFT on and stores the inputs' tensors as they are (:func:`keep_coft`)
    coft_eps: float | None = None

    @property
    def inputs(self) -> tuple[tuple[str, str], ...]:
        """What the output must not replace (``(role, path)``): every input adapter, and the base the shapes were checked against."""
        out = [("input adapter", str(a.path)) for a in self.adapters]
        if self.base is not None:
            out.append(("the base model", str(self.base.source.path)))
        return tuple(out)

    def grid(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """module -> (the inputs' block sizes, the output block size)."""
        return {p.name: (tuple(s.block_size for _, s in p.entries), self.blocks.sizes[p.name]) for p in self.modules}

    def output_shapes(self) -> dict[str, tuple[int, int]]:
        """module -> shape of its stored output generator."""
        out = {}
        for p in self.modules:
            b = self.blocks.sizes[p.name]
            rows = 1 if self.shared else (p.features or b) // b
            out[p.name] = (rows, b * (b - 1) // 2 if self.layout == "0.18" else b * b)
        return out

    def share(self, group: Any) -> list[int]:
        """Indices of the modules process ``group.rank`` merges (all of them for a single process)."""
        return group.share([len(p.entries) * (p.features or 1) for p in self.modules])


@dataclass(frozen=True)
class MergeBase:
    """The base model a merge (or ``inspect``) checks shapes against: given, or named by the adapters' configs."""

    source: ResolvedSource
    defaulted: bool  #: taken from the adapters' ``base_model_name_or_path`` (no base was given)

    def record(self) -> dict[str, Any]:
        """For the provenance: the local path, where it came from, and for a Hub base its repo id and commit."""
        hub = source_record(self.source)
        return {"path": str(self.source.path.absolute()), "from": "adapter config" if self.defaulted else "given",
                **({"hub": hub} if hub else {})}  # fmt: skip

    def describe(self) -> str:
        return describe_source(self.source) + (" (the adapters' base_model_name_or_path)" if self.defaulted else "")


def merge_base(given: Any, adapters: Sequence[Any]) -> tuple[MergeBase | None, dict[str, tuple[int, ...]] | None]:
    """The base of a merge and its tensor shapes: ``given`` (a directory or Hub id), else the one the adapters name.

    A base the adapters name (``base_model_name_or_path``, the same in all) is used only when it is
    at hand without a download: a local directory, or a Hub id already in the Hub cache. Otherwise
    the merge goes on without a base, as it would without one given (and :func:`plan_merge` drops
    it, with a warning, when the adapters do not fit it).
    """
    # the shapes of the loaded model: tied weights the checkpoint leaves out (a tied lm_head) included
    from oftmerge.formats.shards import tied_shapes

    if given is not None:
        src = resolve_source(given, "base model")
        return MergeBase(src, False), tied_shapes(src.path)
    name = configured_base(adapters)
    if name is None:
        return None, None
    try:
        src = resolve_source(name, "base model", local_only=True)
        return MergeBase(src, True), tied_shapes(src.path)
    except OftMergeError as exc:
        log.info("not checking against the adapters' base model %s: %s", name, exc)
        return None, None


def plan_merge(config: Any) -> MergePlan:
    """Read the inputs of ``config`` (a :class:`~oftmerge.config.MergeConfig`) and plan the merge."""
    from oftmerge.formats.base import read_oft_adapter

    sources = [None if isinstance(a, OftAdapter) else resolve_source(a, "adapter") for a in config.adapters]
    # a base the configs name is looked for only for adapters read here (not for ones given in memory)
    base, base_shapes = merge_base(config.base, [s for s in sources if s is not None])

    def read_all(shapes: Mapping[str, tuple[int, ...]] | None) -> list[OftAdapter]:
        return [a if src is None else read_oft_adapter(src.path, peft_release=rel, base_shapes=shapes)
                for a, src, rel in zip(config.adapters, sources, config.releases())]  # fmt: skip

    warnings: list[str] = []
    try:
        read = read_all(base_shapes)
    except IncompatibleAdaptersError as exc:
        if base is None or not base.defaulted:
            raise
        warnings.append(f"the adapters do not fit {base.describe()}, so their shapes are not checked against a base ({exc})")
        base, read = None, read_all(None)
    warnings += dict.fromkeys(n for a in read for n in a.notes)  # how the inputs were read (a PEFT release newer than known)
    weights = list(config.weights) if config.weights is not None else [1.0] * len(read)
    meth = get_method(config.method)
    file_hashes, keys = _input_hashes(read, need_content=not meth.order_matters)
    order = list(range(len(read)))
    if not meth.order_matters:  # a canonical order makes float sums independent of the order given
        # keys: content hashes, of the tensors, not the file: .bin, safetensors, memory agree
        order.sort(key=lambda i: (keys[i], weights[i], str(read[i].path)))
    read = [read[i] for i in order]
    weights = [weights[i] for i in order]
    sources = [sources[i] for i in order]
    names = {a.base_model for a in read} - {None}
    if len(names) > 1 and not config.allow_base_mismatch:
        raise IncompatibleAdaptersError(
            "the adapters name different base models (" + ", ".join(f"{a.path}: {a.base_model}" for a in read)
            + "); pass allow_base_mismatch=True (--allow-base-mismatch) if they are the same model saved at "
            "different paths"
        )
    layout = output_layout(read)
    rmap, notes = resolve_rotation_map([a.rotation_map for a in read], config.cayley, layout)
    warnings += notes
    plans = plan_modules(read)
    blocks, shared = block_config(read, plans, layout)
    saved = plan_saved(read, weights, order, config.saved_modules)
    adapter_config = output_config(read, plans, layout, rmap, blocks, shared, warnings, saved)
    dtypes = {a.dtype(name) for a in read for name in a.modules}
    coft_eps = keep_coft(read, plans, blocks, layout, shared, meth, weights, config.scale)
    if coft_eps is not None:  # the stored tensors are written as they are; PEFT projects them as before
        adapter_config.update(coft=True, eps=coft_eps)
    # modules whose inputs all store the generator packed on the output grid go through the merge packed:
    # a linear method commutes with packing, and ||Q||_F = sqrt(2) ||upper triangle||
    packed = frozenset(
        p.name for p in plans
        if layout == "0.18" and not shared and (meth.from_sum is not None or len(p.entries) == 1)
        and all((read[i].is_packed(p.name) or (coft_eps is not None and read[i].stores_packed(p.name)))
                and s.block_size == blocks.sizes[p.name] and not s.shared for i, s in p.entries)
    )  # fmt: skip
    return MergePlan(
        config=config,
        adapters=tuple(read),
        weights=tuple(weights),
        given_order=tuple(order),
        method=meth,
        options=dict(config.method_options),
        layout=layout,
        rotation_map=rmap,
        modules=tuple(plans),
        blocks=blocks,
        shared=shared,
        adapter_config=adapter_config,
        out_dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
        packed=packed,
        warnings=tuple(warnings),
        file_hashes=file_hashes,
        saved=saved,
        sources=tuple(sources),
        base=base,
        coft_eps=coft_eps,
    )


def keep_coft(
    read: Sequence[OftAdapter], plans: Sequence[ModulePlan], blocks: BlockConfig, layout: str, shared: bool,
    meth: MergeMethod, weights: Sequence[float], scale: float,
) -> float | None:
    """COFT's ``eps`` when the output can keep COFT on, storing each input's tensor unchanged; else None.

    COFT projects each stored generator before PEFT's map; a merged generator must be stored
    projected with COFT off (a second projection would clip it). When every module is adapted by
    one input and keeps that input's generator exactly (the packed layout, its own block size, no
    rescaling by ``scale`` or a weight), all inputs use COFT with one ``eps``, the stored tensors
    can be written as they are with COFT on, and PEFT projects them as it did: the output then
    keeps each module's stored tensor bit for bit (``N = 1``).
    """
    if layout != "0.18" or shared or scale != 1.0 or not all(config_bool(a.config, "coft", False, where=config_path(a.path)) for a in read):
        return None
    eps = {config_float(a.config, "eps", 6e-5, where=config_path(a.path), positive=True) for a in read}
    if len(eps) != 1:
        return None
    for p in plans:
        if len(p.entries) != 1:
            return None
        i, spec = p.entries[0]
        if spec.shared or spec.block_size != blocks.sizes[p.name] or not read[i].stores_packed(p.name):
            return None
        if not meth.normalized_weights and abs(weights[i]) != 1.0:
            return None
    return eps.pop()


def _input_hashes(read: Sequence[OftAdapter], need_content: bool) -> tuple[Callable[[], list[str]], list[str | None]]:
    """Content hashes of the inputs (if needed: the canonical order), and a call for their files' SHA-256.

    The content hashes are computed now, by up to 4 threads (hashlib releases the GIL); the
    files' SHA-256 (provenance, not needed before the output is written) go on in those threads
    while the caller merges, and the returned call waits for them. An input that is not a file
    is described by its content hash.
    """

    def content(a: OftAdapter) -> str | None:
        return a.content_hash() if need_content or not a.weights_path.is_file() else None

    pool = ThreadPoolExecutor(min(4, len(read)), "oftmerge-hash")
    try:
        keys = list(pool.map(content, read))
        files = [pool.submit(sha256_file, a.weights_path) if a.weights_path.is_file() else None for a in read]
    finally:
        pool.shutdown(wait=False)

    def file_hashes() -> list[str]:
        return [f.result() if f is not None else k for f, k in zip(files, keys)]  # type: ignore[misc]

    return file_hashes, keys
