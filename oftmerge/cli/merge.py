"""``oftmerge merge`` (OFT adapters into one), ``convert`` (legacy checkpoints) and ``methods`` (the registry)."""

from __future__ import annotations

import argparse

from oftmerge.cli.common import EXIT_CODES, add_report_arguments, json_report, parse_options, parse_weights, print_report, progress_bars, require_output
from oftmerge.errors import OftMergeError

EPILOG_MERGE = """examples:
  oftmerge merge adapters/oft-upper adapters/oft-reverse -o merged
  oftmerge merge A B C -o out --weights 1,1,0.5 --scale 0.9
  oftmerge merge A B -o out --method karcher --cayley exact
  oftmerge merge A B --dry-run             # show the plan, write nothing
  oftmerge merge my-org/oft-a my-org/oft-b@v2 -o merged   # Hub ids (HF_HUB_OFFLINE=1: from the cache only)

The merged adapter loads with stock PEFT: PeftModel.from_pretrained(base, "merged").

diffusion OFT files (LyCORIS, kohya sd-scripts, OneTrainer; see docs/diffusion.md):
  oftmerge merge style.safetensors subject.safetensors -o merged.safetensors
  oftmerge merge a.safetensors b.safetensors -o out.safetensors --weights 1,0.5 --scale 0.8
  oftmerge merge kohya.safetensors lyco.safetensors --to lycoris -o merged.safetensors
  oftmerge merge a.safetensors b.safetensors --fold-into PIPELINE_DIR -o folded-pipeline

""" + EXIT_CODES



def _cmd_merge(args: argparse.Namespace) -> int:
    from oftmerge.cli.diffusion import diffusion_inputs, merge_files
    from oftmerge.config import MergeConfig, RunOptions
    from oftmerge.ops.merge import run_merge

    if diffusion_inputs(args.adapters, args.to):
        return merge_files(args)
    _refuse_diffusion_options(args)
    require_output(args)
    config = MergeConfig(
        tuple(args.adapters), method=args.method, weights=parse_weights(args.weights), scale=args.scale, cayley=args.cayley,
        method_options=parse_options(args.option), base=args.base or args.fold_into, peft_release=args.peft_release,
        allow_base_mismatch=args.allow_base_mismatch, output="model" if args.fold_into else "adapter",
        saved_modules=args.saved_modules,
    )  # fmt: skip
    with progress_bars(args, ("merge", "fold")) as progress:
        run = RunOptions(threads=args.threads, shard_size=args.shard_size, overwrite=args.overwrite, dry_run=args.dry_run, progress=progress)
        result = run_merge(config, run, None if args.dry_run else args.output)

    def data() -> dict:
        d = result.provenance()
        d["modules"] = {n: r.to_dict() for n, r in result.modules.items()}
        return json_report(args, d, output=result.saved_to or None, dry_run=args.dry_run)

    def text() -> str:
        done = f"dry run: nothing written (would write {result.output_bytes / 1e6:.2f} MB)" if args.dry_run else f"wrote {result.saved_to}"
        return result.summary(max_modules=args.show) + "\n" + done

    print_report(args, data=data, text=text)
    return 0


def _refuse_diffusion_options(args: argparse.Namespace) -> None:
    for attr, flag in (("to", "--to"), ("format", "--format")):
        if getattr(args, attr, None):
            raise OftMergeError(f"{flag} applies to diffusion OFT files (.safetensors); PEFT adapter directories are read and written as PEFT")
    if getattr(args, "union", False):
        raise OftMergeError("--union applies to diffusion OFT files; PEFT adapters are always merged over the union of their modules")
    if getattr(args, "rescale", "geometric") != "geometric":
        raise OftMergeError("--rescale applies to LyCORIS files with rescale vectors, not to PEFT adapters")


def _add_diffusion_arguments(p: argparse.ArgumentParser, *, merge: bool) -> None:
    from oftmerge.formats.diffusion import DIFFUSION_FORMATS

    p.add_argument("--to", choices=DIFFUSION_FORMATS, help="diffusion files: the output's format (default: the inputs'; needed when they differ)")
    p.add_argument("--format", choices=DIFFUSION_FORMATS, help="diffusion files: read the inputs as this format (default: detected from the keys)")
    p.add_argument("--approximate", action="store_true", help="diffusion files: allow a change of rotation map (Cayley-Neumann <-> exact)"
                   if merge else "allow an approximate change of series (PEFT 0.16-0.17 -> 0.18 Neumann; diffusion files: Neumann <-> exact)")
    if merge:
        from oftmerge.ops.diffusion import RESCALE_MERGES

        p.add_argument("--union", action="store_true", help="diffusion files: merge every module among the inputs that adapt it "
                       "(default: the inputs must adapt the same modules)")
        p.add_argument("--rescale", default="geometric", choices=RESCALE_MERGES,
                       help="LyCORIS rescale vectors: |weight|-weighted geometric (default) or arithmetic mean")  # fmt: skip


