"""The frozen plans (oftmerge.plan): plan_merge, plan_fold and plan_decouple on the bundled tiny model and on
TinyNet adapters; what they decide equals what the dry runs report, and a merge plan loads no generator."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

import oftmerge
from oftmerge.config import DecoupleConfig, FoldConfig, MergeConfig, RunOptions
from oftmerge.formats.checkpoint import Checkpoint
from oftmerge.formats.peft_oft import OftAdapter
from oftmerge.formats.shards import plan_model
from oftmerge.plan.decouple import DecouplePlan, plan_decouple
from oftmerge.plan.fold import FoldPlan, plan_fold
from oftmerge.plan.merge import MergePlan, plan_merge

from helpers import ADAPTERS, make_oft_adapter, save_full_expert, save_lora_expert

UPPER, REVERSE, SORT, BASE = ADAPTERS / "oft-upper", ADAPTERS / "oft-reverse", ADAPTERS / "oft-sort", ADAPTERS / "base"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three TinyNet OFT adapters: two alike (block 4), one with block 8 on fewer modules."""
    root = tmp_path_factory.mktemp("tiny")
    make_oft_adapter(root / "a", seed=1)
    make_oft_adapter(root / "b", seed=2)
    make_oft_adapter(root / "c", seed=3, targets=("lin_sq", "lin_wide"), oft_block_size=8)
    return root


# -- plan_merge -------------------------------------------------------------------------------------------


def _check_against_dry_run(config: MergeConfig) -> MergePlan:
    plan = plan_merge(config)
    assert isinstance(plan, MergePlan)
    dry = oftmerge.merge_adapters(config, run=RunOptions(dry_run=True))
    assert dry.dry_run
    names = [p.name for p in plan.modules]
    assert names == sorted(names) and len(names) == len(set(names)) and names
    assert plan.grid() == dry.plan
    assert list(plan.grid()) == names
    assert {k: tuple(t.shape) for k, t in dry.tensors.items()} == plan.output_shapes()
    assert all(t.dtype == plan.out_dtype for t in dry.tensors.values())
    assert dry.layout == plan.layout and dry.rotation_map == plan.rotation_map
    assert dry.config == dict(plan.adapter_config)
    for p in plan.modules:  # each module's grid is a common multiple of its inputs' block sizes
        sizes, b = plan.grid()[p.name]
        assert all(b % s == 0 for s in sizes)
        assert p.features is None or p.features % b == 0
    return plan


def test_plan_merge_bundled_matches_the_dry_run():
    plan = _check_against_dry_run(MergeConfig([UPPER, REVERSE], weights=[1, 0.5]))
    assert plan.layout == "0.18" and len(plan.modules) == 28
    assert {str(a.path) for a in plan.adapters} == {str(UPPER), str(REVERSE)}
    # every module of both inputs is merged from two inputs
    assert all(len(p.entries) == 2 for p in plan.modules)
    widths = Checkpoint(BASE).shapes()
    for p in plan.modules:
        rows, packed = plan.output_shapes()[p.name]
        b = plan.blocks.sizes[p.name]
        assert packed == b * (b - 1) // 2 and rows * b == widths[f"{p.name}.weight"][1]


def test_plan_merge_tiny_adapters_match_the_dry_run(tiny):
    plan = _check_against_dry_run(MergeConfig([tiny / "a", tiny / "b", tiny / "c"]))
    assert [p.name for p in plan.modules] == ["lin_sq", "lin_tall", "lin_wide"]
    entries = {p.name: len(p.entries) for p in plan.modules}
    assert entries == {"lin_sq": 3, "lin_tall": 2, "lin_wide": 3}
    assert plan.output_shapes()["lin_tall"][0] * plan.blocks.sizes["lin_tall"] == 24
    _check_against_dry_run(MergeConfig([tiny / "c"]))  # one input


