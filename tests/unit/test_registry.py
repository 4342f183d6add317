"""oftmerge.methods: the two registries (so(d) and Euclidean), their errors, the texts generated from them
(describe_methods, methods_table) and the CLI choices that must follow them."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import oftmerge.methods.registry as registry_module
from oftmerge.cli import build_parser
from oftmerge.errors import OftMergeError
from oftmerge.methods import EUCLIDEAN, ORTHOGONAL, MergeMethod, MethodOption, Registry, available_methods, describe_methods, get_method, methods_table
from oftmerge.methods.euclidean import get_euclidean_method

SO_NAMES = ["orthomerge", "mean_q", "mean_r", "sequential", "karcher"]
EUCLIDEAN_NAMES = ["ta", "ties", "dare", "tsv"]
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def test_registry_names_in_order():
    assert list(ORTHOGONAL.all()) == SO_NAMES
    assert list(EUCLIDEAN.all()) == EUCLIDEAN_NAMES
    assert list(available_methods()) == SO_NAMES
    assert ORTHOGONAL.kind == "so(d)" and EUCLIDEAN.kind == "euclidean"
    for name in SO_NAMES:
        assert get_method(name) is ORTHOGONAL.get(name) and ORTHOGONAL.get(name).name == name
    for name in EUCLIDEAN_NAMES:
        assert get_euclidean_method(name) is EUCLIDEAN.get(name) and EUCLIDEAN.get(name).name == name
    assert ORTHOGONAL.all() is not ORTHOGONAL.all()  # a copy each time


@pytest.mark.parametrize("reg, names, other", [(ORTHOGONAL, SO_NAMES, "ties"), (EUCLIDEAN, EUCLIDEAN_NAMES, "orthomerge")])
def test_get_unknown_raises_one_line_listing_the_choices(reg, names, other):
    for bad in ("nope", other, "", "OrthoMerge"):
        with pytest.raises(OftMergeError) as info:
            reg.get(bad)
        msg = str(info.value)
        assert "\n" not in msg and repr(bad) in msg and reg.label in msg
        assert msg.endswith("choose one of: " + ", ".join(names))


def test_registering_a_name_twice_raises():
    reg = Registry("so(d)", "test method", "--test")
    m = MergeMethod("x", lambda qs, w: (qs[0], {}), "x", "x")
    reg.add(m)
    with pytest.raises(RuntimeError, match="'x' registered twice"):
        reg.add(m)
    with pytest.raises(RuntimeError, match="registered twice"):
        ORTHOGONAL.add(ORTHOGONAL.get("orthomerge"))
    assert list(ORTHOGONAL.all()) == SO_NAMES


def test_describe_methods_mentions_every_method_and_option():
    text = describe_methods()
    for reg in (ORTHOGONAL, EUCLIDEAN):
        for m in reg.all().values():
            assert re.search(rf"^  {re.escape(m.name)}\s", text, re.M), m.name
            assert m.summary in text and m.reference in text
            for o in m.options:
                assert f"--option {o.name}=<{o.type.__name__}> (default {o.default}): {o.help}" in text, (m.name, o.name)
    assert text.index("orthomerge") < text.index("karcher") < text.index("  ta ") < text.index("  tsv ")


def _cells(row: str) -> list[str]:
    assert row.startswith("|") and row.endswith("|"), row
    return [c.strip().replace("\\|", "|") for c in UNESCAPED_PIPE.split(row)[1:-1]]


def test_methods_table_one_row_per_method_and_escaped_pipes():
    lines = methods_table().splitlines()
    assert methods_table().endswith("\n")
    header, rule, *rows = lines
    assert rule == "|---|---|---|---|---|"
    assert len(rows) == len(SO_NAMES) + len(EUCLIDEAN_NAMES) == 9
    pipes = {len(UNESCAPED_PIPE.findall(line)) for line in lines}
    assert pipes == {6}, [line for line in lines if len(UNESCAPED_PIPE.findall(line)) != 6]
    by_name = {}
    for row in rows:
        kind, name, summary, options, reference = _cells(row)
        by_name[name.strip("`")] = (kind, summary, options, reference)
    assert list(by_name) == SO_NAMES + EUCLIDEAN_NAMES
    for reg in (ORTHOGONAL, EUCLIDEAN):
        for m in reg.all().values():
            kind, summary, options, reference = by_name[m.name]
            assert kind == reg.kind and summary == m.summary and reference == m.reference
            assert (options == "—") == (not m.options)
            for o in m.options:
                assert f"`{o.name}` ({o.default}): {o.help}" in options
    # the orthomerge cancel_tol help has '||S||' in it: escaped, so the row did not split
    assert "||S||" in by_name["orthomerge"][2]


def test_methods_table_escapes_pipes_in_every_text_cell(monkeypatch):
    reg = Registry("so(d)", "test method", "--test")
    reg.add(MergeMethod(
        "piped", lambda qs, w: (qs[0], {}), "keeps ||S|| | and a|b", "ref | with pipes",
        (MethodOption("tol", float, 0.5, "below ||Q||_F"), MethodOption("k", int, 2, "plain")),
    ))  # fmt: skip
    monkeypatch.setattr(registry_module, "REGISTRIES", (reg,))
    lines = methods_table().splitlines()
    assert len(lines) == 3
    assert len(UNESCAPED_PIPE.findall(lines[2])) == 6
    kind, name, summary, options, reference = _cells(lines[2])
    assert (kind, name, summary, reference) == ("so(d)", "`piped`", "keeps ||S|| | and a|b", "ref | with pipes")
    assert options == "`tol` (0.5): below ||Q||_F<br>`k` (2): plain"


def test_registered_methods_are_callable_on_a_tiny_stack():
    qs = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    qs[0, 0, 0, 1], qs[0, 0, 1, 0] = 0.1, -0.1
    qs[1, 0, 1, 2], qs[1, 0, 2, 1] = 0.2, -0.2
    for name in SO_NAMES:
        m = ORTHOGONAL.get(name)
        out, stats = m(qs, torch.ones(2, dtype=torch.float64), **m.option_defaults())
        assert out.shape == (1, 3, 3) and isinstance(stats, dict)
        assert torch.allclose(out, -out.transpose(-1, -2), atol=1e-10), name


# -- the CLI follows the registries ---------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


def test_cli_choices_equal_the_registries():
    subs = _subparsers(build_parser())
    merge_method = _option(subs["merge"], "--method")
    assert list(merge_method.choices) == list(ORTHOGONAL.all())
    assert merge_method.default == "orthomerge"
    euclidean = _option(subs["decouple"], "--euclidean")
    assert list(euclidean.choices) == list(EUCLIDEAN.all())
    assert euclidean.default in EUCLIDEAN.all()
    orthogonal = _option(subs["decouple"], "--orthogonal")
    assert list(orthogonal.choices) == [*ORTHOGONAL.all(), "none"]
    assert orthogonal.default in ORTHOGONAL.all()


def test_cli_rejects_a_method_outside_the_registry(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["merge", "a", "b", "--method", "ties"])
    assert info.value.code == 2
    assert "invalid choice: 'ties'" in capsys.readouterr().err
