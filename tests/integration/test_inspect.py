"""oftmerge inspect: every number checked against a direct computation (PEFT's own rotation included)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from oftmerge.cli import main
from oftmerge.ops.inspect import inspect_adapters, render_report

from helpers import make_oft_adapter, skew_from_triangles


@pytest.fixture
def adapters(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    model_a = make_oft_adapter(a, seed=1, std=0.3, oft_block_size=4)  # large: the Neumann series is visibly off
    make_oft_adapter(b, seed=2, std=0.05, oft_block_size=8, use_cayley_neumann=False)
    return a, b, model_a


def test_numbers_match_direct_computation(adapters):
    a, b, model_a = adapters
    report = inspect_adapters([a, b])
    ra = report["adapters"][0]
    assert ra["release"] == "0.18" and "Cayley-Neumann, 5 terms" in ra["rotation_map"]
    tensors = load_file(a / "adapter_model.safetensors")
    for m in ra["modules"]:
        vec = tensors[f"base_model.model.{m['name']}.oft_R.weight"]
        q = skew_from_triangles(vec, m["block_size"])
        assert m["q_norm"] == pytest.approx(float(q.norm()), rel=1e-12)
        assert m["block_q_norm"]["max"] == pytest.approx(float(torch.linalg.matrix_norm(q).max()), rel=1e-12)
        assert m["blocks"] == q.shape[0]
        # the rotation PEFT actually applies, from PEFT itself
        layer = dict(model_a.named_modules())[f"base_model.model.{m['name']}"]
        r = layer.oft_R["default"]._cayley_batch(vec.double(), m["block_size"], True, 5)
        eye = torch.eye(m["block_size"], dtype=torch.float64)
        expected = float(torch.linalg.matrix_norm(r.transpose(-1, -2) @ r - eye).max())
        assert m["ortho_error"] == pytest.approx(expected, rel=1e-6)
        assert m["ortho_error"] > 1e-3  # large generators: the series is not a rotation
    assert report["adapters"][1]["ortho_error_max"] < 1e-12  # exact Cayley is a rotation


def test_cosines_and_magnitude_correction(adapters):
    a, b, _ = adapters
    report = inspect_adapters([a, b])
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    cosines, cs = [], []
    for name in ("lin_sq", "lin_wide", "lin_tall"):
        key = f"base_model.model.{name}.oft_R.weight"
        qa = -torch.block_diag(*skew_from_triangles(ta[key], 4))  # Neumann: canonical sign is -Q
        qb = torch.block_diag(*skew_from_triangles(tb[key], 8))
        cosines.append(float((qa * qb).sum() / (qa.norm() * qb.norm())))
        cs.append(float((qa.norm() + qb.norm()) / (qa + qb).norm()))
    pair = report["pairs"][0]
    assert pair["modules"] == 3
    assert pair["cosine"]["min"] == pytest.approx(min(cosines), abs=1e-12)
    assert pair["cosine"]["max"] == pytest.approx(max(cosines), abs=1e-12)
    got = sorted(m["c"] for m in report["merge"]["modules"].values())
    assert got == pytest.approx(sorted(cs), rel=1e-10)
    text = render_report(report)
    assert "cosine between generators" in text and "magnitude correction c" in text


def test_cli_json_and_table(adapters, capsys):
    a, b, _ = adapters
    assert main(["inspect", str(a), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["adapters"]) == 1 and "pairs" not in data
    assert main(["inspect", str(a), str(b), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "more modules" in out and "[0] vs [1]" in out


def test_shared_blocks_count_once_per_block_they_stand_for(tmp_path):
    """A block_share adapter does not store the layer width; another input (or --base) gives it."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_oft_adapter(a, seed=1, oft_block_size=4, block_share=True)
    make_oft_adapter(b, seed=2, oft_block_size=4)
    alone = inspect_adapters([a])["adapters"][0]["modules"]
    both = inspect_adapters([a, b])["adapters"][0]["modules"]
    widths = {"lin_sq": 16, "lin_wide": 16, "lin_tall": 24}  # TinyNet's input widths
    assert [m["name"] for m in alone] == [m["name"] for m in both] and {m["name"] for m in both} == set(widths)
    for m_alone, m_both in zip(alone, both):
        assert m_alone["blocks"] is None and m_both["blocks"] == widths[m_both["name"]] // 4
        assert m_both["q_norm"] == pytest.approx(m_alone["q_norm"] * m_both["blocks"] ** 0.5, rel=1e-12)


def test_shared_block_norms_agree_with_base_or_another_adapter(tmp_path):
    """--base and an unshared adapter give the same ||Q||_F; modules neither covers say they are per stored block."""
    from safetensors.torch import save_file

    from helpers import TinyNet

    a, b, base = tmp_path / "a", tmp_path / "b", tmp_path / "base"
    make_oft_adapter(a, seed=1, oft_block_size=4, block_share=True)
    make_oft_adapter(b, seed=2, oft_block_size=4, targets=("lin_sq",))  # gives the width of lin_sq only
    base.mkdir()
    save_file({k: v.contiguous() for k, v in TinyNet(0).state_dict().items()}, str(base / "model.safetensors"))
    with_base = {m["name"]: m for m in inspect_adapters([a], base=base)["adapters"][0]["modules"]}
    report = inspect_adapters([a, b])  # the two cannot be merged without the widths: reported, not raised
    with_other = {m["name"]: m for m in report["adapters"][0]["modules"]}
    assert "block grid" in report["merge"]["error"]
    assert with_other["lin_sq"]["q_norm"] == pytest.approx(with_base["lin_sq"]["q_norm"], rel=1e-12)
    assert with_other["lin_sq"]["q_norm_of"] == with_base["lin_sq"]["q_norm_of"] == "module"
    for name in ("lin_wide", "lin_tall"):
        assert with_base[name]["q_norm_of"] == "module" and with_other[name]["q_norm_of"] == "stored block"
        assert with_other[name]["q_norm"] == pytest.approx(with_base[name]["q_norm"] / with_base[name]["blocks"] ** 0.5, rel=1e-12)
    assert "would not merge" in render_report(report)