def _cmd_convert(args: argparse.Namespace) -> int:
    from oftmerge.cli.diffusion import convert_file
    from oftmerge.formats.diffusion import is_diffusion_file
    from oftmerge.ops.convert import convert_adapter

    if is_diffusion_file(args.adapter) or args.to:
        return convert_file(args)
    _refuse_diffusion_options(args)
    result = convert_adapter(
        args.adapter, args.output, peft_release=args.peft_release, approximate=args.approximate, overwrite=args.overwrite
    )
    lines = [f"converted {args.adapter} (PEFT {result.inputs[0].release_source}) -> {result.saved_to}"]
    lines += [f"warning: {w}" for w in result.warnings]
    print_report(args, data=lambda: json_report(args, result.provenance(), output=result.saved_to), text=lambda: "\n".join(lines))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from oftmerge.methods import describe_methods

    print(describe_methods())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from oftmerge.config import SAVED_MODULES
    from oftmerge.methods import available_methods

    m = sub.add_parser(
        "merge",
        help="merge OFT adapters into one PEFT OFT adapter",
        description="Merge OFT adapters (any PEFT release) into one adapter, module by module, in so(b).",
        epilog=EPILOG_MERGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "adapters", nargs="+", metavar="ADAPTER", help="adapter directories written by save_pretrained, or Hub ids NS/NAME[@REV]; or diffusion OFT .safetensors files",  # noqa: E501
    )
    m.add_argument("-o", "--output", help="output directory (written atomically)")
    m.add_argument("--method", default="orthomerge", choices=list(available_methods()), help="merge method (default: %(default)s; see `oftmerge methods`)")
    m.add_argument("--weights", help="comma-separated weight per adapter; negative = negate that adapter")
    m.add_argument("--scale", type=float, default=1.0, help="multiply the merged generator (default: 1)")
    m.add_argument("--cayley", default="auto", help="output map: auto (inputs' own if they agree, else exact), exact, neumann, neumann:N")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. per_block=true")
    m.add_argument("--base", help="base model directory or Hub id: checks shapes, gives widths of block_share layers (default: the "
                   "adapters' base_model_name_or_path when it is at hand without a download)")
    m.add_argument("--peft-release", help="PEFT release that wrote the inputs, when their config does not record it")
    m.add_argument("--allow-base-mismatch", action="store_true", help="merge adapters whose configs name different base models")
    m.add_argument(
        "--saved-modules", default="identical", choices=list(SAVED_MODULES), metavar="POLICY",
        help="what to keep of the heads (modules_to_save) and biases the inputs saved: identical (default: kept if every input "
        "that saved one saved the same bytes, else an error), mean (|weight|-weighted), first (in the order given), drop (use the base's)",
    )  # fmt: skip
    m.add_argument("--fold-into", metavar="BASE",
                   help="write a full model instead: the merge folded into base model BASE, a directory or Hub id (see `oftmerge fold`)")
    m.add_argument("--shard-size", default="5GB", help="with --fold-into: largest shard of the model, e.g. 2GB (default: %(default)s)")
    m.add_argument("--threads", type=int, default=1, help="torch threads for the arithmetic (default: %(default)s; see `oftmerge fold --help`)")
    _add_diffusion_arguments(m, merge=True)
    add_report_arguments(m, dry_run="print the plan; read no generator, write nothing")
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser(
        "convert",
        help="upgrade a legacy OFT checkpoint to the current PEFT layout (only where exact)",
        description="Write an OFT adapter of an older PEFT release in the layout PEFT >= 0.18 loads.",
        epilog=EXIT_CODES,
    )
    c.add_argument("adapter", help="adapter directory or Hub id NS/NAME[@REV]; or a diffusion OFT .safetensors file (with --to)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--peft-release", help="PEFT release that wrote the input, when its config does not record it")
    _add_diffusion_arguments(c, merge=False)
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    c.set_defaults(func=_cmd_convert)

    ls = sub.add_parser("methods", help="list the merge methods and their options", epilog=EXIT_CODES)
    ls.set_defaults(func=_cmd_methods)
