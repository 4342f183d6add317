"""Why does a 4-way merge of the bundled experts keep some skills better than others?

Runs, on the bundled adapters, and writes a markdown report (default docs/demo_experiments.md):
  1. every pair of experts merged with OrthoMerge (how much of each skill survives a 2-way merge);
  2. the 4-way OrthoMerge at several global scales (is the merged rotation too weak or too strong?);
  3. the 4-way merge with the other so(b) methods (mean_q, mean_r, karcher, sequential, per-block norms);
  4. per-module diagnostics: ||Q|| per expert and the cosines between experts' generators.

    .venv/bin/python scripts/demo_experiments.py [--n 200] [--out docs/demo_experiments.md]

Every number in the report comes from this script; re-running it gives the same numbers.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="test prompts per task")
    parser.add_argument("--out", default=str(ROOT / "docs" / "demo_experiments.md"))
    parser.add_argument("--adapters", default=str(ROOT / "adapters"))
    args = parser.parse_args(argv)

    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oftmerge import merge_adapters
    from oftmerge.demo.evaluate import format_table, score
    from oftmerge.ops.inspect import inspect_adapters
    from oftmerge.ops.merge import quiet_merge_log

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    started = time.perf_counter()
    adapters = Path(args.adapters)
    experts = {p.name.removeprefix("oft-"): p for p in sorted(adapters.glob("oft-*"))}
    tasks = list(experts)
    tok = AutoTokenizer.from_pretrained(str(adapters / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(adapters / "base"), dtype=torch.float32).eval()
    tmp = Path(tempfile.mkdtemp(prefix="oftmerge-exp-"))
    counter = itertools.count()

    def evaluate(paths, **kwargs):
        out = tmp / f"m{next(counter)}"
        with quiet_merge_log():
            merge_adapters(paths, out_dir=out, **kwargs)
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).merge_and_unload().eval()
        with torch.no_grad():
            return score(model, tok, tasks, args.n)

    def mean_on(res, names):
        return sum(res[t]["acc"] for t in names) / len(names)

    lines = [
        "# Experiments on the bundled adapters",
        "",
        f"Made by `.venv/bin/python scripts/demo_experiments.py --n {args.n}`; exact-match accuracy in % ± "
        "standard error (answer NLL) on the test split. See [demo.md](demo.md) for how to read them.",
        "",
    ]
    singles = {}
    with torch.no_grad():
        singles["base"] = score(base, tok, tasks, args.n)
        for t, p in experts.items():
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(p)).merge_and_unload().eval()
            singles[f"expert {t}"] = score(model, tok, tasks, args.n)

    lines += ["## 1. Pairs (OrthoMerge)", "", "| pair | " + " | ".join(tasks) + " | kept of own gain |", "|---" * (len(tasks) + 2) + "|"]
    for a, b in itertools.combinations(tasks, 2):
        res = evaluate([experts[a], experts[b]])
        cells = [f"{100 * res[t]['acc']:.1f} ± {100 * res[t]['acc_se']:.1f}" for t in tasks]
        kept = []
        for t in (a, b):
            gain = singles[f"expert {t}"][t]["acc"] - singles["base"][t]["acc"]
            kept.append(f"{t} {100 * (res[t]['acc'] - singles['base'][t]['acc']) / gain:.0f}%" if gain > 0 else f"{t} n/a")
        lines.append(f"| {a}+{b} | " + " | ".join(cells) + " | " + ", ".join(kept) + " |")
    lines.append("")

    lines += ["## 2. All four, OrthoMerge at several global scales", ""]
    scaled = {}
    for s in (0.75, 1.0, 1.5, 2.0):
        scaled[f"scale {s}"] = evaluate(list(experts.values()), scale=s)
    lines += [format_table({**singles, **scaled}, tasks), ""]

    lines += ["## 3. All four, other methods", ""]
    others = {
        "orthomerge": scaled["scale 1.0"],
        "orthomerge per_block": evaluate(list(experts.values()), method_options={"per_block": True}),
        "mean_q": evaluate(list(experts.values()), method="mean_q"),
        "mean_r": evaluate(list(experts.values()), method="mean_r"),
        "karcher": evaluate(list(experts.values()), method="karcher"),
        "sequential": evaluate(list(experts.values()), method="sequential"),
    }
    lines += [format_table(others, tasks), ""]

    report = inspect_adapters(list(experts.values()))
    lines += ["## 4. Generators", "", "| expert | ||Q||_F per module (min / median / max) | worst ||R^T R - I|| applied |", "|---|---|---|"]
    for t, a in zip(experts, report["adapters"]):
        q = a["q_norm"]
        lines.append(f"| {t} | {q['min']:.2f} / {q['median']:.2f} / {q['max']:.2f} | {a['ortho_error_max']:.1e} |")
    lines += ["", "| pair | cosine between generators per module (min / median / max) |", "|---|---|"]
    for p in report["pairs"]:
        c = p["cosine"]
        lines.append(f"| {tasks[p['a']]}+{tasks[p['b']]} | {c['min']:.3f} / {c['median']:.3f} / {c['max']:.3f} |")
    cs = [m["c"] for m in report["merge"]["modules"].values()]
    lines += ["", f"Magnitude correction c of the 4-way merge: {min(cs):.2f} .. {max(cs):.2f} (2.0 would mean four orthogonal generators of equal size).", ""]
    lines.append(f"_Run time: {time.perf_counter() - started:.0f} s._")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
