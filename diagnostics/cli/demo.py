"""`geodiag demo`: the reference study in miniature — the seed replica beside production, under watch, one report."""
from __future__ import annotations

import argparse
import os

from geodiag.reports import seed

from . import options

HELP = (f"make dataset 502, train the seed replica (a user's trainer, {seed.V23.name}) and geodiag's production "
        "trainer under geodiag watch (geometric term on after a warm-up), measure, analyse and sweep their switch-on "
        "checkpoints, write a report")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=options.path, help="working folder (reused when run again)")
    parser.add_argument("--num", type=int, default=24, help="training images (default %(default)s)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default %(default)s)")
    options.add_device(parser)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no OpenMP spinning
    from ..study.demo import run_demo
    from ..instruments.devices import resolve_device
    from ..instruments.errors import GeodiagError

    if args.num < 4 or args.size < 32:
        raise GeodiagError("--num must be at least 4 and --size at least 32")
    report = run_demo(args.out, num_images=args.num, image_size=args.size, seed=args.seed,
                      device=resolve_device(args.device), log=lambda message: print(message, flush=True))
    print(f"report: {report}")
    print(f"        {report.with_suffix('.html')}")
    return 0
