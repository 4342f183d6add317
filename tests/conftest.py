"""Fixtures shared by every layer of the suite (helpers that are not fixtures live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import make_llama_adapter, make_oft_adapter, save_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.arange(12).reshape(3, 4) % 20


@pytest.fixture
def img() -> torch.Tensor:
    return torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def pair(tmp_path):
    """Two PEFT OFT adapters of TinyNet (block size 4, Cayley-Neumann), seeds 1 and 2."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1)
    make_oft_adapter(b, seed=2)
    return a, b


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """Tiny Llama bases (float32 one file, float32 sharded, bf16) and OFT adapters (Neumann default, exact), made once."""
    root = tmp_path_factory.mktemp("llama")
    bases = {
        "f32": save_llama(root / "f32"),
        "f32-sharded": save_llama(root / "f32-sharded", max_shard_size="50KB"),
        "bf16": save_llama(root / "bf16", dtype=torch.bfloat16),
    }
    adapters = {
        "neumann": make_llama_adapter(root / "neumann", bases["f32"], seed=1),
        "exact": make_llama_adapter(root / "exact", bases["f32"], seed=2, use_cayley_neumann=False, oft_block_size=16),
        "neumann-b": make_llama_adapter(root / "neumann-b", bases["f32"], seed=3, targets=["q_proj", "v_proj", "down_proj"]),
    }
    return {"root": root, "bases": bases, "adapters": adapters}


# -- output record: OFTMERGE_RECORD_OUTPUTS=FILE.jsonl records the SHA-256 of every file a test wrote
# under its tmp_path (text files with tmp_path / the repository root replaced by placeholders), so that a
# refactoring can be checked byte for byte against a record made before it (scripts/compare_outputs.py).


def _record_outputs(nodeid: str, root: Path, record: str) -> None:
    import hashlib
    import json as _json

    files = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        data = p.read_bytes()
        if p.suffix in (".json", ".md", ".txt", ".yaml"):
            data = data.replace(str(root).encode(), b"<tmp>").replace(str(ROOT).encode(), b"<repo>")
            # PEFT records the module of the model class; TinyNet moved from conftest.py to helpers.py
            data = data.replace(b'"parent_library": "helpers"', b'"parent_library": "conftest"')
        files[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    if files:
        with open(record, "a", encoding="utf-8") as f:
            f.write(_json.dumps({"test": nodeid, "files": files}) + "\n")


@pytest.fixture(autouse=True)
def _output_record(request):
    import os

    record = os.environ.get("OFTMERGE_RECORD_OUTPUTS")
    if not record:
        yield
        return
    root = request.getfixturevalue("tmp_path")
    yield
    _record_outputs(request.node.nodeid, root, record)
