"""oftmerge.config: MergeConfig / FoldConfig / DecoupleConfig / RunOptions are validated once (one-line errors
that name the bad value), frozen, and round-trip through a JSON-able dict. Nothing here reads an input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from oftmerge.config import DecoupleConfig, FoldConfig, MergeConfig, RunOptions
from oftmerge.errors import OftMergeError
from oftmerge.methods import EUCLIDEAN, ORTHOGONAL

A = ("adapters/oft-upper", "adapters/oft-reverse")
BASE = "adapters/base"
EXPERTS = ("lora-a", "full-c")


def one_line_error(build, *needles: str) -> str:
    """``build()`` raises OftMergeError with a one-line message containing every needle; returns the message."""
    with pytest.raises(OftMergeError) as info:
        build()
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# -- MergeConfig ---------------------------------------------------------------------------------------


def test_merge_config_no_adapters():
    one_line_error(lambda: MergeConfig([]), "no adapters")
    one_line_error(lambda: MergeConfig(()), "no adapters")


def test_merge_config_wrong_weight_count():
    one_line_error(lambda: MergeConfig(A, weights=[1.0]), "1 weights", "2 adapters")
    one_line_error(lambda: MergeConfig(A, weights=[1, 1, 1]), "3 weights", "2 adapters")


@pytest.mark.parametrize("bad", [0, 0.0, math.inf, -math.inf, math.nan], ids=["0", "0.0", "inf", "-inf", "nan"])
def test_merge_config_bad_weight_names_the_value_and_the_adapter(bad):
    one_line_error(lambda: MergeConfig(A, weights=[1.0, bad]), repr(float(bad)), A[1])


def test_merge_config_non_numeric_weights():
    one_line_error(lambda: MergeConfig(A, weights=[1.0, "heavy"]), "'heavy'")


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "big"], ids=["inf", "-inf", "nan", "str"])
def test_merge_config_non_finite_scale(bad):
    one_line_error(lambda: MergeConfig(A, scale=bad), "scale", repr(bad))


def test_merge_config_unknown_method_lists_the_choices():
    msg = one_line_error(lambda: MergeConfig(A, method="average"), "'average'")
    for name in ORTHOGONAL.all():
        assert name in msg


def test_merge_config_unknown_method_option():
    one_line_error(lambda: MergeConfig(A, method_options={"density": 0.3}), "'density'", "orthomerge", "per_block")
    # a method without options says so
    one_line_error(lambda: MergeConfig(A, method="mean_q", method_options={"per_block": True}), "'per_block'", "none")


def test_merge_config_bad_option_type():
    one_line_error(lambda: MergeConfig(A, method_options={"cancel_tol": "tiny"}), "'cancel_tol'", "float", "'tiny'")


def test_merge_config_bool_option_from_a_string_is_not_silently_true():
    try:
        opts = MergeConfig(A, method_options={"per_block": "false"}).method_options
    except OftMergeError:
        return  # refusing the string is fine too
    assert opts["per_block"] is False


def test_merge_config_output_model_needs_a_base():
    one_line_error(lambda: MergeConfig(A, output="model"), "output='model'", "base")
    one_line_error(lambda: MergeConfig(A, output="tarball", base=BASE), "output='tarball'")
    assert MergeConfig(A, output="model", base=BASE).output == "model"


def test_merge_config_peft_release_tuple_of_wrong_length():
    one_line_error(lambda: MergeConfig(A, peft_release=("0.18",)), "peft_release", "1 values", "2 adapters")
    one_line_error(lambda: MergeConfig(A, peft_release=["0.18", None, "0.15"]), "3 values")
    c = MergeConfig(A, peft_release=["0.16", None])
    assert c.peft_release == ("0.16", None) and c.releases() == ["0.16", None]
    assert MergeConfig(A, peft_release="0.16").releases() == ["0.16", "0.16"]


def test_merge_config_normalises_inputs():
    from pathlib import Path

    c = MergeConfig([Path(A[0]), A[1]], weights=[1, 2], base=Path(BASE))
    assert c.adapters == A and c.weights == (1.0, 2.0) and c.base == BASE
    assert all(type(w) is float for w in c.weights)
    assert MergeConfig(A[0]).adapters == (A[0],)  # one path, not its characters


# -- RunOptions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.5, "2"], ids=["0", "-1", "True", "False", "1.5", "str"])
def test_run_options_bad_threads(bad):
    one_line_error(lambda: RunOptions(threads=bad), "threads", repr(bad))


def test_run_options_good_threads():
    assert RunOptions(threads=None).threads is None and RunOptions(threads=3).threads == 3


@pytest.mark.parametrize("bad", ["5 parsecs", "GB", 0, -5, ""], ids=["unit", "no-number", "0", "neg", "empty"])
def test_run_options_bad_shard_size(bad):
    one_line_error(lambda: RunOptions(shard_size=bad), "shard size", repr(bad) if isinstance(bad, str) else str(bad))


# -- DecoupleConfig ---------------------------------------------------------------------------------------


def test_decouple_config_unknown_euclidean_method():
    msg = one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, euclidean="avg"), "'avg'")
    assert all(name in msg for name in EUCLIDEAN.all())


def test_decouple_config_unknown_orthogonal_method():
    msg = one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, orthogonal="avg"), "'avg'")
    assert all(name in msg for name in ORTHOGONAL.all())


@pytest.mark.parametrize("key", ["target", "procrustes", "on_domain_error"])
def test_decouple_config_bad_choice(key):
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, **{key: "sideways"}), key, "'sideways'")


@pytest.mark.parametrize("key", ["anchor", "cayley_margin", "max_rotation"])
@pytest.mark.parametrize("bad", [-1e-6, math.nan, math.inf], ids=["neg", "nan", "inf"])
def test_decouple_config_bad_number(key, bad):
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, **{key: bad}), key, repr(bad))


def test_decouple_config_anchor_not_a_number():
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, anchor="1e-6"), "anchor", "'1e-6'")


def test_decouple_config_bad_regex():
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, euclidean_only=("lm_head", "layers.(")), "'layers.('", "euclidean_only")


def test_decouple_config_euclidean_only_one_string_is_one_pattern():
    assert DecoupleConfig(BASE, EXPERTS, euclidean_only="lm_head").euclidean_only == ("lm_head",)


def test_decouple_config_no_experts():
    one_line_error(lambda: DecoupleConfig(BASE, ()), "no experts")


def test_decouple_config_weights_and_options():
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, weights=[1.0]), "1 weights", "2 experts")
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, weights=[1.0, 0.0]), "0.0", EXPERTS[1])
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, euclidean_options={"p": 0.5}), "'p'", "ties")
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, euclidean_options={"density": "most"}), "'density'", "'most'")
    one_line_error(lambda: DecoupleConfig(BASE, EXPERTS, orthogonal_options={"density": 0.1}), "'density'", "orthomerge")


def test_decouple_config_orthogonal_none_spellings():
    for spelling in (None, "none", ""):
        c = DecoupleConfig(BASE, EXPERTS, orthogonal=spelling, orthogonal_options={"per_block": True})
        assert c.orthogonal is None and c.orthogonal_options == {}
    assert DecoupleConfig(BASE, EXPERTS[0]).experts == (EXPERTS[0],)


def test_fold_config_needs_a_base():
    one_line_error(lambda: FoldConfig(A[0], None), "base")


# -- serialisation, options resolved, frozen -----------------------------------------------------------


CONFIGS = {
    "merge-default": lambda: MergeConfig(A),
    "merge-full": lambda: MergeConfig(
        A,
        method="karcher",
        weights=[1, -0.5],
        scale=0.9,
        cayley="neumann:4",
        base=BASE,
        peft_release=("0.18", None),
        allow_base_mismatch=True,
        output="model",
    ),
    "merge-options": lambda: MergeConfig(A, method_options={"per_block": True, "cancel_tol": 1e-3}),
    "fold": lambda: FoldConfig(A[0], BASE, peft_release="0.16", hash_base=True, push_to_hub="me/model", private=True),
    "decouple-default": lambda: DecoupleConfig(BASE, EXPERTS),
    "decouple-full": lambda: DecoupleConfig(
        BASE,
        EXPERTS,
        euclidean="dare",
        orthogonal="mean_q",
        target="conflict",
        procrustes="fast",
        weights=[2, 1],
        euclidean_options={"p": 0.3, "seed": 4},
        anchor=0.0,
        cayley_margin=0.5,
        max_rotation=1.5,
        on_domain_error="error",
        euclidean_only=(r"lm_head", r"\.norm\."),
    ),
    "decouple-no-orthogonal": lambda: DecoupleConfig(BASE, EXPERTS, euclidean="tsv", orthogonal="none"),
    "run-default": lambda: RunOptions(),
    "run-full": lambda: RunOptions(threads=None, shard_size=12345, overwrite=True, dry_run=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_to_dict_is_json_and_from_dict_round_trips(name):
    c = CONFIGS[name]()
    d = c.to_dict()
    text = json.dumps(d)
    again = type(c).from_dict(json.loads(text))
    assert again == c
    assert again.to_dict() == d
    assert json.dumps(again.to_dict()) == text


@pytest.mark.parametrize("cls", [MergeConfig, FoldConfig, DecoupleConfig, RunOptions])
def test_from_dict_unknown_key_names_it(cls):
    good = {MergeConfig: {"adapters": list(A)}, FoldConfig: {"adapter": A[0], "base": BASE},
            DecoupleConfig: {"base": BASE, "experts": list(EXPERTS)}, RunOptions: {}}[cls]  # fmt: skip
    cls.from_dict(good)
    one_line_error(lambda: cls.from_dict({**good, "wieghts": [1, 2]}), "wieghts", cls.__name__)


def test_method_options_resolved_to_defaults():
    d = MergeConfig(A).to_dict()
    assert d["method_options"] == ORTHOGONAL.get("orthomerge").option_defaults() and d["method_options"]
    assert MergeConfig(A, method_options={"per_block": True}).to_dict()["method_options"] == {
        **ORTHOGONAL.get("orthomerge").option_defaults(),
        "per_block": True,
    }
    assert MergeConfig(A, method="mean_r").to_dict()["method_options"] == {}
    d = DecoupleConfig(BASE, EXPERTS, euclidean="dare", euclidean_options={"p": "0.25"}).to_dict()
    assert d["euclidean_options"] == {**EUCLIDEAN.get("dare").option_defaults(), "p": 0.25}
    assert d["orthogonal_options"] == ORTHOGONAL.get("orthomerge").option_defaults()
    # a default spelled out equals the default left out
    assert MergeConfig(A) == MergeConfig(A, method_options=ORTHOGONAL.get("orthomerge").option_defaults())


@pytest.mark.parametrize("name", ["merge-default", "fold", "decouple-default", "run-default"])
def test_configs_are_frozen(name):
    c = CONFIGS[name]()
    field = dataclasses.fields(c)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(c, field, getattr(c, field))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.new_attribute = 1  # type: ignore[attr-defined]


def test_run_options_progress_is_neither_serialised_nor_compared():
    calls = []
    with_progress = RunOptions(threads=2, progress=lambda done, total, name: calls.append(name))
    assert "progress" not in with_progress.to_dict()
    assert with_progress == RunOptions(threads=2)
    assert with_progress != RunOptions(threads=3)
    assert RunOptions.from_dict(with_progress.to_dict()).progress is None
    assert "progress" not in repr(with_progress)
    with_progress.progress(1, 1, "x")
    assert calls == ["x"]
