"""Training patches of one case, drawn by nnU-Net's own data loader: what the network and its gradients see.

A whole image larger than the patch is predicted tile by tile without gradients, so the network's gradients are
measured where training produces them: on patches of the configuration's patch size, placed by
``nnUNetDataLoader.get_bbox`` with the trainer's foreground oversampling (the last third of a batch is centred
on a foreground voxel), padded where they reach past the image (image 0, label -1, then -1 -> 0 as nnU-Net's
training transforms do). No augmentation: the loader runs without transforms.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .cases import Case
from .checkpoint import Checkpoint
from .errors import GeodiagError

# nnUNetTrainer.oversample_foreground_percent, used when the checkpoint's trainer class is not importable.
DEFAULT_FOREGROUND_OVERSAMPLING = 0.33


@dataclass
class PatchBatch:
    """N patches of one case: image [N, C, *P], label [N, 1, *P], and where each was cut (nnU-Net's bbox in the
    preprocessed case's [Z, Y, X] voxels, lower bound inclusive; may reach outside the image) and why."""

    image: torch.Tensor
    label: torch.Tensor
    bboxes: list[list[list[int]]]
    forced_foreground: list[bool]
    foreground_oversampling: float


class _OneCase:
    """The part of nnUNetBaseDataset the data loader uses, holding one case already in memory."""

    def __init__(self, case: Case) -> None:
        self.identifiers = [case.name]
        self._case = case

    def load_case(self, identifier: str):
        return self._case.data, self._case.seg, None, self._case.properties


def foreground_oversampling(checkpoint: Checkpoint) -> float:
    """A geodiag trainer's class-level oversample_foreground_percent, else nnUNetTrainer's (set in its __init__,
    so not readable without building a trainer)."""
    from geodiag.losses import nnunet_trainer

    trainer = getattr(nnunet_trainer, checkpoint.trainer_name, None)
    return float(getattr(trainer, "oversample_foreground_percent", DEFAULT_FOREGROUND_OVERSAMPLING))


def training_patches(checkpoint: Checkpoint, case: Case, count: int, seed: int = 0) -> PatchBatch:
    """``count`` patches of ``case`` as one nnU-Net training batch of that size would hold them.

    The draw is a function of ``seed`` and the case name (numpy's global generator, which nnU-Net's loader uses,
    is seeded for the draw and restored after it), so a resumed run draws the same patches.
    """
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if count < 1:
        raise GeodiagError(f"--patches must be at least 1, got {count}")
    if case.data is None or case.seg is None or "class_locations" not in case.properties:
        raise GeodiagError(f"case {case.name} has no preprocessed label to place training patches by")
    plans = PlansManager(checkpoint.plans)
    patch_size = list(plans.get_configuration(checkpoint.configuration).patch_size)
    oversampling = foreground_oversampling(checkpoint)
    loader = nnUNetDataLoader(_OneCase(case), count, patch_size, patch_size,
                              plans.get_label_manager(checkpoint.dataset_json),
                              oversample_foreground_percent=oversampling, transforms=None)
    bboxes: list[list[list[int]]] = []
    forced: list[bool] = []
    draw_bbox = loader.get_bbox

    def recorded_bbox(data_shape, force_fg, class_locations, *args, **kwargs):
        lower, upper = draw_bbox(data_shape, force_fg, class_locations, *args, **kwargs)
        bboxes.append([[int(a), int(b)] for a, b in zip(lower, upper)])
        forced.append(bool(force_fg))
        return lower, upper

    loader.get_bbox = recorded_bbox
    state = np.random.get_state()
    np.random.seed((zlib.crc32(case.name.encode()) + seed) % 2**32)
    try:
        batch = loader.generate_train_batch()
    finally:
        np.random.set_state(state)
    label = batch["target"].float().clamp_min(0)
    return PatchBatch(batch["data"].float(), label, bboxes, forced, oversampling)
