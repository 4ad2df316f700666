"""`geodiag reference-report`: regenerate reports/reference/ from scratch (datasets, training, sweep, analysis)."""
from __future__ import annotations

import argparse
import os

from geodiag.reports import seed

from . import options

HELP = (f"regenerate the reference report: the seed replica ({', '.join(v.name for v in seed.VERSIONS)}) and "
        "production on datasets 501/502 under geodiag watch (the README gives its measured time)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="reference_work", type=options.path,
                        help="working folder: data, checkpoints (not committed)")
    parser.add_argument("--report-dir", default="reports/reference", type=options.path,
                        help="where the report is published")
    options.add_device(parser)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..instruments.devices import resolve_device
    from ..study.reference import run_reference

    report = run_reference(args.work, args.report_dir, device=resolve_device(args.device),
                           log=lambda message: print(message, flush=True))
    print(f"report: {report}")
    return 0
