"""Benchmark: fold an OFT adapter into a ~1B-parameter bf16 Llama-shaped model, against PEFT and the I/O floor.

Not a test. Generates (once, under --workdir, never committed) a synthetic Llama-shaped model from
seeded random tensors with oftmerge's ShardedWriter, and an OFT adapter on every linear layer with
small random generators, then runs each contender in its own child process and reports wall time and
peak RSS (the child's ru_maxrss from wait4):

  oftmerge      `python -m oftmerge fold ADAPTER --base BASE -o OUT`
  peft          AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  io floor      safetensors load_file + save_file of every shard (no fold at all)
  io floor+sync the same, with fsync of every file (oftmerge fsyncs its output before renaming it into place)

    .venv/bin/python scripts/bench_fold.py                       # the full 1B run (~2.4 GB bf16, a few minutes)
    .venv/bin/python scripts/bench_fold.py --layers 2 --hidden 512 --intermediate 2048 --vocab 4096   # a quick check
    .venv/bin/python scripts/bench_fold.py --write-docs docs/benchmarks.md

The page cache is warmed (the base read once) before the first contender, so all of them read from
memory; outputs are deleted after each run. The oftmerge and PEFT outputs are compared tensor by
tensor (one bf16 rounding apart at most, as PEFT also computes in float32 and rounds once).
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


# -- inputs --------------------------------------------------------------------------------------


def make_base(path: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig

    from oftmerge.engine.commit import atomic_directory
    from oftmerge.formats.shards import ShardedWriter

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128, vocab_size=args.vocab,
        max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    h, m = args.hidden, args.intermediate
    shapes = {"model.embed_tokens.weight": (args.vocab, h)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (m, h)
        shapes[p + "mlp.up_proj.weight"] = (m, h)
        shapes[p + "mlp.down_proj.weight"] = (h, m)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (args.vocab, h)
    g = torch.Generator().manual_seed(0)
    with atomic_directory(path) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=args.shard_size)
        for name, shape in shapes.items():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            writer.add(name, t.to(torch.bfloat16))
        writer.close()
        (tmp / "config.json").write_text(config.to_json_string())
    print(f"base: {sum(torch.Size(s).numel() for s in shapes.values()) / 1e9:.2f} B parameters in {path}")


def make_adapter(path: Path, base: Path, args: argparse.Namespace) -> None:
    import peft
    import torch
    from safetensors.torch import save_file

    from oftmerge.formats.checkpoint import Checkpoint
    from oftmerge.formats.writer import CURRENT_CONFIG_TEMPLATE

    b = args.block_size
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ckpt = Checkpoint(base)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for key in ckpt.keys_in_file_order():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            rows = ckpt.shape(key)[1] // b
            tensors[f"base_model.model.{module}.oft_R.weight"] = torch.randn(rows, b * (b - 1) // 2, generator=g) * 0.01
    config = dict(CURRENT_CONFIG_TEMPLATE)
    config.update(peft_version=peft.__version__, target_modules=targets, oft_block_size=b, r=0, base_model_name_or_path=str(base))
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    print(f"adapter: {len(tensors)} modules, block size {b}, in {path}")


# -- contenders (each runs in a child process) ---------------------------------------------------


def child_peft(base: str, adapter: str, out: str, shard_size: str) -> None:
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("ignore")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard_size)


def child_io(base: str, out: str, sync: bool) -> None:
    from safetensors.torch import load_file, save_file

    os.makedirs(out)
    for name in sorted(os.listdir(base)):
        src, dst = os.path.join(base, name), os.path.join(out, name)
        if name.endswith(".safetensors"):
            save_file(load_file(src), dst, metadata={"format": "pt"})
        else:
            shutil.copyfile(src, dst)
        if sync:
            with open(dst, "rb") as f:
                os.fsync(f.fileno())


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]}... failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def compare_outputs(ours: Path, theirs: Path) -> str:
    """How far oftmerge's tensors are from PEFT's, in bf16 roundings (one ulp of PEFT's value)."""
    import torch

    from oftmerge.formats.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    if set(a.keys()) != set(b.keys()):
        return f"different tensor names: {sorted(set(a.keys()) ^ set(b.keys()))[:4]}"
    differ = beyond = total = 0
    for key in sorted(a.keys()):
        x, y = a.read(key).float(), b.read(key).float()
        _, exp = torch.frexp(y)
        ulp = torch.ldexp(torch.full_like(y, torch.finfo(torch.bfloat16).eps), exp - 1)
        diff = (x - y).abs()
        differ += int((diff > 0).sum())
        # one rounding apart; entries that nearly cancel may also differ by float32 noise (1e-6 of the tensor's max)
        beyond += int((diff > ulp + 1e-6 * float(y.abs().max())).sum())
        total += y.numel()
    return (
        f"all {len(a.keys())} tensors compared with PEFT's: {differ:,d} of {total:,d} entries differ "
        f"({100 * differ / total:.3f}%), {beyond:,d} by more than one bf16 rounding"
    )


def machine() -> dict[str, str]:
    import torch

    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.rstrip()
    return {"nproc": str(os.cpu_count()), "free -g": free, "torch threads": str(torch.get_num_threads()), "torch": torch.__version__}


def add_model_arguments(p: argparse.ArgumentParser, workdir: str) -> None:
    """The synthetic model's shape (a Llama-3.2-1B-like 1.2 B by default), shards and work directory."""
    p.add_argument("--workdir", type=Path, default=Path(workdir))
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-size", default="5GB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "/tmp/oftmerge-bench")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="runs of each fast contender; the best is reported (PEFT runs once)")
    p.add_argument("--skip", action="append", default=[], choices=["oftmerge", "peft", "io", "io+sync"])
    p.add_argument("--write-docs", type=Path, help="replace the Fold section of this markdown file with the table")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "peft":
            child_peft(*rest)
        else:
            child_io(rest[0], rest[1], kind == "io+sync")
        return 0

    load_before = os.getloadavg()
    tag = f"h{args.hidden}-m{args.intermediate}-l{args.layers}-v{args.vocab}"
    base, adapter = args.workdir / f"base-{tag}", args.workdir / f"oft-{tag}-b{args.block_size}"
    if not base.exists():
        make_base(base, args)
    if not adapter.exists():
        make_adapter(adapter, base, args)
    for f in base.iterdir():  # warm the page cache: every contender reads the base from memory
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    py = sys.executable
    contenders = {
        "oftmerge": [py, "-m", "oftmerge", "fold", str(adapter), "--base", str(base), "-o", "{out}", "--shard-size", args.shard_size, "-q"],
        "peft": [py, __file__, "--child", "peft", str(base), str(adapter), "{out}", args.shard_size],
        "io": [py, __file__, "--child", "io", str(base), "{out}"],
        "io+sync": [py, __file__, "--child", "io+sync", str(base), "{out}"],
    }
    results: dict[str, tuple[float, float]] = {}
    all_runs: dict[str, list[tuple[float, float]]] = {}
    check = ""
    for name, cmd in contenders.items():
        if name in args.skip:
            continue
        out = args.workdir / f"out-{name}"
        runs = []
        for _ in range(1 if name == "peft" else args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_child([c.replace("{out}", str(out)) for c in cmd]))
            print(f"{name:<9} {runs[-1][0]:8.1f} s  {runs[-1][1]:6.2f} GB peak RSS", flush=True)
        results[name] = (min(t for t, _ in runs), max(r for _, r in runs))
        all_runs[name] = runs
        if name == "peft" and (args.workdir / "out-oftmerge").exists():
            check = compare_outputs(args.workdir / "out-oftmerge", out)
            print(check)
        if name != "oftmerge":
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(args.workdir / "out-oftmerge", ignore_errors=True)

    ratios = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    if "oftmerge" in results and "peft" in results:
        x = results["peft"][0] / results["oftmerge"][0]
        ratios.append(f"PEFT time / oftmerge time = {x:.1f}x (target >= 3x: {verdict(x >= 3)})")
        x = results["oftmerge"][1] / results["peft"][1]
        ratios.append(f"oftmerge peak RSS / PEFT peak RSS = {x:.3f} (target <= 0.25: {verdict(x <= 0.25)})")
    for floor in ("io", "io+sync"):
        if "oftmerge" in results and floor in results:
            x = results["oftmerge"][0] / results[floor][0]
            ratios.append(f"oftmerge time / {floor} floor time = {x:.2f}x (target <= 1.5x: {verdict(x <= 1.5)})")
    for r in ratios:
        print(r)
    ratios.append(f"load average (1 min) before / after the measurements: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} cores (other jobs shared the machine)")
    if args.write_docs:
        write_docs(args, results, all_runs, ratios, check, base)
    return 0


