"""Model cards (read back with huggingface_hub's ModelCard) and the push path (dry run for real; the upload
itself is a straight huggingface_hub call, checked here by recording the call, with no network)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import oftmerge
from oftmerge.cli import main
from oftmerge.errors import OftMergeError
from oftmerge.integrations.cards import adapter_card
from oftmerge.integrations.hub import PushPlan, push_folder

from helpers import GOLDEN, make_oft_adapter

huggingface_hub = pytest.importorskip("huggingface_hub")
GOLDEN_CASE = GOLDEN / "peft-0.21.2" / "embedding"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def folded(tmp_path) -> Path:
    (tmp_path / "base").mkdir()
    shutil.copyfile(GOLDEN_CASE / "base.safetensors", tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "config.json").write_text('{"_name_or_path": "my-org/tiny-base", "architectures": ["Tiny"]}')
    oftmerge.fold_adapter(GOLDEN_CASE / "adapter", tmp_path / "base", tmp_path / "folded")
    return tmp_path / "folded"


def test_adapter_card_loads_back_with_its_provenance(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1)
    make_oft_adapter(b, seed=2)
    result = oftmerge.merge_adapters([a, b], out_dir=tmp_path / "m", method="mean_q")
    card = huggingface_hub.ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "peft"
    assert {"oftmerge", "oft", "mean_q"} <= set(card.data.tags)
    meta = card.data.oftmerge
    assert meta["method"] == "mean_q" and meta["output"] == "adapter"
    assert sorted(i["sha256"] for i in meta["inputs"]) == sorted(_sha256(p / "adapter_model.safetensors") for p in (a, b))
    assert {"oftmerge", "torch", "peft"} <= set(meta["versions"])
    assert "| 0 |" in card.text and "PeftModel.from_pretrained" in card.text
    assert card.data.base_model is None  # the tiny test model has no Hub id
    result.config["base_model_name_or_path"] = "my-org/base-model"
    text = adapter_card(result)
    card = huggingface_hub.ModelCard(text)
    assert card.data.base_model == "my-org/base-model" and card.data.base_model_relation == "adapter"
    assert str(card) == text  # written without ModelCard, the text ModelCard itself would write


def test_folded_model_card_loads_back_with_its_provenance(folded):
    card = huggingface_hub.ModelCard.load(folded / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "my-org/tiny-base" and card.data.base_model_relation == "finetune"
    meta = card.data.oftmerge
    assert meta["method"] == "fold" and meta["output"] == "folded model" and meta["folded_modules"] == 2
    assert meta["inputs"] == [{"path": str((GOLDEN_CASE / "adapter").absolute()), "sha256": _sha256(GOLDEN_CASE / "adapter" / "adapter_model.safetensors")}]
    assert len(meta["base"]["tensors_fingerprint"]) == 64 and "AutoModelForCausalLM" in card.text


def test_push_dry_run_lists_files_and_sizes(folded, capsys):
    (folded / ".cache").mkdir()
    (folded / ".cache" / "x").write_text("not uploaded")
    plan = push_folder(folded, "me/folded-model", dry_run=True)
    assert isinstance(plan, PushPlan) and plan.repo_id == "me/folded-model"
    expected = sorted((p.name, p.stat().st_size) for p in folded.iterdir() if p.is_file())
    assert list(plan.files) == expected and plan.total_bytes == sum(s for _, s in expected)
    assert main(["push", str(folded), "me/folded-model", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    assert "push" in out and "https://huggingface.co/me/folded-model" in out and "[private]" in out
    assert "model.safetensors" in out and f"{plan.total_bytes:,d}  bytes in {len(expected)} files" in out
    assert "dry run: nothing uploaded" in out and ".cache" not in out


def test_push_rejects_bad_input(tmp_path, folded):
    with pytest.raises(OftMergeError, match=r"repo id 'no-namespace': expected NAMESPACE/NAME"):
        push_folder(folded, "no-namespace", dry_run=True)
    with pytest.raises(OftMergeError, match=r"missing: not a directory"):
        push_folder(tmp_path / "missing", "me/x", dry_run=True)


def test_push_is_one_huggingface_hub_commit(folded, monkeypatch):
    """The upload path calls HfApi.create_repo and HfApi.create_commit with every planned file (recorded, not sent)."""
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_commit",
        lambda self, repo_id, operations, **kw: calls.append(("create_commit", repo_id, list(operations), kw)) or "commit-info",
    )
    assert push_folder(folded, "me/folded-model", private=True) == "commit-info"
    (_, repo, kw_repo), (_, repo2, ops, kw_commit) = calls
    assert repo == repo2 == "me/folded-model" and kw_repo["private"] is True and kw_repo["exist_ok"] is True
    plan = push_folder(folded, "me/folded-model", dry_run=True)
    assert [op.path_in_repo for op in ops] == [name for name, _ in plan.files]
    assert all(isinstance(op, huggingface_hub.CommitOperationAdd) for op in ops)
    assert kw_commit["commit_message"].startswith("Upload folded with oftmerge")
