"""SHA-256 of what every command writes for a fixed set of runs on the bundled adapters.

    python scripts/reference_outputs.py            # print {case: {file: sha256}} as JSON
    python scripts/reference_outputs.py --write    # store it in tests/fixtures/reference_outputs.json

``tests/system/test_reference_outputs.py`` runs the same cases and compares with the stored record, so
a change that alters a single output byte (a refactoring that should not) fails the suite. Re-record
only on purpose, with the reason in the commit message.

The cases use the CLI (``python -m oftmerge``) on ``adapters/`` plus two LoRA adapters and one full
finetune of ``adapters/base`` made here from fixed seeds. Text outputs are hashed with the run's
temporary directory and the repository root replaced by ``<tmp>`` and ``<repo>``. The inputs are
copied into the temporary directory first, with ``base_model_name_or_path`` set to a fixed name (the
bundled configs record a path of the machine they were trained on), so the record does not depend on
where the repository is checked out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "fixtures" / "reference_outputs.json"
OFT = [f"{{tmp}}/adapters/oft-{t}" for t in ("upper", "reverse", "sort", "add")]
BASE = "{tmp}/adapters/base"
LEGACY = [ROOT / "tests" / "fixtures" / "golden" / f"peft-{v}" for v in ("0.13.2", "0.15.2", "0.17.1")]

#: case -> CLI arguments ({tmp} is the run's temporary directory, {out} the case's output)
CASES: dict[str, list[str]] = {
    "merge-orthomerge": ["merge", *OFT[:2], "-o", "{out}"],
    "merge-weighted": ["merge", *OFT, "-o", "{out}", "--weights", "1,1,0.5,1", "--scale", "0.9"],
    "merge-negated": ["merge", *OFT[:2], "-o", "{out}", "--weights=1,-1"],
    "merge-mean_q": ["merge", *OFT[:3], "-o", "{out}", "--method", "mean_q"],
    "merge-mean_r": ["merge", *OFT[:2], "-o", "{out}", "--method", "mean_r"],
    "merge-sequential": ["merge", *OFT[:3], "-o", "{out}", "--method", "sequential"],
    "merge-karcher-exact": ["merge", *OFT[:2], "-o", "{out}", "--method", "karcher", "--cayley", "exact"],
    "merge-neumann3": ["merge", *OFT[1:3], "-o", "{out}", "--cayley", "neumann:3"],
    "merge-one": ["merge", OFT[2], "-o", "{out}"],
    "fold": ["fold", OFT[0], "--base", BASE, "-o", "{out}"],
    "merge-fold-into": ["merge", *OFT, "--fold-into", BASE, "-o", "{out}", "--shard-size", "1MB"],
    "decouple-ties-orthomerge": [
        "decouple", "--base", BASE, "{tmp}/lora-a", "{tmp}/lora-b", "{tmp}/full-c", "-o", "{out}",
        "--euclidean", "ties", "--orthogonal", "orthomerge",
    ],
    "decouple-tsv-alone": ["decouple", "--base", BASE, "{tmp}/lora-a", "{tmp}/lora-b", "-o", "{out}", "--euclidean", "tsv", "--orthogonal", "none"],
    "decouple-ta-sharded": [
        "decouple", "--base", BASE, "{tmp}/lora-a", "{tmp}/full-c", "-o", "{out}", "--euclidean", "ta",
        "--shard-size", "1MB",
    ],
}


def _convert_cases() -> dict[str, list[str]]:
    """``convert`` of every legacy golden fixture (those it refuses are recorded as refused)."""
    cases = {}
    for release in LEGACY:
        for case in sorted(release.iterdir()) if release.is_dir() else []:
            if (case / "adapter" / "adapter_config.json").is_file():
                cases[f"convert-{release.name}-{case.name}"] = ["convert", str(case / "adapter"), "-o", "{out}"]
    return cases


def copy_inputs(tmp: Path) -> None:
    """The bundled base and OFT adapters under ``tmp/adapters``, their configs naming the base ``tiny-base``."""
    import shutil

    src = ROOT / "adapters"
    shutil.copytree(src / "base", tmp / "adapters" / "base")
    for d in sorted(src.glob("oft-*")):
        shutil.copytree(d, tmp / "adapters" / d.name)
        config = json.loads((d / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "tiny-base"
        (tmp / "adapters" / d.name / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_experts(tmp: Path) -> None:
    """Two LoRA adapters and one full finetune of the bundled base, from fixed seeds (no training)."""
    import shutil
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    for k, name in enumerate(("lora-a", "lora-b")):
        model = AutoModelForCausalLM.from_pretrained(tmp / "adapters" / "base")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        peft_model.save_pretrained(str(tmp / name))
    full = tmp / "full-c"
    full.mkdir()
    for f in (tmp / "adapters" / "base").iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, full / f.name)
    g = torch.Generator().manual_seed(7)
    tensors = load_file(str(tmp / "adapters" / "base" / "model.safetensors"))
    out = {k: (t + 0.01 * torch.randn(t.shape, generator=g).to(t.dtype)) if t.is_floating_point() else t for k, t in sorted(tensors.items())}
    save_file(out, str(full / "model.safetensors"), metadata={"format": "pt"})


def _hash_dir(out: Path, tmp: Path) -> dict[str, str]:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix in (".json", ".md", ".txt", ".yaml"):
                data = data.replace(str(tmp).encode(), b"<tmp>").replace(str(ROOT).encode(), b"<repo>")
            files[str(p.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return files


def run_cases(cases: dict[str, list[str]] | None = None) -> dict[str, dict[str, str]]:
    if cases is None:
        cases = {**CASES, **_convert_cases()}
    env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    record: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="oftmerge-reference-") as t:
        tmp = Path(t).resolve()
        copy_inputs(tmp)
        make_experts(tmp)
        for name, args in cases.items():
            out = tmp / "out" / name
            argv = [a.format(tmp=tmp, out=out) for a in args]
            proc = subprocess.run([sys.executable, "-m", "oftmerge", *argv, "-q"], env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode == 2 and name.startswith("convert-") and not out.exists():
                record[name] = {"refused": "exit 2"}  # convert refuses what it cannot do exactly
                continue
            if proc.returncode != 0:
                raise SystemExit(f"case {name}: oftmerge {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
            record[name] = _hash_dir(out, tmp)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"store the record in {RECORD.relative_to(ROOT)}")
    args = parser.parse_args()
    record = run_cases()
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.write:
        RECORD.write_text(text, encoding="utf-8")
        print(f"wrote {RECORD} ({sum(len(v) for v in record.values())} files in {len(record)} cases)")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