def write_docs(
    args: argparse.Namespace,
    results: dict[str, tuple[float, float]],
    all_runs: dict[str, list[tuple[float, float]]],
    ratios: list[str],
    check: str,
    base: Path,
) -> None:
    from oftmerge.formats.checkpoint import Checkpoint

    ckpt = Checkpoint(base)
    params = sum(torch_numel(ckpt.shape(k)) for k in ckpt.keys())
    info = machine()
    labels = {
        "oftmerge": "oftmerge fold (CLI, streaming)",
        "peft": "PEFT: from_pretrained + merge_and_unload + save_pretrained",
        "io": "I/O floor: safetensors load_file + save_file",
        "io+sync": "I/O floor + fsync of every file",
    }
    argv = " ".join(a for a in sys.argv[1:] if not a.startswith("--write-docs") and a != str(args.write_docs))
    lines = [
        "## Fold",
        "",
        f"Folding an OFT adapter (block size {args.block_size}, every linear layer) into a synthetic Llama-shaped model "
        f"of {params / 1e9:.2f} B parameters in bf16 (hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, vocab {args.vocab}, untied lm_head; shards of {args.shard_size}). "
        "Each contender runs in its own process; wall time includes starting Python and importing libraries; "
        "peak RSS is the child's `ru_maxrss`. The base is in the page cache for every contender. "
        f"The fast contenders ran {args.repeat} times each (best time reported, all runs listed), PEFT once.",
        "",
        "| contender | wall time (s) | peak RSS (GB) | all runs (s) |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {labels[n]} | {t:.1f} | {r:.2f} | {', '.join(f'{x:.1f}' for x, _ in all_runs[n])} |" for n, (t, r) in results.items()
    ]
    lines += ["", *[f"- {r}" for r in ratios]]
    if check:
        lines.append(f"- correctness: {check}")
    lines += [
        "",
        "What was profiled and changed, and where the time goes: [fold.md, performance notes](fold.md#performance-notes).",
        "",
        f"Machine: `nproc` = {info['nproc']}, torch threads = {info['torch threads']} (PEFT's default; `oftmerge fold` uses 1, "
        f"see fold.md), torch {info['torch']}; `free -g`:",
        "",
        "```",
        info["free -g"],
        "```",
        "",
        "Reproduce (generates the model under /tmp/oftmerge-bench on first use, ~2.4 GB):",
        "",
        "```",
        f".venv/bin/python scripts/bench_fold.py {argv}".rstrip(),
        "```",
        "",
    ]
    path = args.write_docs
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    section = "\n".join(lines)
    if "## Fold\n" in text:
        head, _, rest = text.partition("## Fold\n")
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote the Fold section of {path}")


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
