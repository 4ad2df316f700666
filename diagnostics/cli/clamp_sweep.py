"""`geodiag clamp-sweep`: bias and gradients of every (stabiliser, eps) on real predictions of checkpoints."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options


HELP = "sweep sqrt stabilisers and eps on real predictions of nnU-Net checkpoints; write tables and a report"


def configure(parser: argparse.ArgumentParser) -> None:
    from geodiag.losses.stabilizers import STABILIZERS

    from ..tools.sweep import ASPECT_FORMULAS, DEFAULT_EPS

    parser.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                        help="checkpoint files or nnU-Net results folders, optionally labelled")
    options.add_checkpoint_source(parser, "sweep")
    parser.add_argument("--eps", type=options.floats, default=list(DEFAULT_EPS), help="comma-separated eps values")
    parser.add_argument("--stabilizers", type=options.names, default=list(STABILIZERS),
                        help=f"comma-separated: {', '.join(STABILIZERS)}")
    options.add_precision(parser, ["fp32", "fp16", "bf16"], "network precisions")
    parser.add_argument("--aspect-formula", choices=ASPECT_FORMULAS, default=None,
                        help="aspect term whose bias is measured (seed: sqrt of tr^2-4det, where eps also acts, 2D "
                             "only; anisotropy: 2D and 3D). Default: seed on 2D checkpoints, anisotropy when one is "
                             "3D; the report and settings.json say which and why")
    options.add_loss(parser, "geodiag's GeometricLoss under every --stabilizers x --eps")
    parser.add_argument("--site", type=options.names, metavar="FILE:LINE[,FILE:LINE]",
                        help="with --loss: the clamp (its min) or sqrt(x + c) (its c) whose bound each --eps replaces, "
                             "FILE as analyze-checkpoint's sites table names it or just the file name")
    options.add_device(parser)
    options.add_out(parser)
    options.add_resume(parser, "sweep")


def run(args: argparse.Namespace) -> int:
    from geodiag.reports import schema, sweep_report

    from ..instruments.devices import resolve_device
    from ..instruments.devices import parse_precisions
    from ..progress import for_stream
    from ..tools.run_record import SETTINGS_FILE
    from ..tools.sweep import parse_settings, run_sweep

    if args.loss or args.site:
        return _run_site_sweep(args)
    settings = parse_settings(args.stabilizers, args.eps)
    precisions = parse_precisions(args.precision)
    device = resolve_device(args.device)
    frame, timing = run_sweep(args.checkpoints, args.out, cases=args.cases, settings=settings,
                              precisions=precisions, aspect_formula=args.aspect_formula, device=device,
                              trust=args.trust_checkpoint, resume=args.resume, fold=args.fold,
                              progress=for_stream(sys.stderr))
    report = sweep_report.render(args.out)
    print(f"{len(frame)} rows; network forward {timing.forward_s:.1f} s of {timing.total_s:.1f} s "
          f"(sweep / plain inference = {timing.ratio:.2f}x)")
    recorded = schema.read_json(Path(args.out) / SETTINGS_FILE)
    print(f"aspect formula: {recorded['aspect_formula']} ({recorded['aspect_formula_why']})")
    print(report.markdown)
    print(report.html)
    return 0


def _run_site_sweep(args: argparse.Namespace) -> int:
    """The counterfactual sweep of the user's own bound at --site."""
    from geodiag.reports import site_sweep_report

    from ..instruments.devices import parse_precisions, resolve_device
    from ..instruments.errors import GeodiagError
    from ..progress import for_stream
    from ..tools.site_sweep import run_site_sweep

    if not (args.loss and args.site):
        raise GeodiagError("--loss and --site go together: --site FILE:LINE names the bound of your --loss to sweep "
                           "(analyze-checkpoint --loss lists the sites)")
    frame = run_site_sweep(args.checkpoints, args.out, args.loss, args.site, args.eps, loss_input=args.loss_input,
                           cases=args.cases, precisions=parse_precisions(args.precision),
                           device=resolve_device(args.device), trust=args.trust_checkpoint, resume=args.resume,
                           fold=args.fold, progress=for_stream(sys.stderr))
    report = site_sweep_report.render(args.out)
    print(f"{len(frame)} rows")
    print(report.markdown)
    print(report.html)
    return 0
