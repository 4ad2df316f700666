"""The flags several commands share, defined once: their names, types, defaults and help, and how a library
function's argument names map to them (``flag``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

# Library parameters whose flag is not simply ``--`` + the name with dashes.
FLAGS = {"trust": "--trust-checkpoint", "precisions": "--precision", "count": "--patches", "loss_spec": "--loss",
         "sites": "--site"}
DEVICE_HELP = "auto (CUDA when present), cpu or cuda (default auto)"


def flag(argument: str) -> str:
    """The command-line flag of a library function's argument."""
    return FLAGS.get(argument, "--" + argument.replace("_", "-"))


def names(text: str) -> list[str]:
    """A comma-separated list of names (empty items dropped)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def path(text: str) -> str:
    """A file or folder name; an empty one is refused (as a path it would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name a file or folder")
    return text


def path_object(text: str) -> Path:
    """``path`` as a Path."""
    return Path(path(text))


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_precision(parser: argparse.ArgumentParser, default: Sequence[str] | None, what: str,
                  old_spelling: bool = False) -> None:
    """``--precision`` (comma list, checked against instruments.devices.PRECISIONS by the library function, so a
    bad name is the same one-line error from the CLI and from a notebook); ``--precisions`` stays accepted as
    check-bounds' old spelling (``old_spelling``)."""
    shown = ",".join(default) if default else "all"
    spellings = ("--precision", "--precisions") if old_spelling else ("--precision",)
    parser.add_argument(*spellings, dest="precision", type=names, metavar="NAMES",
                        default=list(default) if default else None,
                        help=f"comma-separated {what}: fp32, fp16, bf16 (autocast; default {shown})")


def add_out(parser: argparse.ArgumentParser, help: str = "output folder") -> None:
    parser.add_argument("--out", required=True, type=path, help=help)


def add_resume(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--resume", action="store_true", help=f"continue an interrupted {what} in --out")


def add_checkpoint_source(parser: argparse.ArgumentParser, what: str) -> None:
    """--fold, --cases and --trust-checkpoint: how a checkpoint and its cases are found and loaded."""
    parser.add_argument("--fold", help=f"fold to {what} when a results folder holds several folds")
    parser.add_argument("--cases", help="folder of cases, or comma-separated case names (default: the dataset's "
                                        "imagesTr/labelsTr under nnUNet_raw)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load with full pickle (runs code from the file: only for trusted files)")


LOSS_HELP = ("your own loss, as package.module:NAME or path/to/file.py:NAME: a callable (input, target) -> scalar "
             "(or (input) -> scalar), an nn.Module, or a zero-argument factory or class returning one")


def add_loss(parser: argparse.ArgumentParser, default_note: str) -> None:
    """``--loss SPEC`` and ``--loss-input``: the one way analyze-checkpoint, clamp-sweep and check-bounds take a
    user's loss (imported only from the SPEC typed here, never from a name found in a checkpoint or run folder)."""
    parser.add_argument("--loss", metavar="SPEC", help=f"{LOSS_HELP}; default: {default_note}")
    parser.add_argument("--loss-input", choices=("probabilities", "logits"), default="probabilities",
                        help="what --loss takes: nnU-Net's softmax over channels (default; under autocast what "
                             "torch.softmax returns there) or the raw logits")


def dims(text: str) -> list[int]:
    """``--dims``: 2, 3 or 2,3."""
    selected = names(text)
    if not selected or any(d not in ("2", "3") for d in selected):
        raise argparse.ArgumentTypeError(f"--dims takes 2, 3 or 2,3, got {text!r}")
    return [int(d) for d in selected]
