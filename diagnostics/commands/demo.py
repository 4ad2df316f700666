"""`geodiag demo`: a small CPU nnU-Net run on dataset 502 where the geometric term switches on mid-run."""
from __future__ import annotations

import argparse

HELP = "make data, plan, and train nnUNetTrainerGeometricQuick on CPU (geometric term on after warm-up); a few minutes"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="working folder (reused when run again)")
    parser.add_argument("--num", type=int, default=24, help="training images (default %(default)s)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out, num_images=args.num, image_size=args.size, seed=args.seed)
    return 0
