"""nnUNetTrainerGeometric stops a rotting training before it saves poisoned state, and says why."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from geodiag.losses.nnunet.guard import TrainingStateCorrupted
from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometric
from geodiag.losses.nnunet.state_health import grad_scale_collapsed

FAULT_EPOCH = 1


class _FaultyRun(nnUNetTrainerGeometric):
    """Three short epochs, a checkpoint per epoch; ``fault`` is applied at ``fault_hook`` of epoch FAULT_EPOCH."""

    warmup_epochs = 1
    save_every_epoch = True
    fault: Callable[["_FaultyRun"], None] = staticmethod(lambda trainer: None)
    fault_hook = "train"  # "train": before the epoch's steps; "validation": after them, before the epoch end

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.fault_hook == "train" and self.current_epoch == FAULT_EPOCH:
            self.fault(self)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.fault_hook == "validation" and self.current_epoch == FAULT_EPOCH:
            self.fault(self)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Skipped: not what these tests are about."""


def _train(dataset, folder: Path, fault, hook: str, scaler: torch.amp.GradScaler | None = None) -> _FaultyRun:
    trainer_class = type("_FaultyRunCase", (_FaultyRun,), {"fault": staticmethod(fault), "fault_hook": hook})
    trainer = trainer_class(dataset.load_plans(), dataset.configuration, 0, dataset.load_dataset_json(),
                            torch.device("cpu"))
    trainer.output_folder_base = str(folder)
    trainer.output_folder = str(folder / "fold_0")
    trainer.log_file = str(folder / "training_log.txt")
    trainer.initialize()
    if scaler is not None:
        trainer.grad_scaler = scaler
    return trainer


def _nan_loss_and_gradients(trainer) -> None:
    """Every step's loss and gradients NaN (an added NaN constant would leave the gradients finite)."""
    dice_ce = trainer.loss
    trainer.loss = lambda output, target: dice_ce(output, target) * torch.tensor(math.nan)


def _nan_weight(trainer) -> None:
    with torch.no_grad():
        next(trainer.network.parameters()).view(-1)[0] = math.nan


def _inf_momentum(trainer) -> None:
    parameter = next(trainer.network.parameters())
    trainer.optimizer.state[parameter]["momentum_buffer"].view(-1)[0] = math.inf


def _saved_state_is_finite(path: Path) -> bool:
    data = torch.load(path, map_location="cpu", weights_only=False)
    tensors = list(data["network_weights"].values())
    tensors += [v for s in data["optimizer_state"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    scaler = data["grad_scaler_state"]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and (not scaler or scaler["scale"] >= 1)


def _assert_stopped_keeping_only_good_checkpoints(trainer, error, folder: Path, reason: str) -> None:
    saved = sorted(p.name for p in (folder / "fold_0").glob("*.pth"))
    assert saved == ["checkpoint_best.pth", "checkpoint_epoch_0000.pth"], saved
    assert all(_saved_state_is_finite(folder / "fold_0" / name) for name in saved)
    message = str(error.value)
    assert f"epoch {FAULT_EPOCH}" in message and reason in message
    assert str(folder / "fold_0" / "checkpoint_epoch_0000.pth") in message  # the last good checkpoint, named
    assert message in (folder / "training_log.txt").read_text()


@pytest.mark.parametrize("fault,hook,reason", [
    (_nan_weight, "train", "weight "),
    (_inf_momentum, "validation", "momentum "),
], ids=["nan-weight", "inf-momentum"])
def test_non_finite_weights_or_momentum_stop_training_before_a_poisoned_save(tiny_dataset_502, tmp_path, fault,
                                                                            hook, reason):
    trainer = _train(tiny_dataset_502, tmp_path, fault, hook)
    with pytest.raises(TrainingStateCorrupted, match="non-finite values after epoch 1") as error:
        trainer.run_training()
    _assert_stopped_keeping_only_good_checkpoints(trainer, error, tmp_path, reason)


def test_a_collapsing_grad_scaler_stops_training_before_a_poisoned_save(tiny_dataset_502, tmp_path):
    """Every step of epoch 1 overflows: the scale halves per skipped step, 4 -> 2 -> 1 -> 0.5 < floor 1."""
    trainer = _train(tiny_dataset_502, tmp_path, _nan_loss_and_gradients, "train", torch.amp.GradScaler("cpu", init_scale=4.0))
    with pytest.raises(TrainingStateCorrupted, match="GradScaler scale 0.5 is below the floor 1") as error:
        trainer.run_training()
    assert trainer.skipped_steps == 3
    _assert_stopped_keeping_only_good_checkpoints(trainer, error, tmp_path, "GradScaler")


def test_a_clean_run_with_a_grad_scaler_is_not_stopped(tiny_dataset_502, tmp_path):
    trainer = _train(tiny_dataset_502, tmp_path, lambda t: None, "train", torch.amp.GradScaler("cpu", init_scale=4.0))
    trainer.run_training()
    assert (tmp_path / "fold_0" / "checkpoint_final.pth").exists()
    assert _saved_state_is_finite(tmp_path / "fold_0" / "checkpoint_final.pth")


@pytest.mark.parametrize("scale,floor,collapsed", [
    (65536.0, 1.0, False),
    (1.0, 1.0, False),
    (0.5, 1.0, True),
    (1e-30, 0.0, False),  # tiny, but 1/scale = 1e30 is below the fp32 maximum 3.4e38
    (2.9e-39, 0.0, True),  # after ~144 halvings from 65536: 1/scale = 3.4e38 overflows fp32
    (0.0, 0.0, True),
    (math.nan, 1.0, True),
])
def test_grad_scale_collapse_is_a_floor_or_an_infinite_fp32_inverse(scale, floor, collapsed):
    assert grad_scale_collapsed(scale, floor) == collapsed
