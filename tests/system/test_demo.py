"""The README's demo, on a reduced setting, on the bundled adapters."""

from __future__ import annotations

import pytest

from helpers import ADAPTERS


@pytest.mark.slow
@pytest.mark.skipif(not (ADAPTERS / "base").is_dir(), reason="bundled adapters missing")
def test_demo_reduced(tmp_path):
    from oftmerge.demo.run import run_demo

    lines: list[str] = []
    out = run_demo(ADAPTERS, out_dir=tmp_path, n_per_task=8, methods=["orthomerge", "mean_q"], print_fn=lines.append, parts=("llm",))
    text = "\n".join(lines)
    tasks = out["tasks"]
    assert set(tasks) == {"upper", "reverse", "sort", "add"}
    expected_rows = {"base", "OrthoMerge", "mean of Q"} | {f"expert {t}" for t in tasks}
    assert set(out["scores"]) == expected_rows
    for row in expected_rows:
        assert f"| {row} |" in text
        for t in tasks:
            r = out["scores"][row][t]
            assert 0.0 <= r["acc"] <= 1.0 and r["nll"] > 0 and r["n"] == 8
    # the merged adapters were written and are real PEFT adapters
    for method in ("orthomerge", "mean_q"):
        assert (tmp_path / f"merged-{method}" / "adapter_model.safetensors").is_file()
    assert "magnitude correction c" in text


def test_demo_explains_missing_adapters(tmp_path):
    from oftmerge.demo.run import run_demo
    from oftmerge.errors import OftMergeError

    with pytest.raises(OftMergeError, match=r"no OFT adapters \(oft-\*/adapter_config.json\) found"):
        run_demo(tmp_path, n_per_task=1)


@pytest.mark.skipif(not (ADAPTERS / "diffusion" / "base").is_dir(), reason="bundled diffusion adapters missing")
def test_diffusion_demo(tmp_path):
    """The diffusion part: every expert helps its own task, LyCORIS's loader applies the merged file as oftmerge folds it."""
    from oftmerge.demo.run import run_demo

    lines: list[str] = []
    out = run_demo(ADAPTERS, out_dir=tmp_path, print_fn=lines.append, parts=("diffusion",))["diffusion"]
    text = "\n".join(lines)
    for family in ("lycoris", "peft"):
        scores = out[family]
        assert {"base", "OrthoMerge", "mean of Q", "sequential fold"} <= set(scores)
        for task in ("frames", "stripes", "diagonals"):
            assert scores[f"expert {task}"][task] < scores["base"][task]
    if out.get("lycoris_check") is not None:
        assert out["lycoris_check"] < 1e-5
    assert (tmp_path / "diffusion" / "lycoris" / "merged-orthomerge.safetensors").is_file()
    assert "gain kept" in text
