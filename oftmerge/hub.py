"""Model cards with provenance (and, later, upload through ``huggingface_hub``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oftmerge.merge import MergeResult

__all__ = ["adapter_card"]


def adapter_card(result: MergeResult) -> str:
    """A Hub-style README for a merged OFT adapter: what went in, how it was merged, with which versions."""
    prov = result.provenance()
    base = result.config.get("base_model_name_or_path")
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["library_name: peft", "tags:", "- oftmerge", "- oft", f"- {result.method}", "---", ""]
    lines.append(f"# Merged OFT adapter ({result.method})")
    lines.append("")
    lines.append(
        f"Made by [oftmerge](https://pypi.org/project/oftmerge/) {prov['versions']['oftmerge']} from "
        f"{len(result.inputs)} OFT adapter(s), merged on the orthogonal group."
    )
    lines.append("")
    lines.append("| # | input | sha256 (weights) | PEFT release | rotation map | weight |")
    lines.append("|---|---|---|---|---|---|")
    for i, info in enumerate(result.inputs):
        lines.append(f"| {i} | `{info.path}` | `{info.sha256[:16]}…` | {info.release} | {info.rotation_map} | {info.weight:g} |")
    lines.append("")
    lines.append(f"- method: `{result.method}`, options: `{result.options}`, scale: {result.scale:g}")
    lines.append(f"- output: {prov['layout']} layout, {prov['rotation_map']}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items())))
    for w in result.warnings:
        lines.append(f"- warning: {w}")
    lines.append("")
    lines.append("Load it with `PeftModel.from_pretrained(base_model, this_directory)`.")
    return "\n".join(lines) + "\n"
