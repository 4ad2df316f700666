"""Session-scoped nnU-Net fixtures: temporary data folders, a tiny planned dataset 502, a geometric and a stock run.

Import them from conftest.py with ``from fixtures_nnunet import *``. Each is built once per session, as small as
nnU-Net allows (16 images of 64^2, the ``2d_tiny`` configuration, 1 MB checkpoints).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from geodiag.diagnostics.datasets import make_dataset
from geodiag.diagnostics.environment import EXT_TRAINER_VAR, NnunetDirs, ext_trainer_value
from geodiag.diagnostics.nnunet_plans import PLANS_NAME, TINY_CONFIGURATION, nnunet_tool, plan_and_preprocess

__all__ = ["NnunetDataset", "NnunetRun", "nnunet_env", "tiny_dataset_502", "geometric_run", "stock_run",
           "env_from_geodiag"]

QUICK_TRAINER = "nnUNetTrainerGeometricQuick"


@dataclass(frozen=True)
class NnunetDataset:
    dataset_id: int
    name: str
    dirs: NnunetDirs
    plans_file: Path
    configuration: str

    @property
    def preprocessed(self) -> Path:
        return self.dirs.preprocessed / self.name

    def load_plans(self) -> dict:
        """The plans, ready for a trainer's constructor (``continue_training`` set, as nnU-Net's entry does)."""
        plans = json.loads(self.plans_file.read_text())
        plans["continue_training"] = False
        return plans

    def load_dataset_json(self) -> dict:
        return json.loads((self.preprocessed / "dataset.json").read_text())


@dataclass(frozen=True)
class NnunetRun:
    """A finished training fold: its folder, per-epoch checkpoints (epoch -> path) and the switch-on epoch."""

    trainer: str
    dataset: NnunetDataset
    output_folder: Path
    checkpoints: dict[int, Path]
    switch_on_epoch: int | None
    console: str

    @property
    def final_checkpoint(self) -> Path:
        return self.output_folder / "checkpoint_final.pth"


def env_from_geodiag(base: dict[str, str]) -> dict[str, str]:
    """``base`` plus what ``eval "$(geodiag env)"`` exports, read from the real command's output."""
    lines = subprocess.run([sys.executable, "-m", "geodiag.diagnostics.cli", "env"], env=base, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    script = "\n".join(lines) + f'\nprintf %s "${EXT_TRAINER_VAR}"'
    value = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    return {**base, EXT_TRAINER_VAR: value}


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> NnunetDirs:
    """Temporary nnUNet_raw/preprocessed/results (and geodiag's trainer folders) set in os.environ."""
    dirs = NnunetDirs.under(tmp_path_factory.mktemp("nnunet")).create()
    values = {**dirs.as_env(), EXT_TRAINER_VAR: ext_trainer_value(os.environ.get(EXT_TRAINER_VAR))}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    yield dirs
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_dataset_502(nnunet_env: NnunetDirs) -> NnunetDataset:
    """Dataset502_Shapes_One, 16 images of 64^2, planned (2d), preprocessed, with the 2d_tiny configuration."""
    folder = make_dataset(502, nnunet_env.raw, num=16, size=64, seed=7)
    plans_file = plan_and_preprocess(502, nnunet_env)
    return NnunetDataset(502, folder.name, nnunet_env, plans_file, TINY_CONFIGURATION)


def _checkpoints(folder: Path) -> dict[int, Path]:
    return {int(p.stem.rsplit("_", 1)[1]): p for p in sorted(folder.glob("checkpoint_epoch_*.pth"))}


@pytest.fixture(scope="session")
def geometric_run(tiny_dataset_502: NnunetDataset) -> NnunetRun:
    """``nnUNetv2_train 502 2d_tiny 0 -tr nnUNetTrainerGeometricQuick -device cpu`` run by the real tool.

    The environment is what ``geodiag env`` exports; the quick trainer switches the geometric term on in epoch 2
    of 6 and saves every epoch.
    """
    from geodiag.losses.nnunet_trainer import nnUNetTrainerGeometricQuick

    env = env_from_geodiag(dict(os.environ))
    command = [nnunet_tool("nnUNetv2_train"), "502", tiny_dataset_502.configuration, "0", "-tr", QUICK_TRAINER,
               "-device", "cpu"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = (tiny_dataset_502.dirs.results / tiny_dataset_502.name
              / f"{QUICK_TRAINER}__{PLANS_NAME}__{tiny_dataset_502.configuration}" / "fold_0")
    return NnunetRun(QUICK_TRAINER, tiny_dataset_502, folder, _checkpoints(folder),
                     nnUNetTrainerGeometricQuick.warmup_epochs, proc.stdout)


@pytest.fixture(scope="session")
def stock_run(tiny_dataset_502: NnunetDataset) -> NnunetRun:
    """A stock nnUNetTrainer trained in process for one epoch of 2 iterations (no final validation)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = nnUNetTrainer(tiny_dataset_502.load_plans(), tiny_dataset_502.configuration, 0,
                            tiny_dataset_502.load_dataset_json(), torch.device("cpu"))
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = 2
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
    folder = Path(trainer.output_folder)
    return NnunetRun("nnUNetTrainer", tiny_dataset_502, folder, {}, None, "")
