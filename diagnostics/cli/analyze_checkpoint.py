"""`geodiag analyze-checkpoint`: verdict, histograms and provenance for one nnU-Net checkpoint."""
from __future__ import annotations

import argparse
import sys

from . import options

HELP = "analyse an nnU-Net checkpoint: why (or whether) its geometric loss goes non-finite"


def configure(parser: argparse.ArgumentParser) -> None:
    from geodiag.losses.stabilizers import STABILIZERS

    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_RESULTS_FOLDER")
    options.add_checkpoint_source(parser, "analyse")
    parser.add_argument("--max-cases", type=int, default=None, help="analyse at most this many cases")
    options.add_device(parser)
    parser.add_argument("--stabilizer", choices=STABILIZERS,
                        help="override the sqrt stabiliser (default: the checkpoint trainer's, else production)")
    parser.add_argument("--eps", type=float, help="override the stabiliser's eps")
    options.add_precision(parser, ["fp32"], "precisions of the network forward")
    parser.add_argument("--patches", type=int, default=None, metavar="N",
                        help="training patches per case, drawn as nnU-Net's data loader draws them, that go through "
                             "the network with gradients (default 2: one random, one on foreground)")
    parser.add_argument("--augment", action="store_true",
                        help="pass the training patches through nnUNetTrainer's training augmentation (default: off)")
    options.add_loss(parser, "the geometric loss recorded in the run folder, else the production preset")
    parser.add_argument("--term", action="append", default=[], metavar="NAME=SPEC",
                        help="a term of your --loss, measured on its own (repeatable): SPEC a weight attribute of the "
                             "loss (the term is the loss with the other named weights at 0) or a loss SPEC "
                             "file.py:NAME; a loss returning a dict of tensors needs none (its entries are its terms)")
    options.add_out(parser)
    options.add_resume(parser, "analysis")


def run(args: argparse.Namespace) -> int:
    from geodiag.reports import analysis_report, schema

    from ..tools.analyze import DEFAULT_PATCHES, analyze_checkpoint
    from ..progress import for_stream
    from ..instruments.devices import resolve_device
    from ..instruments.errors import GeodiagError

    if args.max_cases is not None and args.max_cases < 1:
        raise GeodiagError("--max-cases must be at least 1")
    summary = analyze_checkpoint(
        args.checkpoint, args.out, fold=args.fold, cases=args.cases, device=resolve_device(args.device),
        stabilizer=args.stabilizer, eps=args.eps, precisions=args.precision,
        max_cases=args.max_cases, trust=args.trust_checkpoint, resume=args.resume,
        patches=DEFAULT_PATCHES if args.patches is None else args.patches, augment=args.augment,
        progress=for_stream(sys.stderr), loss_spec=args.loss, loss_input=args.loss_input, term=args.term)
    report = analysis_report.render(args.out)
    print(f"verdict: {summary['verdict']} — {summary['verdict_reason']}")
    for line in analysis_report.loss_findings_lines(summary):  # what the verdict on finiteness does not show
        print(line)
    shares = analysis_report.gradient_share_text(summary)
    if shares:
        print(shares)
    print(report.markdown)
    print(report.html)
    return 0 if summary["verdict"] == schema.HEALTHY else 3
