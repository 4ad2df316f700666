"""A saved training step: the batch, the pre-step state as an nnU-Net checkpoint, and what watch knew about it.

Why a folder of plain files: a bad step found on a training server is replayed later, on a laptop or a GPU
(``geodiag replay``). ``batch.pt`` holds tensors, strings and ints only and ``state.pth`` is what nnU-Net's own
``save_checkpoint`` writes, so both load with ``weights_only=True`` (the state through the allowlist of
``geodiag.diagnostics.nnunet.checkpoint``): a step folder from elsewhere never runs code when it is read. The trainer
class is looked up by name the way ``nnUNetv2_train -tr`` looks it up (nnU-Net's tree and ``nnUNet_extTrainer``).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from geodiag.reports import schema

from .checkpoint import load_checkpoint
from ..instruments.errors import GeodiagError

BATCH_FILE = "batch.pt"
STATE_FILE = "state.pth"
META_FILE = "meta.json"


@dataclass
class SavedStep:
    """A step folder read back: its batch (data, target, keys), RNG state, scaler state and meta data."""

    folder: Path
    batch: dict
    rng_state: Optional[torch.Tensor]
    scaler_state: Optional[dict]
    meta: dict


def scaler_state_dict(scaler, scale: torch.Tensor, growth_tracker: torch.Tensor) -> Optional[dict]:
    """``scaler.state_dict()`` with the scale and growth tracker it had before the step (clones taken then)."""
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler.state_dict()
    state.update(scale=float(scale), _growth_tracker=int(growth_tracker))
    return state


def save_step(trainer, folder: Path, batch: dict, rng_state: torch.Tensor, scaler_state: Optional[dict],
              meta: dict, with_state: bool = True) -> None:
    """Write ``folder``/{batch.pt, state.pth, meta.json}; the trainer's weights and optimizer must be pre-step.
    ``with_state=False`` writes no state.pth (a state that is not good must never look like one)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [str(k) for k in batch.get("keys", [])]
    torch.save({"data": batch["data"], "target": batch["target"], "keys": keys, "rng_state": rng_state,
                "scaler_state": scaler_state}, folder / BATCH_FILE)
    if with_state:
        _save_state(trainer, folder / STATE_FILE, scaler_state)
    schema.write_json(folder / META_FILE, {**meta, "cases": keys, "trainer_name": type(trainer).__name__})


def _save_state(trainer, path: Path, scaler_state: Optional[dict]) -> None:
    """nnU-Net's own save_checkpoint, with the pre-step GradScaler, also under --disable_checkpointing."""
    live_scaler, disabled = trainer.grad_scaler, trainer.disable_checkpointing
    if scaler_state is not None:
        trainer.grad_scaler = torch.amp.GradScaler(trainer.device.type)
        trainer.grad_scaler.load_state_dict(scaler_state)
    trainer.disable_checkpointing = False
    try:
        trainer.save_checkpoint(str(path))
    finally:
        trainer.grad_scaler, trainer.disable_checkpointing = live_scaler, disabled


def copy_state(step_folder: Path, destination: Path) -> None:
    shutil.copyfile(step_folder / STATE_FILE, destination)


def load_step(folder: str | Path) -> SavedStep:
    """Read a step folder; a one-line GeodiagError when it is not one."""
    folder = Path(folder)
    missing = [name for name in (BATCH_FILE, STATE_FILE, META_FILE) if not (folder / name).is_file()]
    if missing:
        raise GeodiagError(f"{folder} is not a saved step folder (missing {', '.join(missing)}); "
                           "geodiag watch writes them as geodiag_watch/step_<iteration>/")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        saved = torch.load(folder / BATCH_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input, reported on one line
        raise GeodiagError(f"cannot read the step in {folder}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if not isinstance(saved, dict) or "data" not in saved or "target" not in saved:
        raise GeodiagError(f"{folder / BATCH_FILE} holds no batch (expected data and target)")
    batch = {"data": saved["data"], "target": saved["target"], "keys": saved.get("keys", [])}
    return SavedStep(folder, batch, saved.get("rng_state"), saved.get("scaler_state"), meta)


def build_trainer(step: SavedStep, device: torch.device):
    """The step's trainer class (nnU-Net's lookup), built from the saved state's init args, with its state loaded."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    checkpoint = load_checkpoint(step.folder / STATE_FILE)
    try:
        trainer_class = recursive_find_trainer_class_by_name(checkpoint.trainer_name)
    except Exception as exc:  # noqa: BLE001 - nnU-Net raises RuntimeError/AssertionError for an unknown name
        raise GeodiagError(f"nnU-Net cannot find the trainer {checkpoint.trainer_name!r} of this step "
                           f"({str(exc).splitlines()[0][:160]}); set nnUNet_extTrainer to the folder holding it") \
            from None
    plans = dict(checkpoint.plans, continue_training=False)
    trainer = trainer_class(plans=plans, configuration=checkpoint.configuration, fold=checkpoint.fold,
                            dataset_json=checkpoint.dataset_json, device=device)
    trainer.log_file = str(step.folder / "replay_log.txt")
    trainer.initialize()
    trainer.current_epoch = int(step.meta["epoch"])  # what train_step may depend on (a warm-up switch)
    trainer.network.load_state_dict(checkpoint.data["network_weights"])
    trainer.optimizer.load_state_dict(checkpoint.data["optimizer_state"])
    if step.scaler_state is not None:
        trainer.grad_scaler = torch.amp.GradScaler(device.type)
        trainer.grad_scaler.load_state_dict(step.scaler_state)
    return trainer
