"""`geodiag clamp-sweep`: bias and gradients of every (stabiliser, eps) on real predictions of checkpoints."""
from __future__ import annotations

import argparse
import sys

from .loss_options import add_loss_options


HELP = "sweep sqrt stabilisers and eps on real predictions of nnU-Net checkpoints; write tables and a report"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def configure(parser: argparse.ArgumentParser) -> None:
    from ..tools.sweep import DEFAULT_EPS, DEFAULT_STABILIZERS

    parser.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CHECKPOINT",
                        help="checkpoint files or nnU-Net results folders, optionally labelled")
    parser.add_argument("--fold", help="fold to sweep when a results folder holds several folds")
    parser.add_argument("--cases", help="folder of cases, or comma-separated case names (default: the dataset's "
                                        "imagesTr/labelsTr under nnUNet_raw)")
    parser.add_argument("--eps", type=_floats, default=list(DEFAULT_EPS), help="comma-separated eps values")
    parser.add_argument("--stabilizers", type=_names, default=list(DEFAULT_STABILIZERS),
                        help="comma-separated: clamp, additive, shifted")
    parser.add_argument("--precision", type=_names, default=["fp32", "fp16", "bf16"],
                        help="comma-separated network precisions: fp32, fp16, bf16 (autocast)")
    parser.add_argument("--aspect-formula", choices=("seed", "anisotropy"), default="seed",
                        help="aspect term whose bias is measured (seed: sqrt of tr^2-4det, where eps also acts)")
    add_loss_options(parser, "geodiag's GeometricLoss under every --stabilizers x --eps")
    parser.add_argument("--site", type=_names, metavar="FILE:LINE[,FILE:LINE]",
                        help="with --loss: the clamp (its min) or sqrt(x + c) (its c) whose bound each --eps replaces, "
                             "FILE as analyze-checkpoint's sites table names it or just the file name")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoints with full pickle (runs code from the file: only for trusted files)")


def run(args: argparse.Namespace) -> int:
    from geodiag.reports import sweep_report

    from ..instruments.devices import resolve_device
    from ..instruments.devices import parse_precisions
    from ..progress import for_stream
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
