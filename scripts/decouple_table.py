#!/usr/bin/env python
"""Score TA / TIES / DARE / TSV-M alone and with OrthoMerge-G / -C decoupling -> docs/decoupling.md.

Merges the four tiny-task experts of each kind (scratch/experts/{lora,full}-<task>/, made by
scripts/train_lora_full_experts.py) into adapters/base/ with ``oftmerge.decouple_merge``, scores
every merged model on the four tasks (oftmerge.demo.evaluate: greedy exact match ± SE and
answer NLL, test split) and writes the tables, the decoupling diagnostics and the exact
commands between the ``decouple-table`` markers of docs/decoupling.md. ``--memory`` also
measures the peak RSS of decoupling synthetic models of growing depth and width (each run in
a fresh process) against the bound stated in the docs.

    .venv/bin/python scripts/train_lora_full_experts.py     # the experts (~10 min)
    .venv/bin/python scripts/decouple_table.py --memory     # merges + scores + memory (~15 min)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from oftmerge.demo.tasks import TASK_NAMES  # noqa: E402
from oftmerge.ops.decouple import decouple_merge  # noqa: E402

DOC = REPO / "docs" / "decoupling.md"
MARKERS = {"table": ("<!-- decouple-table:start -->", "<!-- decouple-table:end -->"),
           "memory": ("<!-- decouple-memory:start -->", "<!-- decouple-memory:end -->")}
EUCLIDEAN = ("ta", "ties", "dare", "tsv")
LABEL = {"ta": "TA", "ties": "TIES", "dare": "DARE", "tsv": "TSV-M"}
#: (row suffix, orthogonal, target, procrustes)
VARIANTS = (("", None, "global", "robust"), (" + OrthoMerge-G", "orthomerge", "global", "robust"),
            (" + OrthoMerge-C", "orthomerge", "conflict", "robust"))
#: (label, euclidean, orthogonal, target, procrustes, euclidean options): a scale control and the reference solver
EXTRA = (("TA, scale 1/N (the mean)", "ta", None, "global", "robust", {"scale": 0.25}),
         ("TA + OrthoMerge-G, reference Procrustes", "ta", "orthomerge", "global", "reference", {}))


def _score(path: Path, tok, n: int, adapter: Path | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from oftmerge.demo.evaluate import score

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return score(model, tok, TASK_NAMES, n, split="test", seed=0)


def _diag_row(label: str, totals: dict, seconds: float) -> str:
    fit = totals["mean_fit"]
    return (f"| {label} | {totals['decoupled']} | {totals['fallbacks']} | {totals['max_q_norm']:.3g} | "
            f"{'-' if fit is None else f'{fit:.3f}'} | {totals['max_shift_ratio']:.3g} | {totals['min_margin']:.3g} | "
            f"{totals['det_flips']} | {totals['max_merged_ortho_error']:.1e} | {seconds:.1f} |")


def quality(args) -> str:
    from transformers import AutoTokenizer

    from oftmerge.demo.evaluate import format_table

    tok = AutoTokenizer.from_pretrained(args.base)
    sections = []
    base_scores = _score(args.base, tok, args.n)
    for kind in args.kinds:
        experts = [args.experts / f"{kind}-{t}" for t in TASK_NAMES]
        missing = [str(e) for e in experts if not e.is_dir()]
        if missing:
            raise SystemExit(f"missing experts {missing}: run scripts/train_lora_full_experts.py first")
        results = {"base": base_scores}
        for t, e in zip(TASK_NAMES, experts):
            results[f"{kind} expert: {t}"] = _score(args.base, tok, args.n, e) if kind == "lora" else _score(e, tok, args.n)
        diag = ["| merge | decoupled tensors | fallbacks | max ||Q_i||_F | mean fit | max shift / ||tau|| | "
                "min margin | det flips | max ||R_m^T R_m - I|| | seconds |", "|---" * 10 + "|"]
        runs = [(f"{LABEL[e]}{sfx}", e, o, t, p, {}) for e in EUCLIDEAN for sfx, o, t, p in VARIANTS] + list(EXTRA)
        for label, eu, orth, target, procrustes, opts in runs:
            out = args.work / (f"{kind}-{eu}-{orth}-{target}-{procrustes}" + "".join(f"-{k}{v}" for k, v in opts.items()))
            t0 = time.time()
            res = decouple_merge(args.base, experts, euclidean=eu, orthogonal=orth, target=target,
                                 procrustes=procrustes, euclidean_options=opts, out_dir=out, overwrite=True)
            seconds = time.time() - t0
            results[label] = _score(out, tok, args.n)
            if orth is not None:
                diag.append(_diag_row(label, res.totals(), seconds))
            mean = sum(results[label][t]["acc"] for t in TASK_NAMES) / len(TASK_NAMES)
            print(f"  [{kind}] {label}: mean acc {100 * mean:.1f}% ({seconds:.1f}s merge)", flush=True)
        sections += [f"### {kind.upper()} experts ({len(experts)}-way merges)", "",
                     f"Test split, {args.n} prompts per task, seed 0; cell = exact-match accuracy % ± SE "
                     "(answer NLL, nats/token).", "", format_table(results), "",
                     "Decoupling diagnostics (from `oftmerge.json` totals; fit = ||T_i - W0 R_i|| / ||T_i - W0||, "
                     "margin = smallest singular value of I + R_i):", "", *diag, ""]
    return "\n".join(sections)


# ----------------------------------------------------------------------------- memory


def _synthetic(root: Path, layers: int, out: int, inp: int, n: int) -> tuple[Path, list[Path]]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(out, inp, generator=g) / inp ** 0.5 for i in range(layers)}
    dirs = []
    for k, tensors in enumerate([base] + [{name: w + 0.05 * torch.randn(w.shape, generator=g) / inp ** 0.5
                                          for name, w in base.items()} for _ in range(n)]):
        d = root / ("base" if k == 0 else f"expert{k}")
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}\n")
        dirs.append(d)
    return dirs[0], dirs[1:]


def _status(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(args) -> None:
    """One measurement in a fresh process: the peak RSS of a decoupling run above the RSS before it.

    A warm-up merge of a tiny model first pays for imports and BLAS buffers; then the kernel's
    high-water mark is reset (``/proc/self/clear_refs``), so ``VmHWM`` is the peak of the run alone.
    """
    base, experts = Path(args.child[0]), [Path(p) for p in args.child[1:]]
    kw = dict(euclidean="ties", orthogonal="orthomerge", target="conflict", overwrite=True)
    warm_base, warm_experts = _synthetic(base.parent / "warm", 1, 16, 32, len(experts))
    decouple_merge(warm_base, warm_experts, out_dir=base.parent / "warm-merged", **kw)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    t0 = time.time()
    decouple_merge(base, experts, out_dir=base.parent / "merged", **kw)
    print(json.dumps({"baseline_mb": before, "peak_mb": _status("VmHWM"), "seconds": time.time() - t0}))


def bound_mb(out: int, inp: int, n: int) -> float:
    """The float64 working set of one decoupled (out, in) tensor with n experts, in MB (docs/decoupling.md).

    For a linear so(d) method (orthomerge, mean_q: the generators are summed as they are made).
    """
    if 2 * out < inp:  # row space: k = 2 out; one in x in sum, the merged generator, I + Q_m and its LU
        k = 2 * out
        words = 4 * inp**2 + (n + 3) * inp * k + (n + 14) * k**2 + (n + 1) * out * k + (5 * n + 4) * out * inp
    else:
        words = (n + 12) * inp**2 + (5 * n + 4) * out * inp
    return 8 * words / 2**20


def memory(args) -> str:
    import os
    import tempfile

    n = 4
    lines = [f"TIES + OrthoMerge-C, N = {n} full experts, synthetic float32 models with `layers` tensors of shape "
             "(out, in). Each run is a fresh process; after a warm-up merge of a tiny model (imports, BLAS buffers) "
             "the kernel's high-water mark is reset, and the peak RSS of the run is given above the RSS before it. The bound "
             "is the working set stated above (`bound_mb`: 8 B x [(N + 12) in^2 + (5N + 4) out in], or for wide layers "
             "8 B x [4 in^2 + (N + 3) in k + (N + 14) k^2 + (N + 1) out k + (5N + 4) out in] with k = 2 out). "
             "glibc's default malloc raises its mmap threshold as large blocks are freed, after which "
             "freed tensors fragment the heap and the peak creeps up by about a block per layer; with "
             "`MALLOC_MMAP_THRESHOLD_=65536` (fixed threshold) the peak is flat in the number of layers:", "",
             "| layers | out x in | model (MB, float32) | all inputs (MB) | bound (MB) | peak, default malloc (MB) | "
             "peak, fixed mmap threshold (MB) | seconds |", "|---" * 8 + "|"]
    for layers, out, inp in ((2, 256, 512), (8, 256, 512), (2, 512, 256), (2, 256, 1024), (2, 128, 2048)):
        peaks = []
        for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                base, experts = _synthetic(Path(tmp), layers, out, inp, n)
                cmd = [sys.executable, __file__, "--child", str(base), *map(str, experts)]
                run = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
                peaks.append(json.loads(run.stdout.strip().splitlines()[-1]))
        model_mb = layers * out * inp * 4 / 2 ** 20
        bound = bound_mb(out, inp, n)
        cells = " | ".join(f"{p['peak_mb'] - p['baseline_mb']:.0f}" for p in peaks)
        lines.append(f"| {layers} | {out} x {inp} | {model_mb:.0f} | {model_mb * (n + 1):.0f} | {bound:.0f} | {cells} | "
                     f"{peaks[0]['seconds']:.1f} |")
        print("  " + lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=REPO / "adapters" / "base")
    ap.add_argument("--experts", type=Path, default=REPO / "scratch" / "experts")
    ap.add_argument("--work", type=Path, default=REPO / "scratch" / "decouple")
    ap.add_argument("--kinds", nargs="*", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--n", type=int, default=200, help="test prompts per task")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS on synthetic models")
    ap.add_argument("--no-quality", action="store_true", help="skip the merges of the tiny experts")
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.child:
        return _child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    cmd = "    .venv/bin/python scripts/decouple_table.py " + " ".join(a for a in sys.argv[1:] if a != "--doc")
    note = ["", "<!-- written by scripts/decouple_table.py; do not edit by hand -->", ""]
    blocks = {}
    if not args.no_quality:
        blocks["table"] = [*note, "Commands (one torch thread, fixed seeds):", "",
                           "    .venv/bin/python scripts/train_lora_full_experts.py", cmd.rstrip(), "", quality(args)]
    if args.memory:
        blocks["memory"] = [*note, f"Command: `{cmd.strip()}`", "", memory(args)]
    text = args.doc.read_text()
    for key, body in blocks.items():
        start, end = MARKERS[key]
        if start not in text:
            text += f"\n{start}\n{end}\n"
        block = "\n".join([start, *body, end])
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, block=block: block, text, flags=re.S)
    args.doc.write_text(text)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
