"""`geodiag make-dataset`: write a synthetic nnU-Net raw dataset (501 multi-circle, 502 one circle)."""
from __future__ import annotations

import argparse

from geodiag.reports import seed

from . import options

HELP = "write the synthetic raw dataset 501 (2-5 circles) or 502 (one circle) in nnU-Net's format"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_id", type=int, help="501 (Shapes_Multi) or 502 (Shapes_One)")
    parser.add_argument("--out", required=True, type=options.path, help="nnUNet_raw folder to write DatasetXXX_* into")
    parser.add_argument("--num", type=int, default=100, help="training cases (default 100)")
    parser.add_argument("--size", type=int, default=seed.IMAGE_SIZE,
                        help="image side in pixels (default %(default)s, as in the seed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--num-test", type=int, default=0, help="test cases in imagesTs/labelsTs (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..nnunet.datasets import make_dataset

    folder = make_dataset(args.dataset_id, args.out, num=args.num, size=args.size, seed=args.seed,
                          num_test=args.num_test)
    print(f"wrote {args.num} training and {args.num_test} test cases of {args.size}x{args.size} to {folder}")
    return 0
