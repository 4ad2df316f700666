"""`geodiag env`: shell export lines that let nnU-Net find geodiag's trainers (`eval "$(geodiag env)"`)."""
from __future__ import annotations

import argparse

HELP = 'print export lines for nnU-Net (nnUNet_extTrainer; data folders with --root); use eval "$(geodiag env)"'


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="create nnUNet_raw/, nnUNet_preprocessed/, nnUNet_results/ here and export them")


def run(args: argparse.Namespace) -> int:
    from ..nnunet.environment import export_lines

    print("\n".join(export_lines(args.root)))
    return 0
