#!/usr/bin/env python3
"""Generate golden OFT fixtures from real PEFT releases.

Driver (default mode)
    For every PEFT release in ``RELEASES`` create (or reuse) a throw-away virtualenv
    ``/tmp/oftgold-venv-<peft>``, install ``torch==2.13.0`` FIRST (pip takes the local
    CPU wheel for exactly that version; any other torch spec would pull a multi-GB CUDA
    build), then that PEFT release with a transformers release known to work with it,
    and run this same script with ``--worker`` inside the venv.  For the current
    release the project's own ``.venv`` is used when it already has that PEFT.

Worker (``--worker``)
    Runs inside a venv with one PEFT release.  For each case the release supports it
    builds the tiny model of ``tests/fixtures/golden/golden_model.py``, wraps it with
    ``get_peft_model(OFTConfig(...))``, overwrites every OFT parameter with seeded random
    values (a fresh adapter is the identity and would test nothing), saves the adapter,
    runs the forward, merges, and writes ``tests/fixtures/golden/peft-<ver>/<case>/``:

    * ``base.safetensors``      base state_dict before adaptation
    * ``adapter/``              exactly what ``save_pretrained`` wrote
    * ``input.safetensors``     the input (``x``; plus ``ids`` / ``img`` when used)
    * ``expected.safetensors``  ``out_base``, ``out_peft`` (PEFT forward before merging),
                                ``out_merged`` (after ``merge_and_unload``), ``merged.<key>``
                                (full state_dict after merging) and, for COFT cases,
                                ``adapter_after_forward.<key>`` (PEFT projects the stored
                                generators in place during forward)
    * ``meta.json``             versions, OFTConfig kwargs, per-module block size/count as
                                PEFT reports them, purpose, warnings, consistency numbers

Usage::

    python3 scripts/make_golden_fixtures.py                 # all releases
    python3 scripts/make_golden_fixtures.py --releases 0.13.2 0.17.1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "tests" / "fixtures" / "golden"
MODEL_FILE = GOLDEN_DIR / "golden_model.py"

TORCH_SPEC = "torch==2.13.0"  # the only torch pip may install here (local CPU wheel)

# PEFT release -> extra requirements that were found to work with it (see README.md).
RELEASES: dict[str, list[str]] = {
    "0.13.2": ["transformers==4.46.3", "numpy"],
    "0.15.2": ["transformers==4.51.3", "numpy"],
    "0.17.1": ["transformers==4.56.2", "numpy"],
    "0.18.1": ["transformers==4.57.6", "numpy"],
    "0.21.2": ["transformers==5.23.0", "numpy"],
}
CURRENT_RELEASE = "0.21.2"
MAIN_VENV = REPO / ".venv"


# --------------------------------------------------------------------------- driver


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_peft_version(py: Path) -> str | None:
    if not py.exists():
        return None
    r = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('peft'))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_venv(release: str, venv_root: Path, use_main_venv: bool) -> Path:
    """Return a python that has exactly PEFT ``release`` (creating the venv if needed)."""
    if use_main_venv and release == CURRENT_RELEASE and _venv_peft_version(_venv_python(MAIN_VENV)) == release:
        print(f"[{release}] using the project venv {MAIN_VENV}", flush=True)
        return _venv_python(MAIN_VENV)
    venv = venv_root / f"oftgold-venv-{release}"
    py = _venv_python(venv)
    marker = venv / ".oftgold-ready"
    if marker.exists() and _venv_peft_version(py) == release:
        print(f"[{release}] reusing {venv}", flush=True)
        return py
    print(f"[{release}] creating {venv}", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    # torch FIRST, pinned: the local CPU wheel.  Never let pip pick another torch.
    subprocess.run(pip + [TORCH_SPEC], check=True)
    subprocess.run(pip + [f"peft=={release}", TORCH_SPEC] + RELEASES[release], check=True)
    if _venv_peft_version(py) != release:
        raise SystemExit(f"venv {venv} does not have peft=={release}")
    marker.write_text(release + "\n")
    return py


def run_driver(args: argparse.Namespace) -> None:
    for release in args.releases:
        if release not in RELEASES:
            raise SystemExit(f"unknown release {release}; known: {sorted(RELEASES)}")
    for release in args.releases:  # sequential on purpose: the machine is small
        py = ensure_venv(release, Path(args.venv_root), not args.no_main_venv)
        cmd = [str(py), str(Path(__file__).resolve()), "--worker", "--peft-version", release, "--out", args.out]
        print(f"[{release}] running worker", flush=True)
        # PEFT stores target_modules as a set: fix the hash seed so that adapter_config.json
        # comes out byte-identical on every regeneration.
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})


# --------------------------------------------------------------------------- worker


def _load_golden_model():
    spec = importlib.util.spec_from_file_location("golden_model", MODEL_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LINEAR_TARGETS = ["sq", "tall", "wide", "head"]


def cases_for(ver) -> list[dict]:
    """Cases the release supports.  ``ver`` is a packaging Version."""
    from packaging.version import Version

    cases: list[dict] = []

    def add(name, purpose, kwargs, targets=LINEAR_TARGETS, **extra):
        cases.append(dict(name=name, purpose=purpose, kwargs=kwargs, targets=list(targets), **extra))

    if ver < Version("0.14"):
        # 0.7 - 0.13: only `r` (number of blocks, on the OUTPUT side, b = ceil(out / r)).
        add("exact_r4", "exact Cayley (the only map in <= 0.15), r=4 blocks on the OUTPUT side: b=ceil(out/4) "
            "= 4,6,3,2; wide (out 10) gets a 12x12 block-diagonal cut to 10x10", dict(r=4))
        add("r3_uneven", "r=3: b=ceil(out/3) = 6,8,4,3; sq, wide and head have r*b > out (cut)", dict(r=3))
        add("block_share", "block_share=True with r=4: one (1,b,b) generator repeated r times", dict(r=4, block_share=True))
        add("coft", "COFT with an eps that bites (generators projected)", dict(r=4, coft=True, eps=0.01), coft="bites")
        add("coft_loose", "COFT with an eps too large to change anything", dict(r=4, coft=True, eps=1.0), coft="loose")
        add("bin_format", "adapter saved with safe_serialization=False (adapter_model.bin)", dict(r=4),
            safe_serialization=False)
        add("conv", "Conv2d 2->4 3x3 only, r=2 (b=2 on the 4 output channels)", dict(r=2), targets=["conv"], img=True)
    elif ver < Version("0.16"):
        # 0.14 - 0.15: r or oft_block_size, input side, oft_s scale, exact Cayley only.
        add("exact_bs4", "oft_block_size=4: head (in 10) adjusted to block size 5", dict(r=0, oft_block_size=4))
        add("exact_bs8", "oft_block_size=8: head (in 10) adjusted to block size 10 (one block)",
            dict(r=0, oft_block_size=8))
        add("r_given", "r=4 (blocks on the input side): b = 4,4,6 and head r adjusted 4->5 (b=2)",
            dict(r=4, oft_block_size=0))
        add("block_share", "block_share=True, oft_block_size=4", dict(r=0, oft_block_size=4, block_share=True))
        add("coft", "COFT with an eps that bites", dict(r=0, oft_block_size=4, coft=True, eps=0.01), coft="bites")
        add("coft_loose", "COFT with an eps too large to change anything",
            dict(r=0, oft_block_size=4, coft=True, eps=1.0), coft="loose")
        add("bin_format", "adapter saved with safe_serialization=False (adapter_model.bin)",
            dict(r=0, oft_block_size=4), safe_serialization=False)
        add("conv", "Conv2d 2->4 3x3 only; flattened width 18, oft_block_size 4 adjusted to 3",
            dict(r=0, oft_block_size=4), targets=["conv"], img=True)
    else:
        exact = dict(use_cayley_neumann=False)
        add("exact_bs4", "exact Cayley, oft_block_size=4: head (in 10) adjusted to 5",
            dict(r=0, oft_block_size=4, **exact))
        add("neumann5_bs8", "Cayley-Neumann with the default number of terms (5), oft_block_size=8 (head -> 10)",
            dict(r=0, oft_block_size=8, use_cayley_neumann=True))
        add("neumann3_bs8", "Cayley-Neumann with 3 terms, oft_block_size=8",
            dict(r=0, oft_block_size=8, use_cayley_neumann=True, num_cayley_neumann_terms=3))
        add("neumann4_bs8", "Cayley-Neumann with 4 terms (in >= 0.18 identical to 3 terms), oft_block_size=8",
            dict(r=0, oft_block_size=8, use_cayley_neumann=True, num_cayley_neumann_terms=4))
        add("r_given", "r=4 given instead of a block size: b = 4,4,6, head r 4->5 (b=2); config defaults "
            "otherwise, i.e. Neumann 5",
            dict(r=4, oft_block_size=0))
        add("block_share", "block_share=True, oft_block_size=4 (config defaults otherwise, i.e. Neumann 5)",
            dict(r=0, oft_block_size=4, block_share=True))
        add("coft", "COFT with an eps that bites, exact Cayley",
            dict(r=0, oft_block_size=4, coft=True, eps=0.05, **exact), coft="bites")
        add("coft_loose", "COFT with an eps too large to change anything, exact Cayley",
            dict(r=0, oft_block_size=4, coft=True, eps=5.0, **exact), coft="loose")
        add("bin_format", "adapter saved with safe_serialization=False (adapter_model.bin), exact Cayley",
            dict(r=0, oft_block_size=4, **exact), safe_serialization=False)
        add("conv", "Conv2d 2->4 3x3 only, exact Cayley; flattened width 18, oft_block_size 4 adjusted to 3",
            dict(r=0, oft_block_size=4, **exact), targets=["conv"], img=True)
        try:
            from peft.tuners.oft.layer import Embedding  # noqa: F401

            has_emb = True
        except ImportError:
            has_emb = False
        if has_emb:
            add("embedding", "OFT on nn.Embedding (columns rotated) plus sq, exact Cayley, oft_block_size=8",
                dict(r=0, oft_block_size=8, **exact), targets=["emb", "sq"], ids=True)
    return cases


def _case_seed(release: str, name: str) -> int:
    return zlib.crc32(f"{release}/{name}".encode()) & 0x7FFFFFFF


def _module_report(peft_model, adapter="default") -> dict:
    import torch

    report = {}
    base = peft_model.base_model.model
    for path, mod in base.named_modules():
        if not hasattr(mod, "get_base_layer") or mod is base:
            continue
        if not any(hasattr(mod, a) for a in ("oft_r", "oft_R", "oft_embedding_R")):
            continue
        bl = mod.get_base_layer()
        info = {"type": type(bl).__name__}
        if isinstance(bl, torch.nn.Linear):
            info.update(in_features=bl.in_features, out_features=bl.out_features)
        elif isinstance(bl, torch.nn.Conv2d):
            info.update(in_channels=bl.in_channels, out_channels=bl.out_channels, kernel_size=list(bl.kernel_size),
                        flattened_in=bl.in_channels * bl.kernel_size[0] * bl.kernel_size[1])
        elif isinstance(bl, torch.nn.Embedding):
            info.update(num_embeddings=bl.num_embeddings, embedding_dim=bl.embedding_dim)
        r = getattr(mod, "r", {}).get(adapter)
        info["peft_r_attr"] = r
        bs = getattr(mod, "oft_block_size", None)
        if isinstance(bs, dict):
            info["peft_oft_block_size_attr"] = bs.get(adapter)
        if hasattr(mod, "oft_r") and adapter in getattr(mod, "oft_r", {}):
            t = mod.oft_r[adapter]
            info["block_size"] = int(t.shape[-1])
            info["num_blocks"] = int(r)
            info["param_shape"] = list(t.shape)
            info["block_share"] = bool(mod.block_share[adapter])
            info["eps_attr"] = float(mod.eps[adapter])
            if hasattr(mod, "oft_s") and adapter in mod.oft_s:
                info["oft_s_shape"] = list(mod.oft_s[adapter].shape)
        else:
            holder = getattr(mod, "oft_R", {})
            if adapter not in holder:
                holder = getattr(mod, "oft_embedding_R", {})
            rot = holder[adapter]
            info["block_size"] = int(rot.block_size)
            info["num_blocks"] = int(r)
            info["param_shape"] = list(rot.weight.shape)
            info["block_share"] = bool(rot.block_share)
            info["eps_attr"] = float(rot.eps)
            info["rotation_in_features_attr"] = int(rot.in_features)
            info["use_cayley_neumann_attr"] = bool(rot.use_cayley_neumann)
            info["num_cayley_neumann_terms_attr"] = int(rot.num_cayley_neumann_terms)
        report[path] = info
    return report


def _randomize_oft_params(peft_model, seed: int, std: float = 0.1) -> list[str]:
    import torch

    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".oft_" not in name:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if ".oft_s." in name:  # 0.14-0.15 magnitude scale: around 1, not 0
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))
            names.append(name)
    if not names:
        raise RuntimeError("no OFT parameter found to randomize")
    return names


def _run_case(release: str, case: dict, out_root: Path, gm) -> dict:
    import peft
    import safetensors.torch as st
    import torch
    import transformers
    from peft import OFTConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict

    name = case["name"]
    dtype = case.get("dtype", torch.float32)
    case_dir = out_root / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    caught: list[warnings.WarningMessage]
    seed = _case_seed(release, name)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        model = gm.make_model(gm.DEFAULT_SEED, dtype=dtype)
        base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        st.save_file(base_sd, str(case_dir / "base.safetensors"))
        inputs = gm.make_inputs(seed=99, ids=case.get("ids", False), img=case.get("img", False), dtype=dtype)
        st.save_file({k: v.contiguous() for k, v in inputs.items()}, str(case_dir / "input.safetensors"))
        with torch.no_grad():
            out_base = model(**inputs).detach().clone()

        kwargs = dict(case["kwargs"])
        config = OFTConfig(target_modules=case["targets"], **kwargs)
        peft_model = get_peft_model(model, config)
        randomized = _randomize_oft_params(peft_model, seed)
        peft_model.eval()
        modules = _module_report(peft_model)

        # Save BEFORE the forward: for COFT the forward projects the stored generators in
        # place, and a checkpoint written after training holds unprojected values too.
        safe = case.get("safe_serialization", True)
        with tempfile.TemporaryDirectory() as td:
            peft_model.save_pretrained(td, safe_serialization=safe)
            shutil.copytree(td, case_dir / "adapter")
        sd_before = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}

        with torch.no_grad():
            out_peft = peft_model(**inputs).detach().clone()
        sd_after = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        projection_changed = {
            k: float((sd_after[k].float() - sd_before[k].float()).abs().max()) for k in sd_before
        }

        # Reload what was saved, with this same release, and check it reproduces out_peft.
        model2 = gm.make_model(gm.DEFAULT_SEED, dtype=dtype)
        reloaded = PeftModel.from_pretrained(model2, str(case_dir / "adapter"))
        reloaded.eval()
        with torch.no_grad():
            out_reloaded = reloaded(**inputs).detach().clone()

        with torch.no_grad():
            merged_model = peft_model.merge_and_unload()
            out_merged = merged_model(**inputs).detach().clone()
        merged_sd = {f"merged.{k}": v.detach().clone().contiguous() for k, v in merged_model.state_dict().items()}

    expected = {"out_base": out_base, "out_peft": out_peft, "out_merged": out_merged, **merged_sd}
    if case.get("coft"):
        expected.update({f"adapter_after_forward.{k}": v.contiguous() for k, v in sd_after.items()})
    st.save_file({k: v.contiguous() for k, v in expected.items()}, str(case_dir / "expected.safetensors"))

    diff = float((out_peft.float() - out_merged.float()).abs().max())
    scale = float(out_merged.float().abs().max())
    tol = 2e-2 * max(scale, 1.0) if dtype != torch.float32 else 1e-4 * max(scale, 1.0)
    agree = diff <= tol
    reload_diff = float((out_reloaded.float() - out_peft.float()).abs().max())
    adapter_effect = float((out_peft.float() - out_base.float()).abs().max())

    notes = []
    if not agree:
        notes.append(
            "PEFT's own forward (out_peft) disagrees with its merge (out_merged) for this case; "
            "out_merged / merged.* are what merge_and_unload wrote. See README.md."
        )
    coft_changed = {k: v > 0 for k, v in projection_changed.items() if not k.endswith(".oft_s")}
    if case.get("coft") == "bites" and not all(coft_changed.values()):
        notes.append(f"WARNING: COFT eps did not bite on every module: {coft_changed}")
    if case.get("coft") == "loose" and any(coft_changed.values()):
        notes.append(f"WARNING: COFT eps bit on some module: {coft_changed}")
    if not case.get("coft") and any(coft_changed.values()):
        notes.append("WARNING: forward changed adapter parameters although coft is off")
    if adapter_effect < 1e-3:
        notes.append("WARNING: the adapter barely changes the output")
    if reload_diff > 1e-5 * max(scale, 1.0) and dtype == torch.float32:
        notes.append(f"WARNING: reloading the saved adapter changed the output by {reload_diff}")

    adapter_files = sorted(p.name for p in (case_dir / "adapter").iterdir())
    cfg = json.loads((case_dir / "adapter" / "adapter_config.json").read_text())
    adapter_file = case_dir / "adapter" / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    if safe:
        saved = st.load_file(str(adapter_file))
    else:
        saved = torch.load(str(adapter_file), map_location="cpu", weights_only=True)
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in seen:
            seen.append(msg)
    meta = {
        "case": name,
        "purpose": case["purpose"],
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": sys.version.split()[0],
        "model": {"file": "golden_model.py", "MODEL_VERSION": gm.MODEL_VERSION, "seed": gm.DEFAULT_SEED,
                  "dtype": str(dtype).replace("torch.", "")},
        "input": {"seed": 99, "keys": sorted(inputs)},
        "oft_config_kwargs": {"target_modules": case["targets"], **kwargs},
        "safe_serialization": safe,
        "adapter_files": adapter_files,
        "adapter_config_has_peft_version": "peft_version" in cfg,
        "adapter_config_peft_version": cfg.get("peft_version"),
        "adapter_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                            for k, v in sorted(saved.items())},
        "randomized_parameters": randomized,
        "random_init": {"seed": seed, "std": 0.1, "oft_s": "1 + 0.1 * N(0,1)" if any(".oft_s." in n for n in randomized) else None},
        "modules": modules,
        "coft_projection_max_change": projection_changed if case.get("coft") else None,
        "max_abs_diff_out_peft_vs_out_merged": diff,
        "peft_forward_matches_merge": agree,
        "max_abs_diff_reloaded_vs_out_peft": reload_diff,
        "max_abs_diff_out_peft_vs_out_base": adapter_effect,
        "warnings": seen,
        "notes": notes,
    }
    text = json.dumps(meta, indent=2, sort_keys=False)
    # keep short lists of numbers/strings on one line
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
    (case_dir / "meta.json").write_text(text + "\n")
    return meta


def run_worker(args: argparse.Namespace) -> None:
    import peft
    import torch
    from packaging.version import Version

    if peft.__version__ != args.peft_version:
        raise SystemExit(f"worker expected peft=={args.peft_version}, found {peft.__version__}")
    torch.set_num_threads(1)
    gm = _load_golden_model()
    ver = Version(peft.__version__)
    out_root = Path(args.out).resolve() / f"peft-{peft.__version__}"
    if out_root.exists():
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True)
    cases = cases_for(ver)
    if peft.__version__ == CURRENT_RELEASE:
        cases.append(dict(name="bf16", purpose="base model in bfloat16 (adapter kept in float32 by PEFT's "
                          "autocast_adapter_dtype), exact Cayley, oft_block_size=4",
                          kwargs=dict(r=0, oft_block_size=4, use_cayley_neumann=False),
                          targets=LINEAR_TARGETS, dtype=torch.bfloat16))
    summary = {}
    for case in cases:
        meta = _run_case(peft.__version__, case, out_root, gm)
        summary[case["name"]] = {
            "diff_peft_vs_merged": meta["max_abs_diff_out_peft_vs_out_merged"],
            "agree": meta["peft_forward_matches_merge"],
            "blocks": {m: (i["block_size"], i["num_blocks"]) for m, i in meta["modules"].items()},
            "notes": meta["notes"],
        }
        print(f"  [{peft.__version__}] {case['name']}: diff={meta['max_abs_diff_out_peft_vs_out_merged']:.2e} "
              f"agree={meta['peft_forward_matches_merge']} blocks={summary[case['name']]['blocks']}"
              + (f" notes={meta['notes']}" if meta["notes"] else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="internal: run inside a venv with one PEFT release")
    ap.add_argument("--peft-version", help="(worker) the PEFT release expected in this interpreter")
    ap.add_argument("--releases", nargs="+", default=list(RELEASES), help="PEFT releases to generate for")
    ap.add_argument("--out", default=str(GOLDEN_DIR), help="fixture root (default: tests/fixtures/golden)")
    ap.add_argument("--venv-root", default="/tmp", help="where the throw-away venvs live (default /tmp)")
    ap.add_argument("--no-main-venv", action="store_true",
                    help=f"do not use {MAIN_VENV} for {CURRENT_RELEASE}; build a venv for it too")
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
