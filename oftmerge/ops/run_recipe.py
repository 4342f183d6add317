"""Run a recipe (:mod:`oftmerge.ops.recipe`): the command it describes, after checking its inputs' hashes."""

from __future__ import annotations

import os
from typing import Any

from oftmerge.config import FoldConfig, MergeConfig, RunOptions
from oftmerge.errors import OftMergeError
from oftmerge.ops.decouple import run_decouple
from oftmerge.ops.fold import run_fold
from oftmerge.ops.merge import run_merge
from oftmerge.ops.recipe import Recipe, check_inputs

__all__ = ["run_recipe"]


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    on_changed: str = "error",
    progress: Any = None,
) -> Any:
    """Run ``recipe`` into ``out`` (default: its ``output``); returns the command's result (with ``recipe_notes``)."""
    notes = check_inputs(recipe, on_changed=on_changed)
    target = out if out is not None else recipe.output
    if target is None and not dry_run:
        raise OftMergeError(f"{recipe.source}: the recipe names no output; give one with -o OUT")
    run = RunOptions(**dict(recipe.run), overwrite=overwrite, dry_run=dry_run, progress=progress)
    result: Any
    if isinstance(recipe.config, MergeConfig):
        result = run_merge(recipe.config, run, None if dry_run else target)
    elif isinstance(recipe.config, FoldConfig):
        result = run_fold(recipe.config, run, None if dry_run else target)
    else:
        result = run_decouple(recipe.config, run, target)
    result.recipe_notes = notes
    return result
