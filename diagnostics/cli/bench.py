"""`geodiag bench`: geodiag's overheads measured side by side with a plain nnU-Net step and today's tools."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options

HELP = "measure geodiag's overheads against a plain nnU-Net step, detect_anomaly and TensorBoard; write CSV + Markdown"


def configure(parser: argparse.ArgumentParser) -> None:
    options.add_device(parser)
    parser.add_argument("--out", default="geodiag-bench", type=options.path_object,
                        help="folder for bench.csv and bench.md (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats: checks that everything runs, figures are not meaningful")
    parser.add_argument("--scale", choices=("quick", "full", "gpu"),
                        help="sizes: full (default; the CPU figures), gpu (2D step 12x1x512^2 and batch-12 loss at "
                             "512^2, memory up to 1024^2 and 128^3) or quick (same as --quick)")
    parser.add_argument("--only", type=options.names, metavar="NAMES",
                        help="comma-separated benchmarks: watch, provenance, loss-share, vectorisation, sweep, "
                             "histogram, kernel, host-syncs, memory, autotaps (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed (one line each on stderr), e.g. to gate CI on it")


def run(args: argparse.Namespace) -> int:
    from ..tools.bench import environment_line, missed_targets, run_bench, to_markdown, write_results
    from ..instruments.devices import resolve_device

    device = resolve_device(args.device)
    results = run_bench(device, quick=args.quick, only=args.only, scale_name=args.scale,
                        progress=lambda message: print(message, file=sys.stderr, flush=True))
    quick = args.quick or args.scale == "quick"
    header = environment_line(device) + (" (--quick: sizes too small for the figures to mean much)" if quick else
                                         f" (--scale {args.scale})" if args.scale else "")
    csv_path, md_path = write_results(results, args.out, header)
    print(to_markdown(results, header))
    print(f"wrote {csv_path}, {md_path} and {md_path.with_name('readme_table.md')} (the README's cost table)")
    missed = missed_targets(results)
    for line in missed:
        print(line, file=sys.stderr)
    return 1 if (missed and args.check) else 0
