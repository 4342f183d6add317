"""Benchmark: how `oftmerge merge` scales with the number of adapters and the model size.

Not a test. For each model shape (scripts/bench_merge.py's synthetic PEFT 0.21 OFT adapters, float32,
block 32, every linear layer) and each adapter count, runs `python -m oftmerge merge ... -q` in a
child process (best of --repeat, page cache warm) and records wall time and peak RSS (ru_maxrss);
prints a markdown table and plots docs/scaling.png.

    .venv/bin/python scripts/bench_scaling.py                       # 1b and 8b shapes, 2/4/8 adapters
    .venv/bin/python scripts/bench_scaling.py --models 1b --counts 2,4 --repeat 1 --plot /tmp/s.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge as bm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/oftmerge-bench-merge"))
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--counts", default="2,4,8")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--plot", type=Path, default=bm.ROOT / "docs" / "scaling.png")
    args = ap.parse_args()
    models = args.models.split(",")
    counts = [int(c) for c in args.counts.split(",")]

    rows = []
    for model in models:
        paths = bm.adapters(args.workdir, model, max(counts))
        size = (paths[0] / "adapter_model.safetensors").stat().st_size
        for n in counts:
            out = args.workdir / "out-scaling"
            cmd = [sys.executable, "-m", "oftmerge", "merge", *map(str, paths[:n]), "-o", str(out), "-q"]
            load = os.getloadavg()[0]
            runs = []
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(bm.run(cmd))
            shutil.rmtree(out, ignore_errors=True)
            wall = min(w for w, _ in runs)
            rss = max(r for _, r in runs)
            rows.append((model, n, n * size / 1e6, wall, rss, runs, load))
            print(f"{model} x{n}: {wall:.2f} s, {rss:.2f} GB (load {load:.2f})", file=sys.stderr)

    print("| model shape | adapters | MB read | wall time (s, best) | peak RSS (GB) | all runs (s) | load avg (1 min) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for model, n, mb, wall, rss, runs, load in rows:
        print(f"| Llama-{model.upper()} | {n} | {mb:.0f} | {wall:.2f} | {rss:.2f} | {', '.join(f'{w:.2f}' for w, _ in runs)} | {load:.2f} |")
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    for model in models:
        pts = [r for r in rows if r[0] == model]
        ax_t.plot([r[1] for r in pts], [r[3] for r in pts], "o-", label=f"Llama-{model.upper()} shapes")
        ax_m.plot([r[1] for r in pts], [r[4] for r in pts], "o-", label=f"Llama-{model.upper()} shapes")
    for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GB)")):
        ax.set_xlabel("adapters merged")
        ax.set_ylabel(label)
        ax.set_xticks(counts)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_t.legend()
    fig.suptitle("oftmerge merge (CLI, orthomerge, float32 OFT adapters, block 32, 2 shared CPU cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
