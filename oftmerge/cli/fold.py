"""``oftmerge fold`` (an adapter into a full model) and ``oftmerge push`` (a directory to the Hub)."""

from __future__ import annotations

import argparse

from oftmerge.cli.common import EXIT_CODES, add_report_arguments, hub_bars, json_report, print_report, progress_bars, require_output

EPILOG_FOLD = """examples:
  oftmerge fold adapters/oft-upper --base base-model -o folded
  oftmerge fold my-org/oft-adapter@v1 -o folded     # Hub ids; the base its config names
  oftmerge fold ADAPTER --base BASE -o OUT --shard-size 2GB --overwrite
  oftmerge fold ADAPTER --base BASE --dry-run       # the plan: modules, shards, size
  oftmerge merge A B --fold-into BASE -o OUT        # merge, then fold the merge

The folded directory loads with AutoModelForCausalLM.from_pretrained(OUT), without PEFT,
and equals PeftModel.from_pretrained(base, ADAPTER).merge_and_unload().

diffusion OFT files (LyCORIS, kohya, OneTrainer) into a diffusers model or pipeline directory:
  oftmerge fold style.safetensors --base sd-pipeline -o sd-style       # unet/, text_encoder/ ... copied, rotated
  oftmerge fold style.safetensors --base sd-pipeline/unet -o unet-style

""" + EXIT_CODES

EPILOG_PUSH = """examples:
  oftmerge push folded my-user/my-model --dry-run   # list files and sizes, send nothing
  oftmerge push folded my-user/my-model --private   # needs `hf auth login` (or HF_TOKEN)

""" + EXIT_CODES


def _cmd_fold(args: argparse.Namespace) -> int:
    from oftmerge.cli.diffusion import fold_file
    from oftmerge.config import FoldConfig, RunOptions
    from oftmerge.formats.diffusion import is_diffusion_file
    from oftmerge.ops.fold import run_fold
    from oftmerge.plan.fold import fold_base

    require_output(args)
    if is_diffusion_file(args.adapter):
        return fold_file(args)
    adapter, base = (args.adapter, args.base) if args.base is not None else fold_base(args.adapter)
    config = FoldConfig(adapter, base, peft_release=args.peft_release, hash_base=args.hash_base,
                        push_to_hub=args.push_to_hub, private=args.private)  # fmt: skip
    with progress_bars(args, ("fold",)) as progress, hub_bars(args):
        run = RunOptions(threads=args.threads, shard_size=args.shard_size, overwrite=args.overwrite, dry_run=args.dry_run, progress=progress)
        result = run_fold(config, run, None if args.dry_run else args.output)

    def data() -> dict:
        d = result.provenance()
        d["shards"] = result.shards
        return json_report(args, d, output=result.out_dir, dry_run=args.dry_run)

    def text() -> str:
        if args.dry_run:
            done = f"dry run: nothing written (would write {result.total_bytes / 1e6:.2f} MB in {len(result.shards)} shard(s))"
        else:
            done = f"wrote {result.out_dir}" + (f"; pushed to {args.push_to_hub}" if args.push_to_hub else "")
        named = "" if args.base is not None else "base: the one the adapter's config names (base_model_name_or_path)\n"
        return result.summary(max_modules=args.show) + "\n" + named + done

    print_report(args, data=data, text=text)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from oftmerge.integrations.hub import push_folder

    with hub_bars(args):
        result = push_folder(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, revision=args.revision, commit_message=args.message)

    def data() -> dict:
        if args.dry_run:
            d = {"repo_id": result.repo_id, "files": dict(result.files), "total_bytes": result.total_bytes, "private": result.private,
                 "revision": result.revision}  # fmt: skip
        else:
            d = {"repo_id": args.repo_id, "commit_url": str(getattr(result, "commit_url", "")) or None}
        return json_report(args, d, output=f"https://huggingface.co/{args.repo_id}", dry_run=args.dry_run)

    def text() -> str:
        if args.dry_run:
            return result.describe() + "\ndry run: nothing uploaded"
        return f"pushed {args.folder} -> {getattr(result, 'commit_url', args.repo_id)}"

    print_report(args, data=data, text=text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "fold",
        help="fold an OFT adapter into its base model and write a full transformers model",
        description=(
            "Write a full model: every weight the adapter adapts is folded into the base (as PEFT's "
            "merge_and_unload does, for every PEFT release), everything else is copied byte for byte. "
            "Streams one tensor at a time; the output appears atomically; dtypes are kept."
        ),
        epilog=EPILOG_FOLD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("adapter", metavar="ADAPTER", help="adapter directory written by save_pretrained (any PEFT release), or Hub id NS/NAME[@REV]")
    f.add_argument("--base", help="base model directory (safetensors, sharded or not, or .bin) or Hub id NS/NAME[@REV]; "
                   "default: the adapter config's base_model_name_or_path (downloaded if need be)")
    f.add_argument("-o", "--output", help="output model directory (written atomically)")
    f.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 2GB, 500MB (default: %(default)s)")
    add_report_arguments(f, dry_run="print the plan (modules, shards, size); write nothing", listed="modules")
    f.add_argument("--peft-release", help="PEFT release that wrote the adapter, when its config does not record it")
    f.add_argument("--hash-base", action="store_true", help="record the SHA-256 of the base's weight files (reads them again)")
    f.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folded model to this Hub repository afterwards")
    f.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")
    f.add_argument("--threads", type=int, default=1, help="torch threads for the fold; I/O runs in its own threads (default: %(default)s)")
    f.set_defaults(func=_cmd_fold)

    p = sub.add_parser(
        "push",
        help="upload a merged adapter or folded model directory to the Hugging Face Hub",
        description="Upload DIR to Hub repository REPO_ID (created if missing) in one commit; hidden files are skipped.",
        epilog=EPILOG_PUSH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="DIR")
    p.add_argument("repo_id", metavar="REPO_ID", help="NAMESPACE/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded; send nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success, draw no upload bars")
    p.set_defaults(func=_cmd_push)
