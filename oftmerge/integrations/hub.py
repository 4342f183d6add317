"""Model cards with provenance, and upload to the Hugging Face Hub through ``huggingface_hub``.

* :func:`adapter_card` (merged OFT adapters) and :func:`folded_model_card`
  (full models from :func:`oftmerge.ops.fold.fold_adapter`) write a
  ``README.md`` with ``huggingface_hub.ModelCard`` / ``ModelCardData``: base
  model, library, tags, and an ``oftmerge`` metadata block with the method,
  its options, the inputs with their SHA-256, and the oftmerge / PEFT / torch
  versions. ``ModelCard.load(path)`` reads it back. Without ``huggingface_hub``
  installed the same metadata is written as plain YAML.
* :func:`push_folder` uploads a directory: one ``HfApi.create_commit`` with
  every file (after ``create_repo(..., exist_ok=True)``). ``dry_run=True``
  only lists what would be uploaded (:class:`PushPlan`: repo id, files,
  sizes) and touches no network.

>>> plan = push_folder("folded", "me/my-model", dry_run=True)  # doctest: +SKIP
>>> print(plan.describe())                                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftmerge._version import __version__
from oftmerge.errors import OftMergeError

if TYPE_CHECKING:
    from oftmerge.ops.merge import MergeResult
    from oftmerge.ops.fold import FoldResult

__all__ = ["PushPlan", "adapter_card", "folded_model_card", "library_versions", "push_folder"]

_LIBRARIES = ("torch", "peft", "transformers", "safetensors", "huggingface_hub")


def library_versions() -> dict[str, str]:
    """Versions of oftmerge and of the libraries that shape its output (those installed)."""
    versions = {"oftmerge": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _hub_id(value: str | None) -> str | None:
    """``value`` when it looks like a Hub repo id (``org/name`` or ``name``), not a local path."""
    if value and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value) and not Path(value).exists():
        return value
    return None


def _render(meta: dict[str, Any], body: str) -> str:
    """A README with YAML front matter written by ``huggingface_hub``'s ``ModelCardData`` when it is there.

    ``huggingface_hub.repocard_data`` alone, not ``ModelCard``: the latter imports the Hub client
    (0.2 s, a tenth of a CLI merge) to produce the same text (``tests/test_hub.py`` reads it back
    with ``ModelCard``).
    """
    meta = {k: v for k, v in meta.items() if v is not None}
    try:
        from huggingface_hub.repocard_data import ModelCardData
    except ImportError:  # JSON values are valid YAML
        header = "\n".join(f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in meta.items())
        return f"---\n{header}\n---\n\n{body}"
    known = {"base_model", "library_name", "tags", "license", "pipeline_tag"}
    data = ModelCardData(**{k: v for k, v in meta.items() if k in known}, **{k: v for k, v in meta.items() if k not in known})
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _inputs_table(inputs: list[dict[str, Any]]) -> list[str]:
    lines = ["| # | input | sha256 (weights) | PEFT release | rotation map | weight |", "|---|---|---|---|---|---|"]
    for i, info in enumerate(inputs):
        lines.append(
            f"| {i} | `{info['path']}` | `{info['sha256'][:16]}…` | {info.get('release', '')} | "
            f"{info.get('rotation_map', '')} | {info.get('weight', 1):g} |"
        )
    return lines


def _merge_meta(prov: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": prov["method"],
        "options": prov["options"],
        "scale": prov["scale"],
        "rotation_map": prov["rotation_map"],
        "inputs": [{"path": i["path"], "sha256": i["sha256"], "weight": i["weight"]} for i in prov["inputs"]],
    }


def adapter_card(result: MergeResult) -> str:
    """A Hub model card for a merged OFT adapter: what went in, how it was merged, with which versions."""
    prov = result.provenance()
    meta = {
        "base_model": _hub_id(result.config.get("base_model_name_or_path")),
        "library_name": "peft",
        "tags": ["oftmerge", "oft", result.method],
        "base_model_relation": "adapter" if _hub_id(result.config.get("base_model_name_or_path")) else None,
        "oftmerge": {**_merge_meta(prov), "output": "adapter", "layout": prov["layout"], "versions": prov["versions"]},
    }
    lines = [f"# Merged OFT adapter ({result.method})", ""]
    lines.append(
        f"Made by [oftmerge](https://pypi.org/project/oftmerge/) {prov['versions']['oftmerge']} from "
        f"{len(result.inputs)} OFT adapter(s), merged on the orthogonal group."
    )
    lines += ["", *_inputs_table(prov["inputs"]), ""]
    lines.append(f"- method: `{result.method}`, options: `{result.options}`, scale: {result.scale:g}")
    lines.append(f"- output: {prov['layout']} layout, {prov['rotation_map']}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items())))
    lines += [f"- warning: {w}" for w in result.warnings]
    lines += ["", "Load it with `PeftModel.from_pretrained(base_model, this_directory)`."]
    return _render(meta, "\n".join(lines) + "\n")


def folded_model_card(result: FoldResult) -> str:
    """A Hub model card for a full model folded from an OFT adapter (or a merge of several)."""
    prov = result.provenance()
    source, base = prov["source"], prov["base"]
    merged = "inputs" in source
    base_id = _hub_id(base.get("name_or_path")) or _hub_id(source.get("base_model_name_or_path"))
    if merged:
        what = _merge_meta(source)
        inputs = source["inputs"]
    else:
        what = {"method": "fold", "inputs": [{"path": source["path"], "sha256": source["sha256"]}]}
        inputs = [source]
    meta = {
        "base_model": base_id,
        "base_model_relation": "finetune" if base_id else None,
        "library_name": "transformers",
        "tags": ["oftmerge", "oft", "folded"] + ([source["method"]] if merged else []),
        "oftmerge": {
            **what,
            "output": "folded model",
            "base": {k: v for k, v in base.items() if v is not None},
            "folded_modules": len(result.modules),
            "untied_embeddings": prov["untied_embeddings"],
            "versions": prov["versions"],
        },
    }
    title = f"merge of {len(inputs)} OFT adapters ({source['method']})" if merged else "an OFT adapter"
    lines = [f"# Full model: {title} folded into its base", ""]
    lines.append(
        f"Made by [oftmerge](https://pypi.org/project/oftmerge/) {prov['versions']['oftmerge']}: every adapted weight "
        f"({len(result.modules)}) was folded into the base, as PEFT's `merge_and_unload` does; every other tensor is "
        "the base's, byte for byte. Weights keep the base's dtype."
    )
    lines += ["", f"- base: `{base.get('name_or_path') or base['path']}` (tensors fingerprint `{base['tensors_fingerprint'][:16]}…`)"]
    if merged:
        lines.append(f"- merge: `{source['method']}`, options `{source['options']}`, scale {source['scale']:g}")
    lines += ["", *_inputs_table(inputs), ""]
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items())))
    lines += [f"- warning: {w}" for w in prov["warnings"]]
    lines += ["", "Load it with `AutoModelForCausalLM.from_pretrained(this_directory)` (no PEFT needed)."]
    return _render(meta, "\n".join(lines) + "\n")


@dataclass(frozen=True)
class PushPlan:
    """What :func:`push_folder` uploads: the repository and every file with its size."""

    repo_id: str
    folder: Path
    files: tuple[tuple[str, int], ...]  #: (path in the repo, bytes), sorted
    private: bool
    revision: str | None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        lines = [
            f"push {self.folder} -> https://huggingface.co/{self.repo_id}"
            + (f" (revision {self.revision})" if self.revision else "")
            + (" [private]" if self.private else ""),
        ]
        lines += [f"  {size:>14,d}  {name}" for name, size in self.files]
        lines.append(f"  {self.total_bytes:>14,d}  bytes in {len(self.files)} files")
        return "\n".join(lines)


def _plan_push(folder: Path, repo_id: str, private: bool, revision: str | None) -> PushPlan:
    if not folder.is_dir():
        raise OftMergeError(f"{folder}: not a directory; push the directory that fold/merge wrote")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise OftMergeError(f"repo id {repo_id!r}: expected NAMESPACE/NAME, e.g. my-user/my-model")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache, temporary directories
        for name in sorted(names):
            if not name.startswith("."):
                path = Path(root) / name
                files.append((path.relative_to(folder).as_posix(), path.stat().st_size))
    if not files:
        raise OftMergeError(f"{folder}: nothing to upload")
    return PushPlan(repo_id, folder, tuple(sorted(files)), private, revision)


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> Any:
    """Upload ``folder`` to Hub repository ``repo_id`` (created if missing); return the ``CommitInfo``.

    Hidden files and directories are not uploaded. With ``dry_run`` nothing is
    sent: the :class:`PushPlan` (files and sizes) is returned instead.
    """
    plan = _plan_push(Path(folder), repo_id, private, revision)
    if dry_run:
        return plan
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
    except ImportError:
        raise OftMergeError("pushing needs huggingface_hub: pip install 'oftmerge[hub]'") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.folder / name)) for name, _ in plan.files]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or f"Upload {plan.folder.name} with oftmerge {__version__}",
        revision=revision,
        repo_type="model",
    )
