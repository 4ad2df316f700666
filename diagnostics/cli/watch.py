"""`geodiag watch -- nnUNetv2_train ...`: train with any nnU-Net trainer, guarded and recorded; explain the first
non-finite step (exit 3 when training was stopped)."""
from __future__ import annotations

import argparse
import os

from .options import path

HELP = "run nnUNetv2_train in process with any trainer, guarded and recorded; explain the first non-finite step"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--every", type=int, default=16,
                        help="histograms, the weight/momentum scan and the sampled checks (masked non-finite values, "
                             "swallowed errors, the --loss share) every N iterations (default %(default)s)")
    parser.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                        help="on a non-finite loss or gradient: stop (exit 3) or skip the step and go on "
                             "(default %(default)s); a collapsing GradScaler or non-finite weights always stop")
    parser.add_argument("--on-masked", choices=("report", "stop"), default="report",
                        help="on non-finite values the trainer's code hid from a finite loss (seen on sampled steps): "
                             "report them and go on, or stop (exit 3) (default %(default)s)")
    parser.add_argument("--loss", metavar="SPEC",
                        help="your loss (package.module:NAME or file.py:NAME): on sampled steps, its share of the "
                             "gradient at the network's output; an epoch where it stays below 0.01 is called inert")
    parser.add_argument("--loss-input", choices=("probabilities", "logits"), default="probabilities",
                        help="what --loss takes: softmax probabilities (default) or the logits")
    parser.add_argument("--tensorboard", metavar="DIR", type=path,
                        help="also write scalars and histograms for TensorBoard")
    parser.add_argument("train", nargs=argparse.REMAINDER, metavar="-- nnUNetv2_train DATASET CONFIG FOLD ...",
                        help="the nnUNetv2_train command line to run")


def run(args: argparse.Namespace) -> int:
    from ..instruments.errors import GeodiagError
    from ..nnunet.first_nonfinite import JSON_FILE
    from ..nnunet.watch import WatchOptions, run_watched, skip_summary

    train = args.train[1:] if args.train[:1] == ["--"] else args.train
    if not train or os.path.basename(train[0]) != "nnUNetv2_train":
        raise GeodiagError("expected the training command after --, e.g. geodiag watch -- nnUNetv2_train 1 2d 0 "
                           "-tr MyTrainer")
    if len(train) < 4 or any(arg.startswith("-") for arg in train[1:4]):
        raise GeodiagError("nnUNetv2_train needs DATASET CONFIGURATION FOLD first, e.g. nnUNetv2_train 1 2d 0 -tr "
                           "MyTrainer")
    options = WatchOptions(every=args.every, on_nonfinite=args.on_nonfinite, on_masked=args.on_masked,
                           tensorboard=args.tensorboard, loss=args.loss, loss_input=args.loss_input)
    watch = run_watched(train[1:], options, progress=lambda message: print(message, flush=True))
    skipped = skip_summary(watch.guard.skips) if watch.guard is not None else "no steps run"
    for line in watch.findings.summary_lines(watch.folder):
        print(f"geodiag watch: {line}")
    if watch.first is not None:
        print(f"geodiag watch: first non-finite step explained in {watch.folder / JSON_FILE}")
    if watch.stopped:
        print(f"geodiag watch: {watch.stopped}")
        return 3
    print(f"geodiag watch: training finished; {skipped}")
    return 0
