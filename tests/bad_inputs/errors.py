"""Bad-input cases: errors (see the package docstring).

What must end as one ``oftmerge: error:`` line with its documented exit code (docs/cli.md, "Exit
codes"; issue 16, items 4 and 7) instead of a traceback: the file system refusing the output (disk
full, read-only, immutable, ``/proc``), numbers out of range on the command line, wrong types in
``adapter_config.json``, broken base checkpoints (``config.json``, the shard index), the Hub out of
reach. Disk-full and read-only cases mount a small tmpfs (or ``chattr +i`` a directory) and skip
with the reason where that is not permitted; mounts are undone when the workspace goes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bad_inputs import Case, Workspace, complete

Setup = Callable[[Workspace], None]
FS, HUB = 3, 4  #: exit codes: the file system, the Hub (2: bad input, the default)


# -- what the machine allows: mounts and immutable directories ---------------------------------------------------


@functools.cache
def _mount_refused() -> str | None:
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts need Linux"
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"oftmerge-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    except OSError as exc:
        return f"cannot mount a tmpfs here: {exc}"
    finally:
        probe.rmdir()


@functools.cache
def _chattr_refused(where: str) -> str | None:
    probe = Path(where) / f".oftmerge-chattr-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot make a directory immutable here (chattr +i needs root and ext4/xfs/btrfs): {done.stderr.strip()}"
        subprocess.run(["chattr", "-i", str(probe)], check=True)
        return None
    except OSError as exc:
        return f"no chattr here: {exc}"
    finally:
        probe.rmdir()


def _no_mount(ws: Workspace) -> str | None:
    return _mount_refused()


def _no_chattr(ws: Workspace) -> str | None:
    return _chattr_refused(str(ws.root.parent))


def _tmpfs(rel: str, size: str, *, read_only: bool = False) -> Setup:
    """Mount a tmpfs of ``size`` at ``ws / rel`` (read-only with ``read_only``), unmounted when the workspace goes."""

    def setup(ws: Workspace) -> None:
        path = ws / rel
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size},mode=0777" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        weakref.finalize(ws, subprocess.run, ["umount", "-l", str(path)], check=False)

    return setup


def _immutable(rel: str) -> Setup:
    def setup(ws: Workspace) -> None:
        path = ws / rel
        path.mkdir()
        subprocess.run(["chattr", "+i", str(path)], check=True)
        weakref.finalize(ws, subprocess.run, ["chattr", "-i", str(path)], check=False)

    return setup


# -- bad inputs built from the bundled ones ---------------------------------------------------------------------


def _all(*steps: Setup) -> Setup:
    def setup(ws: Workspace) -> None:
        for step in steps:
            step(ws)

    return setup


def _config(src: str, dst: str, file: str = "adapter_config.json", **values: Any) -> Setup:
    """Copy directory ``src`` to ``dst`` and set ``values`` in its JSON ``file``."""

    def setup(ws: Workspace) -> None:
        shutil.copytree(ws / src, ws / dst)
        data = json.loads((ws / dst / file).read_text())
        data.update(values)
        (ws / dst / file).write_text(json.dumps(data))

    return setup


def _write(dst: str, file: str, text: str | None, src: str = "base") -> Setup:
    """Copy ``src`` to ``dst`` and write ``text`` to its ``file`` (remove the file when None)."""

    def setup(ws: Workspace) -> None:
        shutil.copytree(ws / src, ws / dst)
        if text is None:
            (ws / dst / file).unlink()
        else:
            (ws / dst / file).write_text(text)

    return setup


def _lora(name: str, **config: Any) -> Setup:
    """A PEFT LoRA adapter of the base (``q_proj`` and ``v_proj`` of layer 0, rank 2), with ``config`` set."""

    def setup(ws: Workspace) -> None:
        import torch
        from safetensors.torch import save_file

        from oftmerge.formats.checkpoint import Checkpoint

        ckpt, g = Checkpoint(ws / "base"), torch.Generator().manual_seed(len(name))
        tensors = {}
        for m in ("q_proj", "v_proj"):
            out, inp = ckpt.shape(f"model.layers.0.self_attn.{m}.weight")
            key = f"base_model.model.model.layers.0.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(2, inp, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 2, generator=g) * 0.05
        (ws / name).mkdir()
        save_file(tensors, str(ws / name / "adapter_model.safetensors"), metadata={"format": "pt"})
        base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(ws / "base")}
        (ws / name / "adapter_config.json").write_text(json.dumps({**base, **config}))

    return setup


def _experts(*names: str) -> Setup:
    def setup(ws: Workspace) -> None:
        from helpers import save_full_expert

        for k, name in enumerate(names, start=1):
            save_full_expert(ws / name, ws / "base", seed=k)

    return setup


def _sharded(name: str, edit: Callable[[dict[str, str], Path], None] = lambda m, d: None) -> Setup:
    """The base in two shards with an index at ``ws / name``; ``edit(weight_map, directory)`` then changes the index."""

    def setup(ws: Workspace) -> None:
        from safetensors.torch import load_file, save_file

        d = ws / name
        shutil.copytree(ws / "base", d)
        tensors = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        keys = sorted(tensors)
        weight_map = {}
        for k, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
            shard = f"model-0000{k}-of-00002.safetensors"
            save_file({key: tensors[key] for key in part}, str(d / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        edit(weight_map, d)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    return setup


def _misplace(weight_map: dict[str, str], d: Path) -> None:
    weight_map["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"  # it is in shard 1


def _outside(weight_map: dict[str, str], d: Path) -> None:
    (d.parent / "elsewhere").mkdir()
    shutil.move(str(d / "model-00001-of-00002.safetensors"), str(d.parent / "elsewhere"))
    for k, v in weight_map.items():
        if v.startswith("model-00001"):
            weight_map[k] = "../elsewhere/" + v


def _absolute(weight_map: dict[str, str], d: Path) -> None:
    for k, v in weight_map.items():
        if v.startswith("model-00001"):
            weight_map[k] = str(d / v)


def _not_a_name(weight_map: dict[str, str], d: Path) -> None:
    weight_map["model.norm.weight"] = 7  # type: ignore[assignment]


def _says_no_config(ws: Workspace) -> None:
    """A model written from a base without config.json (a plain state dict): complete weights, and a warning that says so."""
    out = ws / "out"
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()
    warnings = json.loads((out / "oftmerge.json").read_text())["warnings"]
    assert any("has no config.json" in w and "from_pretrained cannot load it" in w for w in warnings), warnings


def _folded_kept(ws: Workspace) -> None:
    assert complete(ws / "out"), "fold --push-to-hub offline: the folded model must stay complete on disk"


MERGE = lambda ws, *more: ["merge", ws / "a", ws / "b", *more]  # noqa: E731
FOLD = lambda ws, adapter="a", base="base": ["fold", ws / adapter, "--base", ws / base]  # noqa: E731
FAST = ["--orthogonal", "none", "--euclidean", "ta"]
BAD_CONFIG = r"bad/adapter_config\.json: {key} is {value}; expected {what} \(e\.g\. \"{key}\": .*\); fix it in the file"
NO_NETWORK = {"HF_TOKEN": "hf_not_a_token", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "HF_HUB_OFFLINE": "0"}

CASES: list[Case] = [
    Case("errors-good-merge", lambda ws: ["merge", ws / "a", ws / "b", "-o", ws / "out", "-q"], code=0),
    # -- the file system refuses the output (exit code 3) ------------------------------------------------------------
    Case("errors-merge-disk-full", lambda ws: [*MERGE(ws), "-o", ws / "full" / "out", "-q"], code=FS,
         message=r"full/out: no space left on the device; free space there, or write the output elsewhere \(another -o\)",
         setup=_tmpfs("full", "40k"), skip=_no_mount, output="full/out"),
    Case("errors-fold-disk-full", lambda ws: [*FOLD(ws), "-o", ws / "full" / "out", "-q"], code=FS,
         message=r"full/out: no space left on the device", setup=_tmpfs("full", "1m"), skip=_no_mount, output="full/out"),
    Case("errors-fold-into-disk-full", lambda ws: [*MERGE(ws, "--fold-into", ws / "base"), "-o", ws / "full" / "out", "-q"], code=FS,
         message=r"full/out: no space left on the device", setup=_tmpfs("full", "1m"), skip=_no_mount, output="full/out"),
    Case("errors-decouple-disk-full", lambda ws: ["decouple", "--base", ws / "base", ws / "e1", ws / "e2", *FAST, "-o", ws / "full" / "out", "-q"],
         code=FS, message=r"full/out: no space left on the device", setup=_all(_experts("e1", "e2"), _tmpfs("full", "1m")),
         skip=_no_mount, output="full/out"),
    Case("errors-good-full-tmpdir", lambda ws: [*MERGE(ws, "--fold-into", ws / "base"), "-o", ws / "out", "-q"], code=0,
         setup=_tmpfs("tmp", "4k"), skip=_no_mount),  # nothing goes through $TMPDIR: a full one does not matter
    Case("errors-merge-read-only-file-system", lambda ws: [*MERGE(ws), "-o", ws / "ro" / "out", "-q"], code=FS,
         message=r"ro.*[Rr]ead-only file system", setup=_tmpfs("ro", "64k", read_only=True), skip=_no_mount, output=None),
    Case("errors-fold-immutable-parent", lambda ws: [*FOLD(ws), "-o", ws / "imm" / "out", "-q"], code=FS,
         message=r"imm.*[Oo]peration not permitted", setup=_immutable("imm"), skip=_no_chattr, output=None),
    Case("errors-output-under-proc", lambda ws: [*MERGE(ws), "-o", "/proc/oftmerge-out", "-q"], code=FS, message=r"/proc",
         skip=lambda ws: None if Path("/proc/self").is_dir() else "no /proc here", output=None),
    # -- numbers out of range on the command line ------------------------------------------------------------------
    Case("errors-fold-threads-0", lambda ws: [*FOLD(ws), "-o", ws / "out", "--threads", "0"], message=r"threads must be a whole number >= 1.*got 0"),
    Case("errors-merge-threads-negative", lambda ws: [*MERGE(ws), "-o", ws / "out", "--threads", "-2"], message=r"threads must be .*>= 1.*got -2"),
    Case("errors-decouple-threads-0", lambda ws: ["decouple", "--base", ws / "base", ws / "e1", *FAST, "-o", ws / "out", "--threads", "0"],
         message=r"threads must be a whole number >= 1", setup=_experts("e1")),
    Case("errors-cayley-neumann-0", lambda ws: [*MERGE(ws), "-o", ws / "out", "--cayley", "neumann:0"],
         message=r"cayley='neumann:0': the Cayley-Neumann series needs N >= 1 terms"),
    Case("errors-cayley-neumann-negative", lambda ws: [*MERGE(ws), "-o", ws / "out", "--cayley=neumann:-4"], message=r"needs N >= 1 terms"),
    # -- adapter_config.json values of the wrong type or range -------------------------------------------------------
    Case("errors-config-block-size-string", lambda ws: ["merge", ws / "bad", ws / "b", "-o", ws / "out"],
         message=BAD_CONFIG.format(key="oft_block_size", value="'sixteen'", what="a whole number >= 0"), setup=_config("a", "bad", oft_block_size="sixteen")),
    Case("errors-config-block-size-fold", lambda ws: [*FOLD(ws, "bad"), "-o", ws / "out"],
         message=BAD_CONFIG.format(key="oft_block_size", value="'sixteen'", what="a whole number >= 0"), setup=_config("a", "bad", oft_block_size="sixteen")),
    Case("errors-config-neumann-terms-0", lambda ws: [*FOLD(ws, "bad"), "-o", ws / "out"],
         message=BAD_CONFIG.format(key="num_cayley_neumann_terms", value="0", what="a whole number >= 1"),
         setup=_config("a", "bad", num_cayley_neumann_terms=0)),
    Case("errors-config-eps-string", lambda ws: ["inspect", ws / "bad"], output=None,
         message=BAD_CONFIG.format(key="eps", value="'tiny'", what="a finite number"), setup=_config("a", "bad", eps="tiny")),
    Case("errors-config-eps-negative-with-coft", lambda ws: ["merge", ws / "bad", ws / "b", "-o", ws / "out"],
         message=BAD_CONFIG.format(key="eps", value="-1", what="a finite number > 0"), setup=_config("a", "bad", coft=True, eps=-1)),
    Case("errors-config-r-string", lambda ws: ["merge", ws / "b", ws / "bad", "-o", ws / "out"],
         message=BAD_CONFIG.format(key="r", value="'eight'", what="a whole number >= 0"), setup=_config("a", "bad", r="eight")),
    Case("errors-config-coft-string", lambda ws: ["merge", ws / "bad", ws / "b", "-o", ws / "out"],
         message=BAD_CONFIG.format(key="coft", value="'yes'", what="true or false"), setup=_config("a", "bad", coft="yes")),
    Case("errors-config-block-share-number", lambda ws: ["merge", ws / "bad", ws / "b", "-o", ws / "out"],
         message=BAD_CONFIG.format(key="block_share", value="1", what="true or false"), setup=_config("a", "bad", block_share=1)),
    Case("errors-good-config-eps-unused", lambda ws: ["merge", ws / "bad", ws / "b", "-o", ws / "out", "-q"], code=0,
         setup=_config("a", "bad", eps=0)),  # without COFT eps is not used: only its type is checked
    Case("errors-lora-r-string", lambda ws: ["decouple", "--base", ws / "base", ws / "bad", *FAST, "-o", ws / "out"],
         message=BAD_CONFIG.format(key="r", value="'eight'", what="a whole number >= 1"), setup=_lora("bad", r="eight")),
    Case("errors-lora-alpha-string", lambda ws: ["decouple", "--base", ws / "base", ws / "bad", *FAST, "-o", ws / "out"],
         message=BAD_CONFIG.format(key="lora_alpha", value="'x'", what="a finite number"), setup=_lora("bad", lora_alpha="x")),
    Case("errors-lora-rank-pattern-string", lambda ws: ["decouple", "--base", ws / "base", ws / "bad", *FAST, "-o", ws / "out"],
         message=r"bad/adapter_config\.json: rank_pattern\['q_proj'\] is 'two'; expected a whole number >= 1",
         setup=_lora("bad", rank_pattern={"q_proj": "two"})),
    Case("errors-good-lora", lambda ws: ["decouple", "--base", ws / "base", ws / "l1", *FAST, "-o", ws / "out", "-q"], code=0, setup=_lora("l1")),
    # -- broken base checkpoints -------------------------------------------------------------------------------------
    Case("errors-base-config-not-json-fold", lambda ws: [*FOLD(ws, base="bb"), "-o", ws / "out"],
         message=r"bb/config\.json: not valid JSON .*restore it, or write it again", setup=_write("bb", "config.json", "{not json")),
    Case("errors-base-config-not-json-merge", lambda ws: [*MERGE(ws, "--base", ws / "bb"), "-o", ws / "out"],
         message=r"bb/config\.json: not valid JSON", setup=_write("bb", "config.json", "{not json")),
    Case("errors-base-config-not-an-object-decouple", lambda ws: ["decouple", "--base", ws / "bb", ws / "l1", *FAST, "-o", ws / "out"],
         message=r"bb/config\.json: expected a JSON object, got list", setup=_all(_lora("l1"), _write("bb", "config.json", "[1, 2]"))),
    Case("errors-fold-base-without-config-says-so", lambda ws: [*FOLD(ws, base="bb"), "-o", ws / "out", "-q"], code=0,
         setup=_write("bb", "config.json", None), output=None, check=_says_no_config),
    Case("errors-fold-into-base-without-config-says-so", lambda ws: [*MERGE(ws, "--fold-into", ws / "bb"), "-o", ws / "out", "-q"], code=0,
         setup=_write("bb", "config.json", None), output=None, check=_says_no_config),
    Case("errors-decouple-base-without-config-says-so", lambda ws: ["decouple", "--base", ws / "bb", ws / "l1", *FAST, "-o", ws / "out", "-q"],
         code=0, setup=_all(_lora("l1"), _write("bb", "config.json", None)), output=None, check=_says_no_config),
    Case("errors-good-merge-base-without-config", lambda ws: [*MERGE(ws, "--base", ws / "bb"), "-o", ws / "out", "-q"], code=0,
         setup=_write("bb", "config.json", None)),  # shapes only: no model is written
    Case("errors-index-wrong-shard-fold", lambda ws: [*FOLD(ws, base="sh"), "-o", ws / "out"],
         message=r"sh/model\.safetensors\.index\.json: maps tensor 'model\.embed_tokens\.weight' to model-00002-of-00002\.safetensors, which does not hold it",
         setup=_sharded("sh", _misplace)),
    Case("errors-index-wrong-shard-merge", lambda ws: [*MERGE(ws, "--base", ws / "sh"), "-o", ws / "out"],
         message=r"maps tensor 'model\.embed_tokens\.weight' to .*which does not hold it", setup=_sharded("sh", _misplace)),
    Case("errors-index-dotdot", lambda ws: [*FOLD(ws, base="sh"), "-o", ws / "out"],
         message=r"weight_map maps .* to '\.\./elsewhere/model-00001-of-00002\.safetensors', which is not a file name inside .*sh",
         setup=_sharded("sh", _outside)),
    Case("errors-index-absolute-decouple", lambda ws: ["decouple", "--base", ws / "sh", ws / "l1", *FAST, "-o", ws / "out"],
         message=r"weight_map maps .* to '/.*model-00001-of-00002\.safetensors', which is not a file name inside",
         setup=_all(_lora("l1"), _sharded("sh", _absolute))),
    Case("errors-index-not-a-name", lambda ws: [*FOLD(ws, base="sh"), "-o", ws / "out"],
         message=r"weight_map maps 'model\.norm\.weight' to 7; expected the name of a shard file", setup=_sharded("sh", _not_a_name)),
    Case("errors-good-sharded-fold", lambda ws: [*FOLD(ws, base="sh"), "-o", ws / "out", "-q"], code=0, setup=_sharded("sh")),
    # -- the Hub out of reach (exit code 4) --------------------------------------------------------------------------
    Case("errors-push-offline", lambda ws: ["push", ws / "a", "me/oftmerge-test"], code=HUB, env={"HF_HUB_OFFLINE": "1"}, output=None,
         message=r"cannot push .*/a to https://huggingface\.co/me/oftmerge-test: offline mode is on \(HF_HUB_OFFLINE=1\); unset HF_HUB_OFFLINE"),
    Case("errors-push-no-network", lambda ws: ["push", ws / "a", "me/oftmerge-test"], code=HUB, env=NO_NETWORK, output=None,
         message=r"cannot push .*/a to https://huggingface\.co/me/oftmerge-test: "),
    Case("errors-fold-push-offline-keeps-the-fold", lambda ws: [*FOLD(ws), "-o", ws / "out", "-q", "--push-to-hub", "me/oftmerge-test"], code=HUB,
         env={"HF_HUB_OFFLINE": "1"}, changes=("out",), check=_folded_kept,
         message=r"the folded model is complete in .*/out, but it was not pushed: .*offline mode is on.*; "
                 r"push it later with `oftmerge push .*/out me/oftmerge-test`"),
    Case("errors-good-push-dry-run", lambda ws: ["push", ws / "a", "me/oftmerge-test", "--dry-run"], code=0, env={"HF_HUB_OFFLINE": "1"}, output=None),
]  # fmt: skip
