"""Benchmark: `oftmerge merge` of 5 OFT adapters shaped like an 8B Llama's, against the I/O floor.

Not a test. Generates (once, under --workdir, never committed) N synthetic PEFT 0.21 OFT adapters
(float32, as PEFT saves them; block size 32; every linear layer q,k,v,o,gate,up,down; seeded small
random generators) for a Llama-shaped model, then runs each contender in its own child process and
reports wall time and peak RSS (the child's ru_maxrss from wait4):

  oftmerge        `python -m oftmerge merge A1 .. AN -o OUT -q`
  io floor        safetensors load_file of every input + save_file of one output of the merged size
  io floor+sync   the same, with fsync of the output (oftmerge fsyncs before its atomic rename)

    .venv/bin/python scripts/bench_merge.py                         # 5 adapters, 8B shapes (~78 MB each)
    .venv/bin/python scripts/bench_merge.py --model 1b --adapters 2 --repeat 1
    .venv/bin/python scripts/bench_merge.py --profile              # also a cProfile of the merge (top 25)

The inputs are read once before the first contender, so every contender reads from the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (hidden, intermediate, layers, k/v output width); attention heads of 128 (8B) or 64 (1B) wide
MODELS = {
    "8b": (4096, 14336, 32, 1024),  # Llama 3 8B: GQA, 8 KV heads of 128
    "1b": (2048, 8192, 16, 512),  # Llama 3.2 1B: GQA, 8 KV heads of 64
}
BLOCK = 32
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def in_features(model: str) -> dict[str, int]:
    """Input width of every adapted module (OFT rotates the input side: ``in / b`` blocks)."""
    hidden, inter, layers, _ = MODELS[model]
    out = {}
    for i in range(layers):
        for t in TARGETS:
            part = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[f"model.layers.{i}.{part}.{t}"] = inter if t == "down_proj" else hidden
    return out


def make_adapter(path: Path, model: str, seed: int) -> None:
    """A PEFT 0.21-style OFT adapter directory with seeded random generators (std 1e-3), float32."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    n = BLOCK * (BLOCK - 1) // 2
    tensors = {
        f"base_model.model.{name}.oft_R.weight": torch.randn(width // BLOCK, n, generator=g) * 1e-3
        for name, width in in_features(model).items()
    }
    config = json.loads((ROOT / "adapters/oft-upper/adapter_config.json").read_text())
    config.update(base_model_name_or_path=f"synthetic-llama-{model}", oft_block_size=BLOCK, r=0, target_modules=list(TARGETS))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def adapters(workdir: Path, model: str, count: int) -> list[Path]:
    paths = [workdir / f"oft-{model}-{i}" for i in range(count)]
    for i, p in enumerate(paths):
        if not (p / "adapter_model.safetensors").is_file():
            print(f"generating {p} ...", file=sys.stderr)
            make_adapter(p, model, seed=1000 + i)
    for p in paths:  # warm the page cache
        (p / "adapter_model.safetensors").read_bytes()
    return paths


FLOOR = r"""
import os, sys
from safetensors.torch import load_file, save_file
out, sync, inputs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
loaded = [load_file(os.path.join(p, "adapter_model.safetensors")) for p in inputs]
os.makedirs(out)
save_file(loaded[0], os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
if sync:
    fd = os.open(os.path.join(out, "adapter_model.safetensors"), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is in KB on Linux


def contenders(paths: list[Path], out: Path) -> dict[str, list[str]]:
    inputs = [str(p) for p in paths]
    return {
        "oftmerge merge (CLI)": [sys.executable, "-m", "oftmerge", "merge", *inputs, "-o", str(out), "-q"],
        "I/O floor: safetensors load_file x N + save_file": [sys.executable, "-c", FLOOR, str(out), "0", *inputs],
        "I/O floor + fsync of the output": [sys.executable, "-c", FLOOR, str(out), "1", *inputs],
    }


def measure(paths: list[Path], workdir: Path, repeat: int) -> dict[str, list[tuple[float, float]]]:
    out = workdir / "out"
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeat):  # interleaved, so a burst of load on the shared machine hits every contender
        for name, cmd in contenders(paths, out).items():
            shutil.rmtree(out, ignore_errors=True)
            results.setdefault(name, []).append(run(cmd))
    shutil.rmtree(out, ignore_errors=True)
    return results


def profile(paths: list[Path], workdir: Path) -> None:
    import cProfile
    import pstats

    from oftmerge.ops.merge import merge_adapters

    out = workdir / "out-profile"
    shutil.rmtree(out, ignore_errors=True)
    prof = cProfile.Profile()
    prof.enable()
    merge_adapters([str(p) for p in paths], out_dir=out)
    prof.disable()
    shutil.rmtree(out, ignore_errors=True)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/oftmerge-bench-merge"))
    ap.add_argument("--model", choices=list(MODELS), default="8b")
    ap.add_argument("--adapters", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of merge_adapters (in this process)")
    args = ap.parse_args()

    paths = adapters(args.workdir, args.model, args.adapters)
    size = (paths[0] / "adapter_model.safetensors").stat().st_size
    load0 = os.getloadavg()[0]
    results = measure(paths, args.workdir, args.repeat)
    load1 = os.getloadavg()[0]
    hidden, inter, layers, kv = MODELS[args.model]
    print(
        f"\n{args.adapters} OFT adapters, Llama-{args.model.upper()}-shaped (hidden {hidden}, intermediate {inter}, "
        f"{layers} layers, k/v {hidden}->{kv}; q,k,v,o,gate,up,down; block {BLOCK}; float32): "
        f"{size / 1e6:.1f} MB each, {args.adapters * size / 1e6:.0f} MB read, {size / 1e6:.1f} MB written\n"
    )
    print("| contender | wall time (s, best) | peak RSS (GB) | all runs (s) |")
    print("|---|---:|---:|---|")
    best = {}
    for name, runs in results.items():
        best[name] = min(w for w, _ in runs)
        rss = max(r for _, r in runs)
        print(f"| {name} | {best[name]:.2f} | {rss:.2f} | {', '.join(f'{w:.2f}' for w, _ in runs)} |")
    names = list(results)
    print(f"\n- oftmerge / I/O floor = {best[names[0]] / best[names[1]]:.2f}x; / I/O floor + fsync = {best[names[0]] / best[names[2]]:.2f}x (target <= 1.5x)")
    print(f"- load average (1 min) before / after: {load0:.2f} / {load1:.2f} on {os.cpu_count()} cores")
    if args.profile:
        profile(paths, args.workdir)


if __name__ == "__main__":
    main()
