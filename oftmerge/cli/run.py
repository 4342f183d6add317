"""``oftmerge run RECIPE``: run a recipe (a merge, a fold, a merge folded into a base, a decoupled merge) from a YAML file."""

from __future__ import annotations

import argparse

from oftmerge.cli.common import EXIT_CODES, json_report, print_report, progress_bars

EPILOG = """examples:
  oftmerge run merge.yaml -o merged               # the recipe's merge, into merged/
  oftmerge run merged/oftmerge.yaml -o again      # re-run what made merged/ (the same tensor bytes)
  oftmerge run merge.yaml --dry-run               # the plan, nothing written
  oftmerge run merged/oftmerge.yaml -o again --on-changed warn   # run even if an input changed since

Every merge, fold and decouple writes the recipe it ran into its output as oftmerge.yaml;
docs/recipes.md describes the format.
"""


def _cmd_run(args: argparse.Namespace) -> int:
    from oftmerge.ops.recipe import load_recipe
    from oftmerge.ops.run_recipe import run_recipe

    recipe = load_recipe(args.recipe)
    with progress_bars(args, (recipe.command, "fold")) as progress:
        result = run_recipe(recipe, args.output, overwrite=args.overwrite, dry_run=args.dry_run, on_changed=args.on_changed, progress=progress)
    out = getattr(result, "saved_to", None) or getattr(result, "out_dir", None)

    def text() -> str:
        lines = [f"warning: {n}" for n in result.recipe_notes]
        lines.append(result.summary())
        lines.append("dry run: nothing written" if args.dry_run else f"wrote {out}")
        return "\n".join(lines)

    def data() -> dict:
        d = json_report(args, {**result.provenance(), "recipe": recipe.to_dict()}, output=None if args.dry_run else out, dry_run=args.dry_run)
        d["warnings"] = [*result.recipe_notes, *d.get("warnings", [])]
        return d

    print_report(args, data=data, text=text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a recipe (YAML): a merge, fold, merge folded into a base, or decoupled merge",
        description="Run the command a recipe describes; every output's oftmerge.yaml is such a recipe.",
        epilog=EPILOG + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE", help="a recipe file (YAML), e.g. an output's oftmerge.yaml")
    p.add_argument("-o", "--output", help="output path (default: the recipe's output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (an earlier output only)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    p.add_argument("--on-changed", choices=("error", "warn"), default="error",
                   help="when an input's weights differ from the recipe's SHA-256: stop (default) or warn and run")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_cmd_run)
