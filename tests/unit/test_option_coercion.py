"""Method options are coerced strictly and range-checked (issue 16, item 6); CLI parsing helpers."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest

from oftmerge.cli.common import attach_negative_values, finite_json, parse_options, print_report
from oftmerge.errors import OftMergeError
from oftmerge.methods import EUCLIDEAN, ORTHOGONAL, MethodOption, get_method
from oftmerge.methods.euclidean import get_euclidean_method

ROOT = Path(__file__).resolve().parents[2]

ADAPTERS = [str(ROOT / "adapters" / "oft-upper"), str(ROOT / "adapters" / "oft-reverse")]
BOOL = MethodOption("flag", bool, False, "")
INT = MethodOption("k", int, 0, "")
FLOAT = MethodOption("x", float, 0.5, "")
UNIT = MethodOption("tol", float, 1e-4, "", minimum=0.0, maximum=1.0)
OPEN = MethodOption("p", float, 0.5, "", minimum=0.0, maximum=1.0, exclusive_maximum=True)
CHOICE = MethodOption("trim", str, "tensor", "", choices=("tensor", "model"))


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("true", True), ("False", False), ("YES", True), ("no", False), ("1", True),
     ("0", False), (" yes ", True), (1, True), (0, False)],
)  # fmt: skip
def test_bool_accepts_only_real_booleans_and_their_words(value, expected):
    assert BOOL.coerce(value) is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", "on", "y", 2, -1, 0.5, 1.0, None, [True]])
def test_bool_refuses_everything_else(value):
    with pytest.raises(OftMergeError, match=r"option 'flag' of method 'm' expects bool, got .* \(give true/false"):
        BOOL.coerce(value, "m")


@pytest.mark.parametrize("value, expected", [(3, 3), (-2, -2), (2.0, 2), ("7", 7), ("-7", -7), ("1e3", 1000), (" 4 ", 4), ("5.0", 5)])
def test_int_takes_integral_values(value, expected):
    got = INT.coerce(value)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [1.7, "1.7", True, False, "x", math.inf, math.nan, "nan", None])
def test_int_never_truncates_nor_takes_a_bool(value):
    with pytest.raises(OftMergeError, match="expects int"):
        INT.coerce(value)


@pytest.mark.parametrize("value, expected", [(1, 1.0), (0.25, 0.25), ("1e-3", 1e-3), ("-2", -2.0), (10**30, 1e30)])
def test_float_takes_finite_numbers(value, expected):
    got = FLOAT.coerce(value)
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", math.nan, math.inf, "1e400", 10**400, True, "tiny", None])
def test_float_refuses_non_finite_and_non_numbers(value):
    with pytest.raises(OftMergeError, match="expects float"):
        FLOAT.coerce(value)


@pytest.mark.parametrize("option, good, bad", [
    (UNIT, [0.0, 1e-4, 1.0, "0.5"], [-5, "-1e-9", 1.0000001, 2]),
    (OPEN, [0.0, 0.999], [1.0, "1", -0.1]),
    (MethodOption("d", float, 0.2, "", minimum=0.0, maximum=1.0, exclusive_minimum=True), [1e-9, 1.0], [0.0, "0"]),
    (MethodOption("n", int, 1, "", minimum=1), [1, "3"], [0, "-1"]),
])  # fmt: skip
def test_ranges_are_checked(option, good, bad):
    for v in good:
        option.coerce(v)
    for v in bad:
        with pytest.raises(OftMergeError, match=rf"must be {re.escape(option.describe_range())}, got {re.escape(repr(v))}"):
            option.coerce(v)


def test_choices_and_strings():
    assert CHOICE.coerce("model") == "model"
    with pytest.raises(OftMergeError, match=r"must be one of 'tensor', 'model', got 'layer'"):
        CHOICE.coerce("layer")
    with pytest.raises(OftMergeError, match="expects str"):
        CHOICE.coerce(3)


def test_describe_range():
    assert UNIT.describe_range() == "in [0, 1]"
    assert OPEN.describe_range() == "in [0, 1)"
    assert MethodOption("n", int, 1, "", minimum=1).describe_range() == ">= 1"
    assert MethodOption("n", float, 1, "", maximum=2, exclusive_maximum=True).describe_range() == "< 2"
    assert FLOAT.describe_range() == "" and CHOICE.describe_range() == "one of 'tensor', 'model'"


def test_every_registered_default_passes_its_own_check():
    for registry in (ORTHOGONAL, EUCLIDEAN):
        for m in registry.all().values():
            assert m.resolve_options({}) == m.option_defaults()
            for o in m.options:
                assert o.coerce(o.default, m.name) == o.default, (m.name, o.name)


@pytest.mark.parametrize("method, key, value, needle", [
    ("orthomerge", "per_block", "maybe", "expects bool, got 'maybe'"),
    ("orthomerge", "cancel_tol", -5, "must be in [0, 1], got -5"),
    ("orthomerge", "cancel_tol", math.nan, "expects float, got nan"),
    ("ties", "density", 1.5, "must be in (0, 1], got 1.5"),
    ("ties", "density", 0, "must be in (0, 1], got 0"),
    ("ties", "trim", "layer", "must be one of 'tensor', 'model'"),
    ("dare", "p", 1.0, "must be in [0, 1), got 1.0"),
    ("dare", "seed", 1.7, "expects int, got 1.7"),
    ("tsv", "fraction", -0.1, "must be in [0, 1]"),
    ("ta", "scale", "inf", "expects float, got 'inf'"),
])  # fmt: skip
def test_registered_options_refuse_out_of_range_values(method, key, value, needle):
    m = get_method(method) if method in ORTHOGONAL.all() else get_euclidean_method(method)
    with pytest.raises(OftMergeError) as info:
        m.resolve_options({key: value})
    assert needle in str(info.value) and f"of method {method!r}" in str(info.value) and "\n" not in str(info.value)


def test_cli_option_strings_resolve_as_before():
    """What the CLI passes (strings) gives the values the old bool-first parsing gave, for every valid input."""
    om = get_method("orthomerge")
    assert om.resolve_options(parse_options(["per_block=true", "cancel_tol=1e-3"])) == {"per_block": True, "cancel_tol": 1e-3}
    assert om.resolve_options(parse_options(["per_block=0"]))["per_block"] is False
    dare = get_euclidean_method("dare")
    assert dare.resolve_options(parse_options(["seed=1", "p=0", "scale=1"])) == {"seed": 1, "p": 0.0, "scale": 1.0}
    assert parse_options(["trim=model", "x=a=b"]) == {"trim": "model", "x": "a=b"}
    with pytest.raises(OftMergeError, match="KEY=VALUE"):
        parse_options(["per_block"])


@pytest.mark.parametrize("argv, expected", [
    (["merge", "A", "--weights", "-1,-1"], ["merge", "A", "--weights=-1,-1"]),
    (["merge", "A", "--weights", "-1.5e-3, 2"], ["merge", "A", "--weights=-1.5e-3, 2"]),
    (["merge", "A", "--scale", "-1e3"], ["merge", "A", "--scale=-1e3"]),
    (["merge", "A", "--scale", "-inf"], ["merge", "A", "--scale=-inf"]),
    (["decouple", "E", "--max-rotation", "-2"], ["decouple", "E", "--max-rotation=-2"]),
    (["merge", "A", "--weights", "1,-1"], ["merge", "A", "--weights", "1,-1"]),  # argparse takes it as it is
    (["merge", "A", "--weights=-1,-1"], ["merge", "A", "--weights=-1,-1"]),
    (["merge", "A", "--weights", "-o", "out"], ["merge", "A", "--weights", "-o", "out"]),  # a flag, not a value
    (["merge", "A", "--output", "-1,-1"], ["merge", "A", "--output", "-1,-1"]),  # not a numeric option
    (["merge", "--", "--weights", "-1,-1"], ["merge", "--", "--weights", "-1,-1"]),
    (["merge", "A", "--weights"], ["merge", "A", "--weights"]),
])  # fmt: skip
def test_attach_negative_values(argv, expected):
    assert attach_negative_values(argv) == expected


def test_main_accepts_negative_weight_lists():
    from oftmerge.cli import build_parser, main

    args = build_parser().parse_args(attach_negative_values(["merge", "A", "B", "--weights", "-1,-1", "--scale", "-2e-1"]))
    assert (args.weights, args.scale) == ("-1,-1", -0.2)
    assert main(["merge", *ADAPTERS, "--weights", "-1,-1", "--scale", "-5e-1", "--dry-run", "-q"]) == 0


def test_finite_json_and_the_report_printer(capsys):
    data = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2, "x"), "e": None, "f": True}
    assert finite_json(data) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None, "f": True}
    print_report(argparse.Namespace(json=True), data=lambda: data, text=lambda: "")
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out)["a"] is None
