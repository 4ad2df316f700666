"""`geodiag doctor`: which class does `nnUNetv2_train -tr NAME` get? For geodiag's trainers: this geodiag's, with the
expected settings (not a stale copy)? For any other trainer nnU-Net resolves: where it is, and that watch wraps it."""
from __future__ import annotations

import argparse

HELP = "check which trainer nnU-Net resolves for -tr NAME (geodiag's, not a stale copy) and whether watch wraps it"
WATCH_WRAPS = ("geodiag watch can wrap it: geodiag watch -- nnUNetv2_train DATASET CONFIG FOLD -tr {name} "
               "(wrapped on the instance at run time, the file untouched; one process, not -num_gpus > 1)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainer", default="nnUNetTrainerGeometric", help="trainer name to resolve (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..nnunet.environment import diagnose

    diagnosis = diagnose(args.trainer)
    width = max(len(key) for key in diagnosis.facts)
    for key, value in diagnosis.facts.items():
        print(f"{key:<{width}}  {value}")
    not_ours = f"geodiag has no trainer named {args.trainer}"
    if not_ours in diagnosis.problems:
        for note in diagnosis.problems:  # about geodiag's own trainers: not needed to train or watch this one
            if note != not_ours:
                print(f"note: {note}")
        return _foreign_trainer(args.trainer, diagnosis.resolution)
    if diagnosis.ok:
        print(f"ok: nnUNetv2_train -tr {args.trainer} uses geodiag's trainer")
        print(WATCH_WRAPS.format(name=args.trainer))
        return 0
    for problem in diagnosis.problems:
        print(f"PROBLEM: {problem}")
    return 1


def _foreign_trainer(name: str, result: dict) -> int:
    """A trainer that is not geodiag's: nnU-Net finds it (watch wraps it) or it does not."""
    resolved = result.get("resolved")
    if resolved is None:
        print(f"PROBLEM: nnUNetv2_train -tr {name} would fail: {result.get('error', 'not found')} (neither nnU-Net "
              "nor a folder of nnUNet_extTrainer defines it, and geodiag has no trainer of that name)")
        return 1
    print(f"resolved trainer file  {resolved['file']} (module {resolved['module']})")
    print(f"ok: nnUNetv2_train -tr {name} resolves to a trainer that is not geodiag's (geodiag checks no settings "
          "of it)")
    print(WATCH_WRAPS.format(name=name))
    return 0
