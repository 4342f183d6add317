"""Shared helpers: tiny models and real PEFT OFT adapters with non-trivial generators."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


class TinyNet(torch.nn.Module):
    """Linear layers of several shapes (square, wide, tall), an embedding and a 3x3 conv."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(20, 16)
        self.lin_sq = torch.nn.Linear(16, 16)
        self.lin_wide = torch.nn.Linear(16, 24)  # in 16 -> out 24
        self.lin_tall = torch.nn.Linear(24, 8)
        self.conv = torch.nn.Conv2d(2, 4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.lin_sq(h))
        h = torch.tanh(self.lin_wide(h))
        out = self.lin_tall(h)
        if img is not None:
            out = out + self.conv(img).mean((1, 2, 3)).view(-1, 1, 1)
        return out


def make_oft_adapter(
    path: Path,
    *,
    seed: int,
    targets: Sequence[str] = ("lin_sq", "lin_wide", "lin_tall"),
    std: float = 0.05,
    model_seed: int = 0,
    **config,
) -> torch.nn.Module:
    """Create a PEFT (installed release) OFT adapter with random generators, save it, return the PeftModel."""
    from peft import OFTConfig, get_peft_model

    config.setdefault("oft_block_size", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(TinyNet(model_seed), OFTConfig(target_modules=list(targets), **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(str(path))
    model.eval()
    return model


def load_peft(path: Path, model_seed: int = 0):
    from peft import PeftModel

    return PeftModel.from_pretrained(TinyNet(model_seed), str(path)).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.arange(12).reshape(3, 4) % 20


@pytest.fixture
def img() -> torch.Tensor:
    return torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(7))


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
