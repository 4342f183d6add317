"""Benchmark: peak memory of a fold into a PyTorch ``.bin`` base (one file, and sharded as transformers 4 wrote it).

Not a test. Generates (once, under --workdir, never committed) the synthetic Llama-shaped bf16 base of
``bench_fold.py`` at a few hundred MB (hidden 1024, intermediate 4096, 8 layers, vocab 32000 by
default: 0.20 B parameters, 0.40 GB) and its OFT adapter, and re-saves the base as

  bin        one ``pytorch_model.bin`` (``torch.save`` of the state dict, torch's zip format)
  bin-4      four ``pytorch_model-0000i-of-00004.bin`` shards and ``pytorch_model.bin.index.json``
  legacy     one ``pytorch_model.bin`` in the legacy (non-zip) pickle format, which cannot be mapped

then folds the adapter into each (and into the safetensors original) with ``oftmerge fold``, each in a
child process; wall time includes starting Python; peak RSS is the child's ``VmHWM``. The same
runs with another copy of the package (``--before DIR``: a directory holding an ``oftmerge`` package,
e.g. the code before the change) come first. "import only" is the RSS of a child that imports the
package and torch and exits: the floor under every row.

    .venv/bin/python scripts/bench_bin_base.py
    .venv/bin/python scripts/bench_bin_base.py --before /tmp/oftmerge-before   # a copy of the old package
    .venv/bin/python scripts/bench_bin_base.py --layers 2 --vocab 4096         # a quick check

Outputs are compared with the safetensors-base fold (every tensor equal) and deleted after each run.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fold import add_model_arguments, make_adapter, make_base  # noqa: E402

VARIANTS = ("safetensors", "bin", "bin-4", "legacy")


def save_bin(src: Path, dst: Path, shards: int, legacy: bool = False) -> None:
    """``src`` (safetensors) re-saved as ``.bin``: one file, or ``shards`` files and an index, as transformers 4 wrote them."""
    import torch

    from oftmerge.engine.commit import atomic_directory
    from oftmerge.formats.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    keys = ckpt.keys_in_file_order()
    with atomic_directory(dst) as tmp:
        shutil.copyfile(src / "config.json", tmp / "config.json")
        if shards == 1:
            torch.save({k: ckpt.read(k) for k in keys}, tmp / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        else:
            total = sum(ckpt.read(k).nbytes for k in keys)
            weight_map, part, size, n = {}, {}, 0, 0

            def flush() -> None:
                name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
                torch.save(dict(part), tmp / name)
                weight_map.update(dict.fromkeys(part, name))
                part.clear()

            for k in keys:
                t = ckpt.read(k)
                if part and size + t.nbytes > total / shards * (n + 1) and n < shards - 1:
                    flush()
                    n += 1
                part[k] = t
                size += t.nbytes
            flush()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print(f"{dst.name}: {sorted(p.name for p in dst.iterdir())}")


def run_child(code: str, package: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of ``python -c code`` importing oftmerge from ``package``'s parent directory.

    The peak is the child's own ``VmHWM`` (``/proc/self/status``, read as it exits): ``ru_maxrss``
    would count the memory of this process, which the child inherits until it execs.
    """
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-bin-{os.getpid()}.hwm"
    wrapped = (
        f"import sys, atexit; sys.path.insert(0, {str(package)!r})\n"
        f"atexit.register(lambda: open({str(report)!r}, 'w').write("
        "next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))\n"
        f"{code}"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapped], cwd="/", stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{code[:80]}... failed")
    kib = int(report.read_text())
    report.unlink()
    return wall, kib / 2**20  # KiB -> GiB


def fold_code(adapter: Path, base: Path, out: Path) -> str:
    return f"from oftmerge.cli import main; sys.exit(main(['fold', {str(adapter)!r}, '--base', {str(base)!r}, '-o', {str(out)!r}]))"


def same_tensors(a: Path, b: Path) -> bool:
    from oftmerge.formats.checkpoint import Checkpoint

    x, y = Checkpoint(a), Checkpoint(b)
    return set(x.keys()) == set(y.keys()) and all(bool((x.read(k) == y.read(k)).all()) for k in x.keys())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "/tmp/oftmerge-bench-bin")
    p.set_defaults(hidden=1024, intermediate=4096, layers=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--before", type=Path, help="a directory holding another oftmerge package, measured first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args(argv)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = {"safetensors": work / "base"}
    if not base["safetensors"].exists():
        make_base(base["safetensors"], args)
    adapter = work / "adapter"
    if not adapter.exists():
        make_adapter(adapter, base["safetensors"], args)
    for name, shards, legacy in (("bin", 1, False), ("bin-4", 4, False), ("legacy", 1, True)):
        base[name] = work / f"base-{name}"
        if not base[name].exists():
            save_bin(base["safetensors"], base[name], shards, legacy)
    for path in base.values():  # into the page cache
        for f in path.iterdir():
            f.read_bytes()
    size = sum(f.stat().st_size for f in base["bin"].iterdir() if f.suffix == ".bin") / 2**30
    packages = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    reference = work / "out-reference"
    shutil.rmtree(reference, ignore_errors=True)
    run_child(fold_code(adapter, base["safetensors"], reference), ROOT)
    print(f"\nbase: {size:.2f} GiB as one .bin; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| code | base | wall time (s) | peak RSS (GiB) | output |")
    print("|---|---|---:|---:|---|")
    for label, package in packages:
        wall, rss = run_child("import torch, oftmerge.ops.fold", package)
        print(f"| {label} | import only | {wall:.1f} | {rss:.2f} | |")
        for variant in args.variants:
            out = work / f"out-{label}-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            wall, rss = run_child(fold_code(adapter, base[variant], out), package)
            check = "= safetensors fold" if same_tensors(out, reference) else "**differs**"
            shutil.rmtree(out)
            print(f"| {label} | {variant} | {wall:.1f} | {rss:.2f} | {check} |", flush=True)
    shutil.rmtree(reference)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
