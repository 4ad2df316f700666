"""Training patches of one case, drawn by nnU-Net's own data loader: what the network and its gradients see.

A whole image larger than the patch is predicted tile by tile without gradients, so the network's gradients are
measured where training produces them: on patches of the configuration's patch size, placed by
``nnUNetDataLoader.get_bbox`` with the trainer's foreground oversampling (the last third of a batch is centred
on a foreground voxel), padded where they reach past the image (image 0, label -1, then -1 -> 0 as nnU-Net's
training transforms do). Augmentation is off unless asked for; then it is nnUNetTrainer's own pipeline.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .cases import Case
from .checkpoint import Checkpoint
from ..instruments.errors import ArgumentError, GeodiagError

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
    augmented: bool


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
    return float(getattr(checkpoint.trainer_class, "oversample_foreground_percent", DEFAULT_FOREGROUND_OVERSAMPLING))


def _training_augmentation(configuration, label_manager) -> tuple[list[int], object]:
    """nnUNetTrainer's data-loader patch size (enlarged for rotation) and training transforms, from its own code
    (without deep supervision: the analysed network has one output)."""
    from types import SimpleNamespace

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    shim = SimpleNamespace(configuration_manager=configuration, print_to_log_file=lambda *args, **kwargs: None)
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(shim)
    transforms = nnUNetTrainer.get_training_transforms(
        configuration.patch_size, rotation, None, mirror_axes, dummy_2d,
        use_mask_for_norm=configuration.use_mask_for_norm, foreground_labels=label_manager.foreground_labels,
        ignore_label=label_manager.ignore_label)
    return [int(p) for p in initial_patch_size], transforms


def training_patches(checkpoint: Checkpoint, case: Case, count: int, seed: int = 0,
                     augment: bool = False) -> PatchBatch:
    """``count`` patches of ``case`` as one nnU-Net training batch of that size would hold them; with ``augment``,
    through nnU-Net's training augmentation (cut at its enlarged patch size, then rotated, scaled, ... and
    cropped to the patch size).

    The draw is a function of ``seed`` and the case name (numpy's and torch's global generators, which nnU-Net's
    loader and transforms use, are seeded for the draw and restored after it), so a resumed run draws the same
    patches.
    """
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    if count < 1:
        raise ArgumentError(f"{{count}} must be at least 1, got {count}", "count")
    if case.data is None or case.seg is None or "class_locations" not in case.properties:
        raise GeodiagError(f"case {case.name} has no preprocessed label to place training patches by")
    configuration = checkpoint.configuration_manager
    label_manager = checkpoint.label_manager
    patch_size = checkpoint.patch_size
    cut_size, transforms = _training_augmentation(configuration, label_manager) if augment else (patch_size, None)
    oversampling = foreground_oversampling(checkpoint)
    loader = nnUNetDataLoader(_OneCase(case), count, cut_size, patch_size, label_manager,
                              oversample_foreground_percent=oversampling, transforms=transforms)
    bboxes: list[list[list[int]]] = []
    forced: list[bool] = []
    draw_bbox = loader.get_bbox

    def recorded_bbox(data_shape, force_fg, class_locations, *args, **kwargs):
        lower, upper = draw_bbox(data_shape, force_fg, class_locations, *args, **kwargs)
        bboxes.append([[int(a), int(b)] for a, b in zip(lower, upper)])
        forced.append(bool(force_fg))
        return lower, upper

    loader.get_bbox = recorded_bbox
    draw_seed = (zlib.crc32(case.name.encode()) + seed) % 2**32
    state = np.random.get_state()
    np.random.seed(draw_seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(draw_seed)
            batch = loader.generate_train_batch()
    finally:
        np.random.set_state(state)
    label = batch["target"].float().clamp_min(0)
    return PatchBatch(batch["data"].float(), label, bboxes, forced, oversampling, augment)
