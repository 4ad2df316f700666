"""``--loss SPEC`` and ``--loss-input``: the one way analyze-checkpoint, clamp-sweep and check-bounds take a user's
loss (imported only from the SPEC typed here, never from a name found in a checkpoint or run folder)."""
from __future__ import annotations

import argparse

LOSS_HELP = ("your own loss, as package.module:NAME or path/to/file.py:NAME: a callable (input, target) -> scalar "
             "(or (input) -> scalar), an nn.Module, or a zero-argument factory or class returning one")


def add_loss_options(parser: argparse.ArgumentParser, default_note: str) -> None:
    parser.add_argument("--loss", metavar="SPEC", help=f"{LOSS_HELP}; default: {default_note}")
    parser.add_argument("--loss-input", choices=("probabilities", "logits"), default="probabilities",
                        help="what --loss takes: nnU-Net's softmax over channels (default; under autocast what "
                             "torch.softmax returns there) or the raw logits")
