"""Session-scoped nnU-Net fixtures: temporary data folders, a tiny planned dataset 502, a geometric and a stock run,
untrained checkpoints whose cases are larger than the patch (2D) or larger and smaller along different axes (3D).

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

import numpy as np
import pytest
import torch

from geodiag.diagnostics.nnunet.datasets import make_dataset
from geodiag.diagnostics.nnunet.environment import EXT_TRAINER_VAR, NnunetDirs, ext_trainer_value
from geodiag.diagnostics.nnunet.plans import PLANS_NAME, TINY_CONFIGURATION, nnunet_tool, plan_and_preprocess

__all__ = ["NnunetDataset", "NnunetRun", "nnunet_env", "tiny_dataset_502", "geometric_run", "stock_run",
           "env_from_geodiag", "patch32_checkpoint", "tiny_dataset_3d", "checkpoint_3d"]

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
    from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometricQuick

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


def crop_with_padding(array: np.ndarray, bbox: list[list[int]], fill: float) -> np.ndarray:
    """array[:, lo:hi, ...] (fp64) with ``fill`` wherever the box reaches outside the array: an nnU-Net training
    patch cut here in numpy, from the box its data loader chose."""
    out = np.full((array.shape[0], *[hi - lo for lo, hi in bbox]), fill, dtype=np.float64)
    source = tuple(slice(max(lo, 0), min(hi, size)) for (lo, hi), size in zip(bbox, array.shape[1:]))
    target = tuple(slice(max(lo, 0) - lo, min(hi, size) - lo) for (lo, hi), size in zip(bbox, array.shape[1:]))
    out[(slice(None),) + target] = array[(slice(None),) + source]
    return out


def untrained_checkpoint(dataset: NnunetDataset, configuration: str, definition: dict) -> Path:
    """A stock nnUNetTrainer's freshly initialised checkpoint (as its first save would write it) for a
    configuration added to the dataset's plans in memory only (the plans file stays as planned)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = dataset.load_plans()
    plans["configurations"][configuration] = definition
    torch.manual_seed(0)
    trainer = nnUNetTrainer(plans, configuration, 0, dataset.load_dataset_json(), torch.device("cpu"))
    trainer.initialize()
    Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
    path = Path(trainer.output_folder) / "checkpoint_final.pth"
    trainer.save_checkpoint(str(path))
    return path


# 2D: the 64^2 images of dataset 502 on patches of 32^2, so every case is larger than the patch.
PATCH32_CONFIGURATION = "2d_tiny_patch32"


@pytest.fixture(scope="session")
def patch32_checkpoint(tiny_dataset_502: NnunetDataset) -> Path:
    from geodiag.diagnostics.nnunet.plans import tiny_configuration

    definition = tiny_configuration(tiny_dataset_502.load_plans(), "2d", patch_size=(32, 32))
    return untrained_checkpoint(tiny_dataset_502, PATCH32_CONFIGURATION, definition)


# 3D: balls in volumes of 40-56 voxels per axis, patch 48^3: every case is shorter than the patch along some axis
# (by a size the network's total stride, 4, does not divide: an unpadded tile cannot go through it) and longer
# along another.
BALL_SHAPES = ((42, 56, 48), (56, 45, 40), (48, 41, 56), (43, 53, 44))
PATCH_3D = (48, 48, 48)
CONFIGURATION_3D = "3d_tiny"


def _write_balls_3d(raw: Path, dataset_id: int) -> Path:
    """A raw nnU-Net dataset of one bright ball per noisy volume (NIfTI, spacing 1)."""
    import SimpleITK as sitk

    folder = raw / f"Dataset{dataset_id:03d}_Balls3D"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(3)
    for index, shape in enumerate(BALL_SHAPES):
        grid = np.indices(shape).astype(np.float32)
        centre = [rng.uniform(14, s - 14) for s in shape]
        label = (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= 10.0 ** 2).astype(np.uint8)
        image = 100.0 + 80.0 * label + rng.normal(0, 15, shape)
        for array, path in ((image.astype(np.float32), folder / "imagesTr" / f"ball_{index:03d}_0000.nii.gz"),
                            (label, folder / "labelsTr" / f"ball_{index:03d}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "synthetic"}, "labels": {"background": 0, "ball": 1},
        "numTraining": len(BALL_SHAPES), "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="session")
def tiny_dataset_3d(nnunet_env: NnunetDirs) -> NnunetDataset:
    """Dataset590_Balls3D planned and preprocessed by the real planner (3d_fullres)."""
    folder = _write_balls_3d(nnunet_env.raw, 590)
    plans_file = plan_and_preprocess(590, nnunet_env, configuration="3d_fullres")
    return NnunetDataset(590, folder.name, nnunet_env, plans_file, CONFIGURATION_3D)


@pytest.fixture(scope="session")
def checkpoint_3d(tiny_dataset_3d: NnunetDataset) -> Path:
    """An untrained stock checkpoint of 3d_tiny: 3d_fullres cut to 3 stages of 4-16 features, patch 48^3."""
    from geodiag.diagnostics.nnunet.plans import tiny_configuration

    definition = tiny_configuration(tiny_dataset_3d.load_plans(), "3d_fullres", n_stages=3, base_features=4,
                                    max_features=16, patch_size=PATCH_3D)
    return untrained_checkpoint(tiny_dataset_3d, CONFIGURATION_3D, definition)