def test_plan_merge_is_frozen():
    plan = plan_merge(MergeConfig([UPPER, REVERSE]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layout = "0.15"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.weights = (2.0, 2.0)  # type: ignore[misc]
    assert isinstance(plan.modules, tuple) and isinstance(plan.adapters, tuple) and isinstance(plan.weights, tuple)


@pytest.mark.parametrize("case", ["bundled", "tiny"])
def test_plan_merge_canonical_order_does_not_depend_on_the_given_order(case, tiny):
    paths = [UPPER, REVERSE, SORT] if case == "bundled" else [tiny / "a", tiny / "b", tiny / "c"]
    weights = [1.0, 0.5, -0.25]
    first = plan_merge(MergeConfig(paths, weights=weights))
    canonical = [str(a.path) for a in first.adapters]
    # given_order maps canonical position -> given position
    assert sorted(first.given_order) == [0, 1, 2]
    assert canonical == [str(paths[i]) for i in first.given_order]
    assert first.weights == tuple(weights[i] for i in first.given_order)
    for perm in ([2, 1, 0], [1, 2, 0], [0, 2, 1]):
        plan = plan_merge(MergeConfig([paths[i] for i in perm], weights=[weights[i] for i in perm]))
        assert [str(a.path) for a in plan.adapters] == canonical
        assert plan.weights == first.weights  # reordered with the adapters
        assert tuple(perm[i] for i in plan.given_order) == first.given_order
        assert plan.grid() == first.grid() and plan.output_shapes() == first.output_shapes()
        assert [p.entries for p in plan.modules] == [p.entries for p in first.modules]
        assert dict(plan.adapter_config) == dict(first.adapter_config)


def test_plan_merge_sequential_keeps_the_given_order():
    plan = plan_merge(MergeConfig([REVERSE, UPPER], method="sequential", weights=[2, 1]))
    assert [a.path for a in plan.adapters] == [REVERSE, UPPER] and plan.given_order == (0, 1) and plan.weights == (2.0, 1.0)


def test_plan_merge_reads_no_generator(monkeypatch, tiny):
    class Loaded(Exception):
        pass

    def refuse(self, name):
        raise Loaded(f"{self.path}: generator of {name} loaded")

    monkeypatch.setattr(OftAdapter, "generator", refuse)
    monkeypatch.setattr(OftAdapter, "packed_generator", refuse)
    for paths in ([UPPER, REVERSE], [tiny / "a", tiny / "c"]):
        config = MergeConfig(paths)
        plan = plan_merge(config)
        assert plan.modules
        dry = oftmerge.merge_adapters(config, run=RunOptions(dry_run=True))
        assert dry.plan == plan.grid()
        assert [i.sha256 for i in dry.inputs] and all(len(i.sha256) == 64 for i in dry.inputs)
        with pytest.raises(Loaded):  # the patch bites: a real merge does load generators
            oftmerge.merge_adapters(config)


# -- plan_fold --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", ["5GB", "1MB", 400_000])
def test_plan_fold_modules_and_shards(shard_size):
    config = FoldConfig(UPPER, BASE)
    plan = plan_fold(config, shard_size)
    assert isinstance(plan, FoldPlan) and plan.config is config
    adapter = oftmerge.read_adapter(UPPER)
    assert set(plan.modules) == set(adapter.modules)
    assert all(key == f"{name}.weight" for name, key in plan.modules.items())
    ckpt = Checkpoint(BASE)
    assert all(key in ckpt for key in plan.modules.values())
    assert [list(s) for s in plan.shards] == plan_model(ckpt, shard_size)
    assert plan.shard_size == shard_size and plan.untied is None and plan.untie is None  # oft-upper leaves embeddings alone
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.shards = ()  # type: ignore[misc]

    dry = oftmerge.fold_adapter(config, run=RunOptions(dry_run=True, shard_size=shard_size))
    assert dry.dry_run and dry.out_dir is None
    assert dry.modules == dict(plan.modules)
    assert dry.shards == [[t.name for t in s] for s in plan.shards]
    assert dry.total_bytes == sum(t.nbytes for s in plan.shards for t in s)
    assert dry.untied == plan.untied and dry.warnings == list(plan.warnings)
    assert dry.source["sha256"] == plan.source["sha256"] and len(plan.source["sha256"]) == 64


def test_plan_fold_shard_count_follows_the_size():
    one = plan_fold(FoldConfig(UPPER, BASE), "5GB")
    small = plan_fold(FoldConfig(UPPER, BASE), 400_000)
    assert len(one.shards) == 1 and len(small.shards) > 2
    assert [t.name for s in small.shards for t in s] == [t.name for s in one.shards for t in s]


def test_plan_fold_of_a_merge_result_reads_it_from_memory():
    merged = oftmerge.merge_adapters([UPPER, REVERSE])
    plan = plan_fold(FoldConfig(merged, BASE))
    assert set(plan.modules) == set(merged.modules)
    assert sorted(role for role, _ in plan.inputs) == ["input adapter", "input adapter"]
    assert {Path(p).resolve() for _, p in plan.inputs} == {UPPER.resolve(), REVERSE.resolve()}  # guarded against


# -- plan_decouple ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    base = root / "base"
    shutil.copytree(BASE, base)
    return {
        "base": base,
        "lora": save_lora_expert(root / "lora", base, seed=100),
        "full": save_full_expert(root / "full", base, seed=7),
    }


def test_plan_decouple_lora_expert_decouples_its_2d_weights(experts):
    plan = plan_decouple(DecoupleConfig(experts["base"], [experts["lora"]]))
    assert isinstance(plan, DecouplePlan)
    (expert,) = plan.experts
    assert expert.kind == "lora" and len(expert.sha256) == 64
    expected = [f"model.layers.{i}.{m}.weight" for i in range(4) for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert sorted(plan.tensors) == sorted(expected)
    assert set(plan.tensors.values()) == {"decouple"}
    order = Checkpoint(experts["base"]).keys_in_file_order()
    assert list(plan.tensors) == [k for k in order if k in plan.tensors]  # file order
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tensors = {}  # type: ignore[misc]


def test_plan_decouple_full_expert_kinds(experts):
    plan = plan_decouple(DecoupleConfig(experts["base"], [experts["lora"], experts["full"]], weights=[1, 2]))
    shapes = Checkpoint(experts["base"]).shapes()
    assert set(plan.tensors) == set(shapes)  # the full expert changes everything
    for name, kind in plan.tensors.items():
        if "embed_tokens" in name or len(shapes[name]) != 2:
            assert kind == "euclidean", name
        else:
            assert kind == "decouple", name
    assert plan.tensors["model.embed_tokens.weight"] == "euclidean"
    assert plan.tensors["model.norm.weight"] == "euclidean"
    assert plan.tensors["model.layers.0.mlp.gate_proj.weight"] == "decouple"
    # canonical order: the same plan whatever the order given, weights reordered with it
    swapped = plan_decouple(DecoupleConfig(experts["base"], [experts["full"], experts["lora"]], weights=[2, 1]))
    assert [e.path for e in swapped.experts] == [e.path for e in plan.experts]
    assert swapped.weights == plan.weights
    assert dict(zip((e.kind for e in plan.experts), plan.weights)) == {"lora": 1.0, "full": 2.0}
    assert dict(swapped.tensors) == dict(plan.tensors)


def test_plan_decouple_without_orthogonal_is_all_euclidean(experts):
    plan = plan_decouple(DecoupleConfig(experts["base"], [experts["lora"], experts["full"]], orthogonal=None))
    assert plan.tensors and set(plan.tensors.values()) == {"euclidean"}
    assert set(plan.tensors) == set(Checkpoint(experts["base"]).shapes())


def test_plan_decouple_euclidean_only_patterns(experts):
    plan = plan_decouple(DecoupleConfig(experts["base"], [experts["lora"]], euclidean_only=(r"\.v_proj\.",)))
    for name, kind in plan.tensors.items():
        assert kind == ("euclidean" if ".v_proj." in name else "decouple"), name
