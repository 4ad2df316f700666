"""`geodiag doctor`: does `nnUNetv2_train -tr nnUNetTrainerGeometric` get this geodiag's trainer and settings?"""
from __future__ import annotations

import argparse

HELP = "check that nnU-Net resolves geodiag's trainer (not a stale copy) with the expected settings"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainer", default="nnUNetTrainerGeometric", help="trainer name to resolve (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..nnunet.environment import diagnose

    diagnosis = diagnose(args.trainer)
    width = max(len(key) for key in diagnosis.facts)
    for key, value in diagnosis.facts.items():
        print(f"{key:<{width}}  {value}")
    if diagnosis.ok:
        print(f"ok: nnUNetv2_train -tr {args.trainer} uses geodiag's trainer")
        return 0
    for problem in diagnosis.problems:
        print(f"PROBLEM: {problem}")
    return 1
