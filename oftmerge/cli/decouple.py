"""``oftmerge decouple``: merge LoRA adapters and full finetunes into one model (see :mod:`oftmerge.ops.decouple`)."""

from __future__ import annotations

import argparse

from oftmerge.cli.common import EXIT_CODES, add_report_arguments, json_report, parse_options, parse_weights, print_report, progress_bars, require_output

EPILOG = """examples:
  oftmerge decouple --base base lora-a lora-b full-c -o merged
  oftmerge decouple --base base A B -o merged --euclidean ties --option density=0.2 --orthogonal orthomerge --target conflict
  oftmerge decouple --base base A B -o ta-only --euclidean ta --orthogonal none     # the plain Euclidean baseline
  oftmerge decouple --base base A B --dry-run                                       # which tensors, which path

Each 2-D weight W0 is split per expert into a rotation (Procrustes, W0 R_i ~ target) and a residual;
rotations are merged in so(d), residuals with the Euclidean method, W = W0 R_m + rho_m. Embeddings and
tensors that are not 2-D use the Euclidean method alone. docs/decoupling.md has the definitions.

""" + EXIT_CODES


def _cmd_decouple(args: argparse.Namespace) -> int:
    from oftmerge.config import DecoupleConfig, RunOptions
    from oftmerge.ops.decouple import run_decouple

    require_output(args)
    config = DecoupleConfig(
        args.base, tuple(args.experts), euclidean=args.euclidean, orthogonal=None if args.orthogonal == "none" else args.orthogonal,
        target=args.target, procrustes=args.procrustes, weights=parse_weights(args.weights),
        euclidean_options=parse_options(args.option), orthogonal_options=parse_options(args.orthogonal_option),
        max_rotation=args.max_rotation, on_domain_error=args.on_domain_error, euclidean_only=tuple(args.euclidean_only),
    )  # fmt: skip
    with progress_bars(args, ("decouple",), unit="tensor") as progress:
        run = RunOptions(threads=args.threads, shard_size=args.shard_size, overwrite=args.overwrite, dry_run=args.dry_run, progress=progress)
        result = run_decouple(config, run, None if args.dry_run else args.output)

    def data() -> dict:
        d = result.provenance()
        d["plan"] = result.plan
        return json_report(args, d, output=result.out_dir, dry_run=args.dry_run)

    def text() -> str:
        return result.summary(max_rows=args.show) + "\n" + ("dry run: nothing written" if args.dry_run else f"wrote {result.out_dir}")

    print_report(args, data=data, text=text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from oftmerge.linalg.procrustes import SOLVERS
    from oftmerge.methods import available_methods
    from oftmerge.methods.decoupling import MAX_ROTATION, ON_DOMAIN_ERROR, TARGETS
    from oftmerge.methods.euclidean import euclidean_methods

    p = sub.add_parser(
        "decouple",
        help="merge LoRA adapters / full finetunes into one full model (orthogonal-residual decoupling)",
        description="Merge PEFT LoRA adapters and fully finetuned models of one base into a full model: rotations "
        "merged on the orthogonal group, residuals with TA / TIES / DARE / TSV-M (OrthoMerge, section 3.3).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experts", nargs="+", metavar="EXPERT", help="LoRA adapter directories and/or full model directories (or Hub ids NS/NAME[@REV])")
    p.add_argument("--base", required=True, help="base model directory (transformers checkpoint) or Hub id NS/NAME[@REV]")
    p.add_argument("-o", "--output", help="output model directory (written atomically)")
    p.add_argument("--euclidean", default="ties", choices=list(euclidean_methods()), help="method for residuals (default: %(default)s)")
    p.add_argument("--orthogonal", default="orthomerge", choices=[*available_methods(), "none"],
                   help="so(d) method for the rotations; 'none' = the Euclidean method alone (default: %(default)s)")
    p.add_argument("--target", default="global", choices=TARGETS, help="Procrustes target: W_i, or only the conflicting rows (default: %(default)s)")
    p.add_argument("--procrustes", default="robust", choices=SOLVERS,
                   help="robust (SO(d), null space anchored), reference (the paper's plain SVD), fast (checked Newton) (default: %(default)s)")
    p.add_argument("--weights", help="comma-separated weight per expert")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the arithmetic (default: torch's, one per core). Results are bit-identical for "
                   "one thread count, also split over processes with accelerate launch, which gives each process one")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="Euclidean method option, e.g. density=0.2, p=0.5, seed=1, scale=1")
    p.add_argument("--orthogonal-option", action="append", default=[], metavar="KEY=VALUE", help="so(d) method option, e.g. per_block=true")
    p.add_argument("--max-rotation", type=float, default=MAX_ROTATION,
                   help="largest ||W0 R_m - W0|| / max ||tau_i|| before a tensor falls back to the Euclidean method (default: %(default)s)")
    p.add_argument("--on-domain-error", default="log", choices=ON_DOMAIN_ERROR,
                   help="a rotation outside the Cayley chart: merge in the log chart, fall back, or stop (default: %(default)s)")
    p.add_argument("--euclidean-only", action="append", default=[], metavar="REGEX", help="tensor names never decoupled (repeatable)")
    p.add_argument("--shard-size", default="5GB", help="largest shard of the output (default: %(default)s)")
    add_report_arguments(p, dry_run="print the plan; merge and write nothing", listed="tensors")
    p.set_defaults(func=_cmd_decouple)
