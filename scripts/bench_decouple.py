"""Benchmark: decoupled merging of full finetuned experts of a ~1B bf16 Llama, against mergekit.

Not a test. Generates (once, under --workdir, never committed) the synthetic Llama-shaped base of
``bench_fold.py`` (hidden 2048, intermediate 8192, 16 layers, vocab 32000, bf16) and N full "finetunes"
of it: every 2-D weight is ``W0 R_i + noise`` with ``R_i`` a random rotation (a random permutation
and 64 x 64 rotation blocks, about 2% of ``||W0||``) plus 1% Gaussian noise, the norms and
embeddings get the noise only, all rounded to bf16. Then each contender runs in its own child
process, inputs in the page cache; wall time includes starting Python; peak RSS is the child's
``ru_maxrss``:

  mergekit TIES        ``mergekit-yaml`` (its own virtualenv, see --mergekit) with merge_method ties
  oftmerge TIES        ``python -m oftmerge decouple --orthogonal none --euclidean ties`` (same options)
  OrthoMerge-G + TIES  ``oftmerge decouple --orthogonal orthomerge --target global --procrustes robust|fast``

plus the solver alone at one size (``--solver-dim``, default 4096): the exact SVD path against
Newton's polar iteration on ``W0^T T`` for one expert.

    .venv/bin/python scripts/bench_decouple.py --make                  # generate the inputs (~9.6 GB)
    .venv/bin/python scripts/bench_decouple.py ties                    # oftmerge TIES vs mergekit TIES
    .venv/bin/python scripts/bench_decouple.py solver                  # exact vs fast Procrustes at d=4096
    .venv/bin/python scripts/bench_decouple.py decouple-exact decouple-fast compare-decouple
    .venv/bin/python scripts/bench_decouple.py profile --tensor model.layers.0.mlp.down_proj.weight
    .venv/bin/python scripts/bench_decouple.py ... --layers 2 --hidden 512 --intermediate 2048 --vocab 4096   # quick

mergekit's virtualenv (created once; torch first so pip does not pull a CUDA build):

    python3.11 -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 \\
        && /tmp/mergekit-venv/bin/pip install mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fold import add_model_arguments, make_base, run_child  # noqa: E402

ROTATION_BLOCK = 64


# -- inputs --------------------------------------------------------------------------------------


def rotate_columns(w, seed: int, strength: float):
    """``w @ R`` for a random rotation R: a permutation of the columns, 64 x 64 blocks exp(S), back."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = w.shape[1]
    perm = torch.randperm(n, generator=g)
    s = torch.randn(n // ROTATION_BLOCK, ROTATION_BLOCK, ROTATION_BLOCK, generator=g) * strength
    blocks = torch.linalg.matrix_exp(s - s.transpose(-2, -1))
    x = w[:, perm].reshape(w.shape[0], n // ROTATION_BLOCK, ROTATION_BLOCK).transpose(0, 1)
    x = (x @ blocks).transpose(0, 1).reshape(w.shape[0], n)
    out = torch.empty_like(x)
    out[:, perm] = x
    return out


def make_expert(path: Path, base: Path, index: int, args: argparse.Namespace) -> None:
    import torch

    from oftmerge.engine.commit import atomic_directory
    from oftmerge.formats.checkpoint import Checkpoint
    from oftmerge.formats.shards import ShardedWriter, parse_size
    from oftmerge.plan.decouple import EMBEDDING_PATTERN

    ckpt = Checkpoint(base)
    embedding = re.compile(EMBEDDING_PATTERN)
    g = torch.Generator().manual_seed(1000 + index)
    with atomic_directory(path) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=parse_size(args.shard_size))
        for k, name in enumerate(ckpt.keys_in_file_order()):
            w0 = ckpt.read(name).float()
            w = w0
            if w0.dim() == 2 and not embedding.search(name) and name != "lm_head.weight":
                w = rotate_columns(w0, seed=100_000 * index + k, strength=args.rotation / ROTATION_BLOCK**0.5)
            scale = float(w0.abs().mean()) if w0.dim() == 2 else 1e-2
            w = w + torch.randn(w0.shape, generator=g) * (args.noise * scale * 1.25)  # mean |x| = 0.8 std
            writer.add(name, w.to(torch.bfloat16))
        writer.close()
        shutil.copyfile(base / "config.json", tmp / "config.json")
    print(f"expert {index}: {path}", flush=True)


def inputs(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    tag = f"h{args.hidden}-m{args.intermediate}-l{args.layers}-v{args.vocab}"
    base = args.workdir / f"base-{tag}"
    experts = [args.workdir / f"expert{i}-{tag}" for i in range(args.experts)]
    return base, experts


def ensure_inputs(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    base, experts = inputs(args)
    if not base.exists():
        fold_base = Path("/tmp/oftmerge-bench") / base.name
        if fold_base.exists():  # bench_fold.py made the same base (same seed, same shapes): reuse it
            base.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(fold_base, base)
        else:
            make_base(base, args)
    for i, e in enumerate(experts):
        if not e.exists():
            make_expert(e, base, i, args)
    return base, experts


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# -- contenders (each in its own child process) --------------------------------------------------


def mergekit_config(path: Path, base: Path, experts: list[Path], density: float, dtype: str) -> Path:
    """mergekit's TIES with the options oftmerge's TIES uses: weight 1, one density, sign by sum, disjoint mean."""
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for e in experts:
        lines += [f"  - model: {e}", "    parameters:", "      weight: 1.0", f"      density: {density}"]
    lines += ["parameters:", "  normalize: true", f"dtype: {dtype}", "out_dtype: bfloat16"]
    path.write_text("\n".join(lines) + "\n")
    return path


def contenders(args: argparse.Namespace, base: Path, experts: list[Path]) -> dict[str, list[str]]:
    py = sys.executable
    oft = [py, "-m", "oftmerge", "decouple", "--base", str(base), *map(str, experts), "-o", "{out}", "-q",
           "--shard-size", args.shard_size, "--euclidean", "ties", "--option", f"density={args.density}"]  # fmt: skip
    mk = [str(args.mergekit / "bin" / "mergekit-yaml"), "{config}", "{out}", "--no-copy-tokenizer", "--quiet",
          "--out-shard-size", args.mergekit_shard]  # fmt: skip
    return {
        "mergekit TIES (dtype float32)": [c.replace("{config}", "{config:float32}") for c in mk],
        "mergekit TIES (dtype bfloat16)": [c.replace("{config}", "{config:bfloat16}") for c in mk],
        "oftmerge TIES": oft + ["--orthogonal", "none"],
        "OrthoMerge-G + TIES, exact Procrustes": oft + ["--orthogonal", "orthomerge", "--target", "global", "--procrustes", "robust"],
        "OrthoMerge-G + TIES, fast Procrustes": oft + ["--orthogonal", "orthomerge", "--target", "global", "--procrustes", "fast"],
    }


GROUPS = {
    "ties": ["mergekit TIES (dtype float32)", "mergekit TIES (dtype bfloat16)", "oftmerge TIES"],
    "decouple-exact": ["OrthoMerge-G + TIES, exact Procrustes"],
    "decouple-fast": ["OrthoMerge-G + TIES, fast Procrustes"],
}


def compare(ours: Path, theirs: Path, detail: bool = False) -> str:
    """How far two merged models are apart, in bf16 roundings of the second one's values.

    ``detail``: also describe the differences beyond one rounding on the tensor that has most of them.
    """
    import torch

    from oftmerge.formats.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    if set(a.keys()) != set(b.keys()):
        return f"different tensor names: {sorted(set(a.keys()) ^ set(b.keys()))[:4]}"
    differ = beyond = total = 0
    worst = 0.0
    most = (0, "")
    for key in sorted(a.keys()):
        x, y = a.read(key).float(), b.read(key).float()
        _, exp = torch.frexp(y)
        ulp = torch.ldexp(torch.full_like(y, torch.finfo(torch.bfloat16).eps), exp - 1)
        diff = (x - y).abs()
        over = diff > ulp
        n_over = int(over.sum())
        differ += int((diff > 0).sum())
        beyond += n_over
        worst = max(worst, float(diff.max()) / max(float(y.abs().max()), 1e-30))
        total += y.numel()
        if detail and n_over > most[0]:
            d = diff[over]
            most = (n_over, f"; on {key}, the tensor with most ({n_over:,d}), those differences have median "
                    f"{float(d.median()):.2g} ({float((d / ulp[over]).median()):.1f} roundings) and max {float(d.max()):.2g}, "
                    f"against a mean |entry| of {float(y.abs().mean()):.2g}")  # fmt: skip
    return (f"{differ:,d} of {total:,d} entries differ ({100 * differ / total:.3f}%), {beyond:,d} "
            f"({100 * beyond / total:.4f}%) by more than one bf16 rounding; largest difference {worst:.2g} of the tensor's max"
            + most[1])  # fmt: skip


def run_group(args: argparse.Namespace, names: list[str], base: Path, experts: list[Path]) -> list[str]:
    """Run each contender ``args.repeat`` times (interleaved); print and return markdown rows."""
    cmds = contenders(args, base, experts)
    configs = {d: mergekit_config(args.workdir / f"mergekit-ties-{d}.yml", base, experts, args.density, d)
               for d in ("float32", "bfloat16")}  # fmt: skip
    warm([base, *experts])
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeat):
        for name in names:
            out = args.workdir / ("out-" + re.sub(r"\W+", "_", name))  # stable: a killed run's leftovers are found again
            shutil.rmtree(out, ignore_errors=True)
            cmd = [c.replace("{out}", str(out)) for c in cmds[name]]
            cmd = [str(configs[c[8:-1]]) if c.startswith("{config:") else c for c in cmd]
            runs[name].append(run_child(cmd))
            print(f"{name:<40} {runs[name][-1][0]:8.1f} s  {runs[name][-1][1]:6.2f} GB peak RSS", flush=True)
            keep = keep_dir(args, name)
            shutil.rmtree(keep, ignore_errors=True)
            out.rename(keep)
    loads.append(os.getloadavg()[0])
    rows = []
    for name in names:
        best = min(t for t, _ in runs[name])
        rss = max(r for _, r in runs[name])
        rows.append(f"| {name} | {best:.1f} | {rss:.2f} | {', '.join(f'{t:.1f}' for t, _ in runs[name])} |")
    rows.append(f"load average (1 min) before / after: {loads[0]:.2f} / {loads[1]:.2f} on {os.cpu_count()} cores")
    best = {n: (min(t for t, _ in r), max(m for _, m in r)) for n, r in runs.items()}
    if "oftmerge TIES" in best:
        for mk in [n for n in best if n.startswith("mergekit")]:
            t, m = best["oftmerge TIES"], best[mk]
            rows.append(f"{mk} / oftmerge TIES: time {m[0] / t[0]:.2f}x, peak RSS {m[1] / t[1]:.2f}x "
                        f"(target: time >= 1 {'met' if m[0] >= t[0] else '**missed**'}, RSS >= 1 {'met' if m[1] >= t[1] else '**missed**'})")  # fmt: skip
            rows.append(f"outputs, oftmerge TIES vs {mk}: " + compare(keep_dir(args, "oftmerge TIES"), keep_dir(args, mk)))
    if "oftmerge TIES" in best:
        rows.append(tie_block(base, experts[0], "model.layers.0.self_attn.q_proj.weight", args.density))
    for r in rows:
        print(r, flush=True)
    return rows


def keep_dir(args: argparse.Namespace, name: str) -> Path:
    """Where ``run_group`` keeps a contender's last output."""
    return args.workdir / ("keep-" + name.replace(" ", "_").replace("(", "").replace(")", ""))


def compare_decouple(args: argparse.Namespace) -> list[str]:
    """The kept outputs of decouple-fast against decouple-exact: entries that differ, and both reports' totals."""
    exact, fast = (keep_dir(args, GROUPS[g][0]) for g in ("decouple-exact", "decouple-fast"))
    for d in (exact, fast):
        if not (d / "oftmerge.json").is_file():
            raise SystemExit(f"{d}: no kept output; run decouple-exact and decouple-fast first")
    rows = [f"outputs, fast vs exact: {compare(fast, exact, detail=True)}"]
    for label, d in (("exact", exact), ("fast", fast)):
        totals = json.loads((d / "oftmerge.json").read_text())["totals"]
        rows.append(f"{label} totals: " + ", ".join(f"{k} {v:.10g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(totals.items())))
    for r in rows:
        print(r, flush=True)
    return rows


def tie_block(base: Path, expert: Path, name: str, density: float) -> str:
    """How many entries of one task vector share the magnitude at TIES's cut (where implementations may choose differently)."""
    import torch

    from oftmerge.formats.checkpoint import Checkpoint

    a = (Checkpoint(expert).read(name).double() - Checkpoint(base).read(name).double()).abs().flatten()
    k = int(density * a.numel())
    cut = torch.kthvalue(a, a.numel() - k + 1).values
    tied, above = int((a == cut).sum()), int((a > cut).sum())
    return (f"TIES's cut on {name} of {expert.name}: {tied:,d} entries have exactly the cut magnitude {float(cut):.3g} for "
            f"{k - above:,d} places ({100 * tied / a.numel():.1f}% of the tensor); which of them are kept is where the trims differ")  # fmt: skip


def solver_bench(args: argparse.Namespace) -> list[str]:
    """The exact (SVD) and fast (Newton) Procrustes on one d x d layer, one expert, in this process."""
    import torch

    from oftmerge.linalg import orthogonality_error
    from oftmerge.linalg.procrustes import _polar_of_cross

    d = args.solver_dim
    g = torch.Generator().manual_seed(7)
    w0 = (torch.randn(d, d, generator=g) * 0.02).to(torch.bfloat16).double()
    t = (rotate_columns(w0.float(), seed=8, strength=args.rotation / ROTATION_BLOCK**0.5).double()
         + torch.randn(d, d, generator=g, dtype=torch.float64) * (0.02 * args.noise)).to(torch.bfloat16).double()  # fmt: skip
    m = w0.T @ t
    rows, got = [], {}
    for name, fn in (
        ("dense SVD of W0^T T (the reference formula: U V^T)", lambda: torch.linalg.svd(m)),
        ("exact: robust (anchor, SVD, det = +1, orthogonality check)", lambda: _polar_of_cross(m, "robust", 1e-6, 1e-5)),
        ("fast: checked Newton polar iteration", lambda: _polar_of_cross(m, "fast", 1e-6, 1e-5)),
    ):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            got[name] = fn()
            times.append(time.perf_counter() - start)
        rows.append((name, min(times), times))
    svd_t = rows[0][1]
    r_exact, _ = got[rows[1][0]]
    r_fast, info = got[rows[2][0]]
    lines = [f"| {n} | {t:.2f} | {svd_t / t:.2f}x | {', '.join(f'{x:.2f}' for x in ts)} |" for n, t, ts in rows]
    fit = lambda r: float(torch.linalg.matrix_norm(t - w0 @ r))  # noqa: E731
    shift = float(torch.linalg.matrix_norm(w0 @ (r_fast - r_exact)) / torch.linalg.matrix_norm(w0))
    lines += [
        f"fast solver: {info.iterations} Newton steps (the first in float64, then float32, one float64 Newton-Schulz polish), "
        f"fell back: {info.fell_back}; ||R^T R - I||_F = {float(orthogonality_error(r_fast)):.2g} (exact, float64; target <= 1e-5: "
        f"{'met' if float(orthogonality_error(r_fast)) <= 1e-5 else '**missed**'}; the solver's own estimate {info.ortho_error:.2g}); "
        f"exact solver: {float(orthogonality_error(r_exact)):.2g}",
        f"||R_fast - R_exact||_F = {float(torch.linalg.matrix_norm(r_fast - r_exact)):.2g}; ||W0 (R_fast - R_exact)||_F / ||W0||_F = "
        f"{shift:.2g}; fit ||T - W0 R||_F: exact {fit(r_exact):.9g}, fast {fit(r_fast):.9g}",
        f"dense SVD time / fast time = {svd_t / rows[2][1]:.2f}x (target >= 3x: {'met' if svd_t / rows[2][1] >= 3 else '**missed**'}); "
        f"exact solver time / fast time = {rows[1][1] / rows[2][1]:.2f}x; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
    ]
    for line in lines:
        print(line, flush=True)
    return lines


def profile_tensor(args: argparse.Namespace) -> None:
    """cProfile of the decoupling of one tensor of the generated model (the experts' versions read once)."""
    import cProfile
    import pstats

    import torch

    from oftmerge.formats.checkpoint import Checkpoint
    from oftmerge.methods.decoupling import Settings, decompose
    from oftmerge.methods.euclidean import TensorContext, get_euclidean_method

    base, experts = ensure_inputs(args)
    name = args.tensor
    w0 = Checkpoint(base).read(name).double()
    ws = torch.stack([Checkpoint(e).read(name).double() for e in experts])
    weights = torch.ones(len(experts), dtype=torch.float64)
    settings = Settings(euclidean="ties", procrustes=args.procrustes)
    ties = get_euclidean_method("ties")

    def run() -> None:
        dec = decompose(name, w0, ws, weights, settings)
        ties(dec.parts, weights, context=TensorContext(name), density=args.density)
        print(f"{name} {tuple(w0.shape)}: {dec.report.path}, fits {[round(f, 4) for f in dec.report.fits if f is not None]}, "
              f"|Q_i| {[round(q, 4) for q in dec.report.q_norms]}, merged ortho error {dec.report.merged_ortho_error:.2g}")  # fmt: skip

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(run)
    print(f"{time.perf_counter() - start:.1f} s with {torch.get_num_threads()} torch threads (procrustes={args.procrustes})")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", default=[], help=f"solver, profile, compare-decouple, {', '.join(GROUPS)} (none: only --make)")
    p.add_argument("--make", action="store_true", help="generate the inputs if missing")
    add_model_arguments(p, "/tmp/oftmerge-bench-decouple")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--rotation", type=float, default=0.02, help="relative size of W0 (R_i - I)")
    p.add_argument("--noise", type=float, default=0.01, help="relative size of the noise")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--solver-dim", type=int, default=4096)
    p.add_argument("--tensor", default="model.layers.0.mlp.down_proj.weight", help="for 'profile'")
    p.add_argument("--procrustes", default="robust", help="for 'profile'")
    p.add_argument("--mergekit", type=Path, default=Path("/tmp/mergekit-venv"), help="mergekit's virtualenv")
    p.add_argument("--mergekit-shard", default="5B", help="mergekit's --out-shard-size (parameters)")
    args = p.parse_args(argv)
    for what in args.what:
        if what == "solver":
            solver_bench(args)
            continue
        if what == "profile":
            profile_tensor(args)
            continue
        if what == "compare-decouple":
            compare_decouple(args)
            continue
        if what not in GROUPS:
            p.error(f"unknown benchmark {what!r}: choose from solver, profile, compare-decouple, {', '.join(GROUPS)}")
        base, experts = ensure_inputs(args)
        run_group(args, GROUPS[what], base, experts)
    if args.make:
        ensure_inputs(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
