"""docs/methods.md is what scripts/gen_methods_doc.py writes from the registry now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gen_methods_doc", ROOT / "scripts" / "gen_methods_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_page_is_generated_from_the_registry():
    script = _script()
    stored = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    assert stored == script.render(), "docs/methods.md is out of date: run .venv/bin/python scripts/gen_methods_doc.py"


def test_methods_page_lists_every_registered_method():
    from oftmerge.methods import EUCLIDEAN, ORTHOGONAL

    text = _script().render()
    for registry in (ORTHOGONAL, EUCLIDEAN):
        for name, method in registry.all().items():
            assert f"| `{name}` |" in text
            for option in method.options:
                assert f"`{option.name}` ({option.default})" in text


def test_a_new_method_changes_the_page():
    from oftmerge.methods import ORTHOGONAL, MergeMethod

    script = _script()
    before = script.render()
    name = "_doc_probe"
    ORTHOGONAL.add(MergeMethod(name, lambda qs, w: (qs[0], {}), "probe", "none"))
    try:
        assert script.render() != before
    finally:
        ORTHOGONAL._methods.pop(name)
    assert script.render() == before
