"""The study's training runs: each through nnU-Net's own ``nnUNetv2_train`` entry point, in process, under
``geodiag watch``, with the study's schedule imposed on the trainer instance nnU-Net builds. A finished run (final
checkpoint, or stopped by watch at a non-finite step) is reused. Each run starts from its seed (``seed_everything``):
the same seed gives the same initialisation, patches, augmentation and batches, so the same numbers on the CPU."""
from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from geodiag.losses.nnunet.patches import PatchHandle, patch

from ..nnunet.first_nonfinite import JSON_FILE as FIRST_NONFINITE
from ..nnunet.plans import TINY_CONFIGURATION
from ..nnunet.watch import WATCH_FOLDER, WatchOptions, run_watched
from ..progress import counter
from .definition import RunSpec, Study, nnunet_environment


def _finished(folder: Path) -> bool:
    """A run is done when nnU-Net wrote its final checkpoint or watch stopped it at a non-finite step."""
    return (folder / "checkpoint_final.pth").is_file() or (folder / WATCH_FOLDER / FIRST_NONFINITE).is_file()


def _schedule(run: RunSpec, advance: Callable[[], None]) -> PatchHandle:
    """The study's schedule on the trainer nnU-Net's entry point builds (any trainer class): epochs, iterations,
    the warm-up, a checkpoint after every epoch, no final validation (the study reads checkpoints)."""
    import nnunetv2.run.run_training as entry

    build = entry.get_trainer_from_args

    def scheduled(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.num_epochs = run.epochs
        trainer.num_iterations_per_epoch = run.iterations
        trainer.num_val_iterations_per_epoch = run.val_iterations
        trainer.warmup_epochs = run.warmup
        trainer.save_every_epoch = True
        end_epoch = trainer.on_epoch_end

        def on_epoch_end() -> None:
            end_epoch()
            advance()

        trainer.on_epoch_end = on_epoch_end
        trainer.perform_actual_validation = lambda *a, **k: trainer.print_to_log_file("final validation skipped")
        return trainer

    return patch(entry, "get_trainer_from_args", scheduled)


def seed_everything(seed: int) -> None:
    """Seed every generator a training run draws from: torch's (initialisation, torch-side augmentation), numpy's
    (nnU-Net's data loader: cases, patch positions; augmentation) and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(study: Study) -> None:
    """Each run as ``geodiag watch -- nnUNetv2_train DATASET 2d_tiny 0 -tr TRAINER -device DEVICE``, in process;
    nnU-Net's and watch's console output goes to the fold's train.log, the progress to the console."""
    for run in study.runs:
        folder = study.fold_folder(run)
        if _finished(folder):
            study.log(f"  {run.name}: reusing {folder}")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        args = [str(run.dataset_id), TINY_CONFIGURATION, "0", "-tr", run.trainer, "-device", study.device]
        console = sys.stdout
        start = time.perf_counter()
        threads = torch.get_num_threads()

        def to_console(message: str) -> None:
            with contextlib.redirect_stdout(console):
                study.log(message)

        with nnunet_environment(study, run), open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log), \
                counter(run.epochs, f"  {run.name}", "epoch", to_console) as advance, _schedule(run, advance):
            seed_everything(study.run_seed(run))
            watch = run_watched(args, WatchOptions(every=study.watch_every), progress=print)
        torch.set_num_threads(threads)  # nnU-Net's entry point sets it for -device cpu
        study.log(f"  {run.name}: {run.epochs} epochs of {run.iterations} iterations under geodiag watch, seed "
                  f"{study.run_seed(run)}, geometric term from epoch {run.warmup}, "
                  f"in {time.perf_counter() - start:.0f} s"
                  + (f"; STOPPED: {watch.stopped}" if watch.stopped else ""))
