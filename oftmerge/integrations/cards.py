"""Model cards with provenance: ``README.md`` of merged adapters, folded models and decoupled models.

:func:`adapter_card` (merged OFT adapters), :func:`folded_model_card` (full models from
:func:`oftmerge.fold_adapter`) and :func:`decoupled_model_card` (:func:`oftmerge.decouple_merge`)
write a ``README.md`` with ``huggingface_hub``'s ``ModelCardData``: base model, library, tags,
and an ``oftmerge`` metadata block with the method, its options, the inputs with their SHA-256,
and the library versions. ``huggingface_hub.ModelCard.load(path)`` reads it back. Without
``huggingface_hub`` installed the same metadata is written as plain YAML.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oftmerge.ops.decouple import DecoupleResult
    from oftmerge.ops.fold import FoldResult
    from oftmerge.ops.merge_result import MergeResult

__all__ = ["adapter_card", "decoupled_model_card", "folded_model_card"]


def _hub_id(value: str | None) -> str | None:
    """``value`` when it looks like a Hub repo id (``org/name`` or ``name``), not a local path."""
    if value and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value) and not Path(value).exists():
        return value
    return None


def _render(meta: dict[str, Any], body: str) -> str:
    """A README with YAML front matter written by ``huggingface_hub``'s ``ModelCardData`` when it is there.

    ``huggingface_hub.repocard_data`` alone, not ``ModelCard``: the latter also imports the Hub client
    to produce the same text (which ``ModelCard.load`` reads back).
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
        "library_name": "diffusers" if base.get("library") == "diffusers" else "transformers",
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
    loader = f"diffusers.{base['class_name']}" if base.get("library") == "diffusers" else "AutoModelForCausalLM"
    lines += ["", f"Load it with `{loader}.from_pretrained(this_directory)` (no PEFT needed)."]
    return _render(meta, "\n".join(lines) + "\n")


def decoupled_model_card(result: DecoupleResult) -> str:
    """A model card for a model made by orthogonal-residual decoupling (or a Euclidean method alone)."""
    prov = result.provenance()
    s = result.settings
    title = s.euclidean.upper() + ("" if s.orthogonal is None else f" + {s.orthogonal} ({s.target} target)")
    meta = {"library_name": "transformers", "tags": ["oftmerge", "merge", s.euclidean] + ([s.orthogonal] if s.orthogonal else [])}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in meta.items()), "---", ""]
    lines += [f"# Merged model: {title}", ""]
    how = (
        "orthogonal-residual decoupling (OrthoMerge, ICML 2026): rotations merged on the orthogonal group, residuals "
        f"with {s.euclidean}" if s.orthogonal else f"{s.euclidean} on the task vectors (no decoupling)"
    )
    lines.append(
        f"Made by oftmerge {prov['versions'].get('oftmerge')} (`oftmerge decouple`) from {len(result.experts)} experts "
        f"of the base `{result.base}` by {how}. Weights keep the base's dtype."
    )
    lines += ["", "| # | expert | kind | sha256 | weight |", "|---|---|---|---|---|"]
    for i, e in enumerate(prov["experts"]):
        lines.append(f"| {i} | `{e['path']}` | {e['kind']} | `{e['sha256'][:16]}…` | {e['weight']:g} |")
    lines += ["", "Settings: `" + json.dumps(prov["settings"], sort_keys=True) + "`", ""]
    lines.append("Totals: `" + json.dumps(prov["totals"], sort_keys=True) + "`")
    lines += [f"- warning: {w}" for w in result.warnings]
    lines += ["", "Per-tensor diagnostics are in `oftmerge.json`. Load with `AutoModelForCausalLM.from_pretrained(this_directory)`."]
    return "\n".join(lines) + "\n"
