"""Planning a merge, decision by decision: which modules, on which block grid, in which layout, with which
rotation map, under which config. Tiny in-memory adapters (``adapter_from_tensors``), no file and no model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from oftmerge.errors import IncompatibleAdaptersError, OftMergeError
from oftmerge.formats.io import TensorDict
from oftmerge.formats.peft_oft import adapter_from_tensors
from oftmerge.formats.writer import BlockConfig, choose_block_config
from oftmerge.linalg import RotationMap
from oftmerge.plan.merge import block_config, output_config, output_layout, plan_modules, resolve_rotation_map

EXACT = RotationMap("exact")
N5 = RotationMap("neumann", 5, "0.18")
N3 = RotationMap("neumann", 3, "0.18")
N4 = RotationMap("neumann", 4, "0.18")
N5_016 = RotationMap("neumann", 5, "0.16")
N3_016 = RotationMap("neumann", 3, "0.16")


def oft(label: str, modules: Mapping[str, tuple[int, int]], *, release: str = "0.18.1", **config):
    """An OFT adapter of ``release`` with ``modules``: name -> (width, block size), small non-zero generators.

    ``release`` ``"0.15"`` is the 0.14-0.15 layout (full ``oft_r`` blocks), ``"0.13"`` the 0.7-0.13 one
    (output side, config ``r``); any other value is a PEFT version with the packed ``oft_R`` layout.
    ``block_share=True`` stores one block per module (the width is then unknown).
    """
    g = torch.Generator().manual_seed(len(label))
    shared = bool(config.get("block_share", False))
    tensors = {}
    for name, (width, b) in modules.items():
        rows = 1 if shared else width // b
        if release in ("0.13", "0.15"):
            tensors[f"base_model.model.{name}.oft_r"] = torch.randn(rows, b, b, generator=g) * 0.05
        else:
            tensors[f"base_model.model.{name}.oft_R.weight"] = torch.randn(rows, b * (b - 1) // 2, generator=g) * 0.05
    cfg: dict = {"peft_type": "OFT", "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}), **config}
    if release == "0.15":
        cfg.setdefault("oft_block_size", next(iter(modules.values()))[1])
        cfg.setdefault("r", 0)
    elif release == "0.13":
        cfg.setdefault("r", next(iter(modules.values()))[0] // next(iter(modules.values()))[1])
    else:
        cfg.setdefault("peft_version", release)
        cfg.setdefault("oft_block_size", next(iter(modules.values()))[1])
        cfg.setdefault("r", 0)
    return adapter_from_tensors(Path(label), cfg, TensorDict(tensors, label))


def plan(*adapters):
    """The planning steps merge_adapters takes, in its order: layout, modules, blocks, config."""
    layout = output_layout(adapters)
    rmap, notes = resolve_rotation_map([a.rotation_map for a in adapters], "auto", layout)
    plans = plan_modules(adapters)
    blocks, shared = block_config(adapters, plans, layout)
    warnings = list(notes)
    config = output_config(adapters, plans, layout, rmap, blocks, shared, warnings)
    return plans, blocks, config, warnings


# -- plan_modules ---------------------------------------------------------------------------------------


def test_union_of_modules_with_the_inputs_that_hold_each():
    a = oft("a", {"m.k": (16, 4), "m.q": (16, 4)})
    b = oft("b", {"m.q": (16, 4), "m.v": (24, 4)})
    plans = plan_modules([a, b])
    assert [(p.name, tuple(i for i, _ in p.entries), p.features, p.grid) for p in plans] == [
        ("m.k", (0,), 16, 4),
        ("m.q", (0, 1), 16, 4),
        ("m.v", (1,), 24, 4),
    ]
    assert {p.kind for p in plans} == {"linear"}


@pytest.mark.parametrize(
    ("width", "blocks", "grid"),
    [
        (16, (4,), 4),
        (16, (4, 8), 8),
        (16, (8, 4, 2), 8),
        (24, (4, 6), 12),
        (24, (8, 12), 24),
        (30, (6, 10, 15), 30),
    ],
)
def test_common_grid_is_the_lcm_of_the_block_sizes(width, blocks, grid):
    adapters = [oft(f"a{i}", {"lin": (width, b)}) for i, b in enumerate(blocks)]
    (p,) = plan_modules(adapters)
    assert p.grid == grid and p.features == width
    assert [s.block_size for _, s in p.entries] == list(blocks)


def test_width_mismatch_means_different_base_models():
    a = oft("a", {"lin": (16, 4)})
    b = oft("b", {"lin": (32, 4)})
    with pytest.raises(
        IncompatibleAdaptersError,
        match=r"module 'lin': the adapters disagree on the layer's width \(a has width 16, b has width 32\); "
        r"they were trained on different base models",
    ):
        plan_modules([a, b])


def test_block_sizes_without_a_common_grid_are_refused():
    """A block_share adapter (block 6, width unknown) and one of width 16 in blocks of 4: lcm 12 does not divide 16."""
    shared = oft("shared", {"lin": (6, 6)}, block_share=True)
    plain = oft("plain", {"lin": (16, 4)})
    assert shared.modules["lin"].features is None
    with pytest.raises(
        IncompatibleAdaptersError,
        match=r"module 'lin' \(width 16\): block sizes shared: 6, plain: 4 have no common grid "
        r"\(their least common multiple 12 does not divide 16\)",
    ):
        plan_modules([shared, plain])


def test_embedding_and_linear_of_one_name_are_refused():
    a = oft("a", {"emb": (16, 4)})
    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.emb.oft_embedding_R.weight": torch.randn(4, 6, generator=g)}
    b = adapter_from_tensors(Path("b"), {"peft_type": "OFT", "peft_version": "0.21.2", "oft_block_size": 4, "r": 0}, TensorDict(tensors, "b"))
    assert b.modules["emb"].kind == "embedding"
    with pytest.raises(IncompatibleAdaptersError, match=r"module 'emb' is an embedding in one adapter and a linear layer in another"):
        plan_modules([a, b])


# -- resolve_rotation_map --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maps", "choice", "expected", "note"),
    [
        ([EXACT], "auto", EXACT, None),
        ([EXACT, EXACT], "auto", EXACT, None),
        ([N5], "auto", N5, None),
        ([N3, N3], "auto", N3, None),
        ([EXACT, N5], "auto", EXACT, "inputs use different rotation maps (exact Cayley"),
        ([N3, N5], "auto", EXACT, "inputs use different rotation maps (Cayley-Neumann, 3 terms"),
        ([N5_016], "auto", N5_016, "inputs use PEFT 0.16-0.17's Cayley-Neumann series (5 terms): the output keeps it"),
        ([N3_016, N3_016], "auto", N3_016, "written as PEFT 0.16-0.17 writes adapters"),
        ([N5, N3], "exact", EXACT, None),
        ([EXACT], "neumann", N5, None),  # no series among the inputs: PEFT's default 5 terms
        ([N3, N3, EXACT], "neumann", N3, None),  # the inputs' series
        ([N3, N4], "neumann", N5, None),  # series that disagree: the default
        ([N3_016], "neumann", N3, "written for PEFT >= 0.18's Cayley-Neumann series (3 terms), while inputs were trained"),
        ([EXACT], "neumann:7", RotationMap("neumann", 7, "0.18"), None),
        ([N5], "neumann:1", RotationMap("neumann", 1, "0.18"), None),
    ],
)
def test_rotation_map_of_the_output(maps, choice, expected, note):
    got, notes = resolve_rotation_map(maps, choice, "0.18")
    assert got == expected
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and note in notes[0], notes


def test_mixed_maps_note_names_each_map_and_the_way_out():
    _, (note,) = resolve_rotation_map([EXACT, N5, EXACT], "auto", "0.18")
    assert note == (
        "inputs use different rotation maps (exact Cayley (I-Q)(I+Q)^-1; Cayley-Neumann, 5 terms, PEFT 0.18+ series): "
        "the output uses the exact Cayley map, the only one that is a true rotation; pass cayley='neumann' to keep the series"
    )


@pytest.mark.parametrize(("layout", "family"), [("0.13", "0.7-0.13"), ("0.15", "0.14-0.15")])
def test_legacy_layouts_know_only_the_exact_map(layout, family):
    assert resolve_rotation_map([EXACT], "auto", layout) == (EXACT, [])
    assert resolve_rotation_map([EXACT], "exact", layout) == (EXACT, [])
    for choice in ("neumann", "neumann:3"):
        with pytest.raises(OftMergeError, match=rf"PEFT {family} adapters only know the exact Cayley map; got cayley='{choice}'"):
            resolve_rotation_map([EXACT], choice, layout)


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        ("neumann:x", r"cayley='neumann:x': expected neumann:N with an integer N"),
        ("neumann:0", r"cayley='neumann:0': the Cayley-Neumann series needs N >= 1 terms .*neumann:5"),
        ("neumann:-3", r"cayley='neumann:-3': the Cayley-Neumann series needs N >= 1 terms"),
        ("neumann:", r"cayley='neumann:': expected neumann:N with an integer N"),
        ("neumannish", r"cayley must be 'auto', 'exact', 'neumann' or 'neumann:N', got 'neumannish'"),
        ("bogus", r"cayley must be 'auto', 'exact', 'neumann' or 'neumann:N', got 'bogus'"),
    ],
)
def test_bad_rotation_map_choice(choice, message):
    with pytest.raises(OftMergeError, match=message):
        resolve_rotation_map([N5], choice, "0.18")


# -- output_layout -----------------------------------------------------------------------------------------


def test_output_layout_follows_the_inputs():
    new = oft("new", {"lin": (16, 4)})
    old = oft("old", {"lin": (16, 4)}, release="0.13")
    legacy = oft("legacy", {"lin": (16, 4)}, release="0.15")
    assert (new.release, old.release, legacy.release) == ("0.18", "0.13", "0.15")
    assert output_layout([new]) == "0.18"
    assert output_layout([old, old]) == "0.13"
    assert output_layout([legacy, new]) == "0.18"  # no oft_s: the current layout expresses it
    with pytest.raises(IncompatibleAdaptersError, match=r"old: PEFT 0.7-0.13 adapters rotate the output side"):
        output_layout([new, old])


# -- choose_block_config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grids", "prefer", "expected"),
    [
        # one module: the smallest blocks on the grid; r=4 and oft_block_size=4 give the same blocks: the inputs' own
        ({"q": (16, 4)}, (0, 4), BlockConfig(0, 4, {"q": 4})),
        ({"q": (16, 4)}, (4, 0), BlockConfig(4, 0, {"q": 4})),
        # a grid coarser than the inputs' block size: oft_block_size=8 on both widths (r=3 also gives 8 and 8,
        # but PEFT adjusts 3 on the 16-wide layer)
        ({"q": (16, 8), "v": (24, 8)}, (0, 4), BlockConfig(0, 8, {"q": 8, "v": 8})),
        # widths 16 and 24 on grid 4: oft_block_size=4 fits both; r=6 would too, but PEFT adjusts it on 16
        ({"a": (16, 4), "b": (24, 4)}, None, BlockConfig(0, 4, {"a": 4, "b": 4})),
        # grids 8 and 12: oft_block_size=12 needs an adjustment (12 -> 8 on the 16-wide layer), r=2 gives both exactly
        ({"a": (16, 8), "b": (24, 12)}, (0, 4), BlockConfig(2, 0, {"a": 8, "b": 12})),
        # fewest parameters first: blocks of 8 on every layer beat the inputs' r=1 (whole-width blocks)
        ({"a": (16, 8), "b": (16, 8)}, (1, 0), BlockConfig(0, 8, {"a": 8, "b": 8})),
        # among equals (oft_block_size=8 and r=2 both give 8 on 16-wide layers), the inputs' own
        ({"a": (16, 4), "b": (16, 8)}, (2, 0), BlockConfig(2, 0, {"a": 8, "b": 8})),
        ({"a": (16, 4), "b": (16, 8)}, (0, 8), BlockConfig(0, 8, {"a": 8, "b": 8})),
    ],
)
def test_block_config_peft_will_honour(grids, prefer, expected):
    got = choose_block_config(grids, prefer=prefer)
    assert (got.r, got.oft_block_size, dict(got.sizes)) == (expected.r, expected.oft_block_size, dict(expected.sizes))
    assert all(got.sizes[n] % g == 0 and f % got.sizes[n] == 0 for n, (f, g) in grids.items())


def test_block_config_of_a_plan_prefers_the_inputs_r():
    a = oft("a", {"m.q": (16, 4), "m.v": (24, 6)}, oft_block_size=0, r=4)
    b = oft("b", {"m.q": (16, 4), "m.v": (24, 6)}, oft_block_size=0, r=4)
    blocks, shared = block_config([a, b], plan_modules([a, b]), "0.18")
    assert (blocks.r, blocks.oft_block_size, dict(blocks.sizes), shared) == (4, 0, {"m.q": 4, "m.v": 6}, False)


# -- output_config ----------------------------------------------------------------------------------------------


def test_output_config_keeps_target_modules_when_the_inputs_agree():
    modules = {"model.layers.0.q_proj": (16, 4), "model.layers.0.v_proj": (16, 4)}
    a = oft("a", modules, target_modules=["v_proj", "q_proj"], exclude_modules=["lm_head"], task_type="CAUSAL_LM")
    b = oft("b", modules, target_modules=["v_proj", "q_proj"], exclude_modules=["lm_head"], task_type="CAUSAL_LM")
    _, _, config, warnings = plan(a, b)
    assert config["target_modules"] == ["q_proj", "v_proj"]  # sorted
    assert config["exclude_modules"] == ["lm_head"] and config["task_type"] == "CAUSAL_LM"
    assert config["use_cayley_neumann"] is True and config["num_cayley_neumann_terms"] == 5
    assert (config["r"], config["oft_block_size"], config["block_share"], config["coft"]) == (0, 4, False, False)
    assert warnings == []


def test_output_config_lists_module_paths_when_the_inputs_differ():
    a = oft("a", {"model.layers.0.q_proj": (16, 4)}, target_modules=["q_proj"], exclude_modules=["lm_head"], task_type="CAUSAL_LM")
    b = oft("b", {"model.layers.0.q_proj": (16, 4), "model.layers.0.v_proj": (16, 4)}, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    _, _, config, warnings = plan(a, b)
    assert config["target_modules"] == ["model.layers.0.q_proj", "model.layers.0.v_proj"]
    assert config["exclude_modules"] is None and config["layers_to_transform"] is None and config["layers_pattern"] is None
    assert config["task_type"] is None
    assert warnings == ["inputs have different task_type values ['CAUSAL_LM', 'SEQ_CLS']: the output has none"]


def test_output_config_of_mixed_maps_is_exact():
    a = oft("a", {"lin": (16, 4)}, use_cayley_neumann=False)
    b = oft("b", {"lin": (16, 8)}, num_cayley_neumann_terms=3)
    _, blocks, config, warnings = plan(a, b)
    assert config["use_cayley_neumann"] is False and config["num_cayley_neumann_terms"] == 5
    assert (config["r"], config["oft_block_size"]) == (blocks.r, blocks.oft_block_size) and dict(blocks.sizes) == {"lin": 8}
    assert len(warnings) == 1 and "different rotation maps" in warnings[0]


def test_target_modules_compared_as_sets():
    """Two inputs listing the same target_modules in another order target the same modules: keep the names."""
    modules = {"model.layers.0.q_proj": (16, 4), "model.layers.0.v_proj": (16, 4)}
    a = oft("a", modules, target_modules=["q_proj", "v_proj"])
    b = oft("b", modules, target_modules=["v_proj", "q_proj"])
    _, _, config, _ = plan(a, b)
    assert config["target_modules"] == ["q_proj", "v_proj"]
