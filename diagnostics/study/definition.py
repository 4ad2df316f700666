"""What a study is made of and where its steps find things: the runs and settings (``Study``, ``RunSpec``),
the folders and checkpoints the steps share, and the environment nnU-Net runs in.

Every step is a function of the ``Study``; what one step produces for a later one is kept in ``Study.products``.
A run's seed (``RunSpec.seed``, else the study's) seeds its training (initialisation, nnU-Net's loader and
augmentation) and the batches measured on it; a configuration run with several seeds (``seeded``) keeps each
seed's nnU-Net results in a folder of its own, since nnU-Net names a run's folder by trainer, plans and fold only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from geodiag.losses.nnunet.patches import EnvironHandle, patch_environ

from ..nnunet.datasets import dataset_spec
from ..nnunet.environment import EXT_TRAINER_VAR, NnunetDirs, ext_trainer_value, nnunet_env
from ..nnunet.plans import PLANS_NAME, TINY_CONFIGURATION
from ..nnunet.watch import LAST_GOOD, WATCH_FOLDER
from .replica import UserCode

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """One training run: a trainer on a dataset with its schedule; ``user`` when the trainer is a user's code."""

    dataset_id: int
    trainer: str
    epochs: int
    iterations: int
    warmup: int
    val_iterations: int = 2
    user: Optional[UserCode] = None
    seed: Optional[int] = None  # None: the study's seed, and the name carries none

    @property
    def configuration(self) -> str:
        """What the run trains, whatever its seed: dataset and trainer."""
        short = self.trainer.replace("nnUNetTrainerGeometric", "").replace("nnUNetTrainerSeed", "")
        return f"{self.dataset_id}-{short or 'Production'}"

    @property
    def name(self) -> str:
        return self.configuration if self.seed is None else f"{self.configuration}-seed{self.seed}"


def seeded(runs: tuple[RunSpec, ...], seeds: tuple[int, ...]) -> tuple[RunSpec, ...]:
    """Each run once per seed, a configuration's seeds together."""
    return tuple(replace(run, seed=seed) for run in runs for seed in seeds)


@dataclass
class Study:
    """What the steps share: settings, where things are, and what earlier steps produced."""

    out: Path
    datasets: tuple[int, ...]
    runs: tuple[RunSpec, ...]
    num_images: int
    image_size: int
    sweep_epochs: tuple[int, ...] = (0,)  # relative to the switch-on epoch
    sweep_eps: tuple[float, ...] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
    batch_size: Optional[int] = None  # the tiny configuration's batch; None: what nnU-Net planned
    cases: int = 8
    term_batches: int = 4
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    watch_every: int = 16
    seed: int = 0  # the datasets' seed, and every run's that names none
    analysed_seeds: Optional[tuple[int, ...]] = None  # analysis and sweeps only on these runs' seeds; None: all
    reductions: tuple[str, ...] = ()  # what this configuration cut to fit its time budget (study.json says it)
    device: str = "cpu"
    log: Log = print
    products: dict = field(default_factory=dict)

    @property
    def dirs(self) -> NnunetDirs:
        return NnunetDirs.under(self.out / "nnunet")

    def run_seed(self, run: RunSpec) -> int:
        return self.seed if run.seed is None else run.seed

    def results_folder(self, run: RunSpec) -> Path:
        """nnU-Net's results folder for the run: one per seed of a seeded run."""
        return self.dirs.results if run.seed is None else self.dirs.results.with_name(f"nnUNet_results_seed{run.seed}")

    def fold_folder(self, run: RunSpec) -> Path:
        name = dataset_spec(run.dataset_id).folder_name
        return self.results_folder(run) / name / f"{run.trainer}__{PLANS_NAME}__{TINY_CONFIGURATION}" / "fold_0"

    @property
    def analysed_runs(self) -> tuple[RunSpec, ...]:
        """The runs the analysis and the sweeps measure (``analysed_seeds``)."""
        return tuple(run for run in self.runs
                     if self.analysed_seeds is None or self.run_seed(run) in self.analysed_seeds)


def nnunet_environment(study: Study, run: Optional[RunSpec] = None) -> EnvironHandle:
    """What ``nnunet_env`` gives nnU-Net's tools, with the study's folders (``run``'s results folder when given)
    and every user trainer folder of its runs, for in-process training (nnU-Net reads its variables lazily);
    torch.compile stays off so hooks see every op, and augmentation runs in process (``nnUNet_n_proc_DA=0``), the
    only way its draws follow the seed. Each variable is restored when the handle is removed."""
    user_folders = [str(run.user.folder) for run in study.runs if run.user is not None]
    results = {} if run is None else {"nnUNet_results": str(study.results_folder(run))}
    return patch_environ({**nnunet_env(study.dirs, nnUNet_compile="f", nnUNet_n_proc_DA="0", **results),
                          EXT_TRAINER_VAR: ext_trainer_value(os.pathsep.join(dict.fromkeys(user_folders)))})


def epoch_checkpoint(study: Study, run: RunSpec, epoch: int) -> Path:
    return study.fold_folder(run) / f"checkpoint_epoch_{epoch:04d}.pth"


def switch_on_checkpoint(study: Study, run: RunSpec) -> Path:
    """The state after the first epoch trained with the geometric term; for a run watch stopped before that
    epoch ended, the last good state it saved before the first non-finite step."""
    path = epoch_checkpoint(study, run, run.warmup)
    stopped = study.fold_folder(run) / WATCH_FOLDER / LAST_GOOD
    return path if path.is_file() or not stopped.is_file() else stopped
