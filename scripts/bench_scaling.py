"""Benchmark: how `oftmerge merge` and `oftmerge decouple` scale with the number of inputs and the model size.

Not a test. ``merge`` (default): for each model shape (scripts/bench_merge.py's synthetic PEFT 0.21 OFT
adapters, float32, block 32, every linear layer) and each adapter count, runs `python -m oftmerge merge
... -q` in a child process (best of --repeat, page cache warm) and records wall time and peak RSS
(ru_maxrss); prints a markdown table and plots docs/scaling.png. ``decouple``: the same for
OrthoMerge-G + TIES (`oftmerge decouple`, exact Procrustes) of full finetunes made by
scripts/bench_decouple.py (``W0 R_i + noise``, bf16) of two small Llama shapes; plots
docs/scaling_decouple.png.

    .venv/bin/python scripts/bench_scaling.py                       # 1b and 8b shapes, 2/4/8 adapters
    .venv/bin/python scripts/bench_scaling.py --models 1b --counts 2,4 --repeat 1 --plot /tmp/s.png
    .venv/bin/python scripts/bench_scaling.py --what decouple       # 2/4/8 full experts, two shapes

The plots need matplotlib: `.venv/bin/pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge as bm  # noqa: E402

#: shapes of the decoupling sweep: name -> (hidden, intermediate, layers, vocab); heads of 128, no GQA
DECOUPLE_MODELS = {"s": (512, 2048, 4, 4096), "m": (1024, 4096, 4, 4096)}


def _row(model: str, n: int, mb: float, cmd: list[str], out: Path, repeat: int) -> tuple:
    """Run ``cmd`` (writing ``out``) ``repeat`` times: (model, n, MB read, best wall, peak RSS, runs, load before)."""
    load = os.getloadavg()[0]
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(bm.run(cmd))
    shutil.rmtree(out, ignore_errors=True)
    row = (model, n, mb, min(w for w, _ in runs), max(r for _, r in runs), runs, load)
    print(f"{model} x{n}: {row[3]:.2f} s, {row[4]:.2f} GB (load {load:.2f})", file=sys.stderr)
    return row


def decouple_rows(args: argparse.Namespace, models: list[str], counts: list[int]) -> list[tuple]:
    import bench_decouple as bd

    rows = []
    out = args.workdir / "out-scaling-decouple"
    for model in models:
        hidden, inter, layers, vocab = DECOUPLE_MODELS[model]
        ns = argparse.Namespace(workdir=args.workdir / "decouple", hidden=hidden, intermediate=inter, layers=layers,
                                vocab=vocab, shard_size="5GB", experts=max(counts), rotation=0.02, noise=0.01)  # fmt: skip
        base, experts = bd.ensure_inputs(ns)
        bd.warm([base, *experts])
        size = sum(f.stat().st_size for f in experts[0].iterdir())
        for n in counts:
            cmd = [sys.executable, "-m", "oftmerge", "decouple", "--base", str(base), *map(str, experts[:n]), "-o", str(out),
                   "-q", "--euclidean", "ties", "--orthogonal", "orthomerge"]  # fmt: skip
            rows.append(_row(model, n, n * size / 1e6, cmd, out, args.repeat))
    return rows


def merge_rows(args: argparse.Namespace, models: list[str], counts: list[int]) -> list[tuple]:
    rows = []
    out = args.workdir / "out-scaling"
    for model in models:
        paths = bm.adapters(args.workdir, model, max(counts))
        size = (paths[0] / "adapter_model.safetensors").stat().st_size
        for n in counts:
            cmd = [sys.executable, "-m", "oftmerge", "merge", *map(str, paths[:n]), "-o", str(out), "-q"]
            rows.append(_row(model, n, n * size / 1e6, cmd, out, args.repeat))
    return rows


def _label(what: str, model: str) -> str:
    if what == "merge":
        return f"Llama-{model.upper()}"
    hidden, inter, layers, vocab = DECOUPLE_MODELS[model]
    return f"{model}: hidden {hidden}, intermediate {inter}, {layers} layers"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/oftmerge-bench-merge"))
    ap.add_argument("--models", help="default: 1b,8b (merge), s,m (decouple)")
    ap.add_argument("--counts", default="2,4,8")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--plot", type=Path, help="default: docs/scaling.png (merge), docs/scaling_decouple.png (decouple)")
    ap.add_argument("--what", choices=["merge", "decouple"], default="merge")
    args = ap.parse_args()
    args.models = args.models or ("1b,8b" if args.what == "merge" else ",".join(DECOUPLE_MODELS))
    args.plot = args.plot or bm.ROOT / "docs" / ("scaling.png" if args.what == "merge" else "scaling_decouple.png")
    models = args.models.split(",")
    counts = [int(c) for c in args.counts.split(",")]
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('the plot needs matplotlib: .venv/bin/pip install -e ".[bench]"') from None

    rows = decouple_rows(args, models, counts) if args.what == "decouple" else merge_rows(args, models, counts)
    inputs = "adapters" if args.what == "merge" else "experts"
    print(f"| model shape | {inputs} | MB read | wall time (s, best) | peak RSS (GB) | all runs (s) | load avg (1 min) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for model, n, mb, wall, rss, runs, load in rows:
        print(f"| {_label(args.what, model)} | {n} | {mb:.0f} | {wall:.2f} | {rss:.2f} | {', '.join(f'{w:.2f}' for w, _ in runs)} | {load:.2f} |")
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    for model in models:
        pts = [r for r in rows if r[0] == model]
        ax_t.plot([r[1] for r in pts], [r[3] for r in pts], "o-", label=_label(args.what, model))
        ax_m.plot([r[1] for r in pts], [r[4] for r in pts], "o-", label=_label(args.what, model))
    for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GB)")):
        ax.set_xlabel(f"{inputs} merged")
        ax.set_ylabel(label)
        ax.set_xticks(counts)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    title = ("oftmerge merge (CLI, orthomerge, float32 OFT adapters, block 32" if args.what == "merge"
             else "oftmerge decouple (CLI, OrthoMerge-G + TIES, exact Procrustes, bf16 full experts")  # fmt: skip
    fig.suptitle(f"{title}, {os.cpu_count()} CPU cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
