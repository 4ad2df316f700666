"""Real cases for a checkpoint: find image/label files, preprocess them as nnU-Net does, predict with gradients.

nnU-Net's own prediction runs under torch.inference_mode, so gradient measurements need this separate forward.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint
from .errors import GeodiagError


@dataclass
class CaseFiles:
    name: str
    images: list[str]
    label: Optional[str]


@dataclass
class Case:
    """A preprocessed case: image [C, *S] (normalised as in training) and label map [1, *S] in the same space."""

    name: str
    image: torch.Tensor
    label: Optional[torch.Tensor]


def _file_ending(checkpoint: Checkpoint) -> str:
    return checkpoint.dataset_json.get("file_ending", ".nii.gz")


def _n_channels(checkpoint: Checkpoint) -> int:
    channels = checkpoint.dataset_json.get("channel_names") or checkpoint.dataset_json.get("modality") or {"0": ""}
    return len(channels)


def _cases_in(images_dir: Path, labels_dir: Optional[Path], ending: str, n_channels: int) -> list[CaseFiles]:
    suffix = f"_0000{ending}"
    names = sorted(p.name[: -len(suffix)] for p in images_dir.glob(f"*{suffix}"))
    cases = []
    for name in names:
        images = [str(images_dir / f"{name}_{c:04d}{ending}") for c in range(n_channels)]
        missing = [f for f in images if not os.path.exists(f)]
        if missing:
            raise GeodiagError(f"case {name}: channel file missing: {missing[0]}")
        label = labels_dir / f"{name}{ending}" if labels_dir is not None else None
        cases.append(CaseFiles(name, images, str(label) if label is not None and label.exists() else None))
    return cases


def find_cases(checkpoint: Checkpoint, cases: Optional[str] = None, raw_root: Optional[str] = None) -> list[CaseFiles]:
    """The cases to analyse.

    ``cases`` is None (the dataset's own imagesTr/labelsTr under nnUNet_raw), a folder (with imagesTr/labelsTr or
    imagesTs/labelsTs inside, or images named CASE_0000<ending> with labels CASE<ending> beside them or in a sibling
    labels folder), or comma-separated case names of the dataset.
    """
    ending, n_channels = _file_ending(checkpoint), _n_channels(checkpoint)
    wanted = None
    folder: Optional[Path] = None
    if cases and Path(cases).is_dir():
        folder = Path(cases)
    elif cases and Path(cases).exists():
        raise GeodiagError(f"--cases {cases} is a file; give a folder or comma-separated case names")
    else:
        wanted = [c.strip() for c in cases.split(",") if c.strip()] if cases else None
        root = raw_root or os.environ.get("nnUNet_raw")
        dataset = checkpoint.plans.get("dataset_name")
        if not root or not dataset:
            raise GeodiagError("cannot find the dataset's images: set nnUNet_raw or pass --cases FOLDER")
        folder = Path(root) / dataset
        if not folder.is_dir():
            raise GeodiagError(f"dataset folder not found: {folder} (set nnUNet_raw or pass --cases FOLDER)")
    found: list[CaseFiles] = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (folder / images).is_dir():
            found = _cases_in(folder / images, folder / labels if (folder / labels).is_dir() else None,
                              ending, n_channels)
            break
    else:
        sibling = next((p for p in folder.parent.glob("labels*") if p.is_dir()), None)
        labels_dir = folder if any(folder.glob(f"*{ending}")) and sibling is None else sibling
        found = _cases_in(folder, labels_dir, ending, n_channels)
    if wanted is not None:
        by_name = {c.name: c for c in found}
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            raise GeodiagError(f"unknown case(s) {', '.join(unknown)} in {folder}")
        found = [by_name[w] for w in wanted]
    if not found:
        raise GeodiagError(f"no cases (*_0000{ending}) found in {folder}")
    return found


def preprocess(checkpoint: Checkpoint, files: CaseFiles) -> Case:
    """Run nnU-Net's own preprocessing of the checkpoint's configuration on one case."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(checkpoint.plans)
    config = plans_manager.get_configuration(checkpoint.configuration)
    _check_raw_case(plans_manager, checkpoint, files)
    preprocessor = config.preprocessor_class(verbose=False)
    data, seg, _ = preprocessor.run_case(files.images, files.label, plans_manager, config, checkpoint.dataset_json)
    if not np.isfinite(data).all():
        raise GeodiagError(f"case {files.name}: preprocessing produced NaN or Inf values")
    if len(config.patch_size) == 2 and data.ndim == 4:
        data, seg = _slice_for_2d(data, seg)
    image = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    label = torch.from_numpy(np.ascontiguousarray(seg, dtype=np.float32)) if files.label is not None else None
    if label is not None:
        label = label.clamp_min(0)  # nnU-Net marks outside-the-crop as -1
    return Case(files.name, image, label)


def _slice_for_2d(data: np.ndarray, seg: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A 2D configuration sees [C, Z, H, W] slice by slice: take the slice with most foreground (middle one
    without a label; the only one for 2D images, which nnU-Net reads with Z = 1)."""
    if seg is not None:
        z = int(np.argmax((seg > 0).reshape(seg.shape[0], seg.shape[1], -1).sum(axis=(0, 2))))
    else:
        z = data.shape[1] // 2
    return data[:, z], (seg[:, z] if seg is not None else None)


def _check_raw_case(plans_manager, checkpoint: Checkpoint, files: CaseFiles) -> None:
    """What nnU-Net's preprocessing would silently spread or crash on, checked on the files as read: unreadable
    files, a channel count the network was not trained for, NaN/Inf intensities, a label of another size."""
    reader = plans_manager.image_reader_writer_class()
    try:
        image, _ = reader.read_images(files.images)
        label = reader.read_seg(files.label)[0] if files.label is not None else None
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem with the user's file
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GeodiagError(f"case {files.name}: {type(reader).__name__} cannot read its files ({detail})") from None
    expected = _n_channels(checkpoint)
    if image.shape[0] != expected:
        raise GeodiagError(f"case {files.name}: {image.shape[0]} image channels, the checkpoint was trained on "
                           f"{expected} (an RGB image, or a 4D volume read as channels?)")
    if np.issubdtype(image.dtype, np.floating):
        nan, inf = int(np.isnan(image).sum()), int(np.isinf(image).sum())
        if nan or inf:
            raise GeodiagError(f"case {files.name}: the image contains {nan} NaN and {inf} Inf values "
                               f"({files.images[0]})")
    if label is not None and image.shape[1:] != label.shape[1:]:
        raise GeodiagError(f"case {files.name}: image size {tuple(image.shape[1:])} and label size "
                           f"{tuple(label.shape[1:])} differ")


def predict_logits(network: nn.Module, image: torch.Tensor, patch_size: list[int]) -> torch.Tensor:
    """Logits [1, C, *S] of one preprocessed image, with autograd enabled.

    Images no larger than the patch size are padded to it (as nnU-Net's sliding window does) and run in one
    forward; larger images run nnU-Net's sliding window without gradients and return the logits as a leaf.
    """
    spatial = tuple(image.shape[1:])
    device = next(network.parameters()).device
    x = image.to(device)[None]
    if len(spatial) != len(patch_size):
        raise GeodiagError(f"image has {len(spatial)} spatial dimensions, the network expects {len(patch_size)}")
    if all(s <= p for s, p in zip(spatial, patch_size)):
        pad = []
        for s, p in reversed(list(zip(spatial, patch_size))):
            pad += [0, p - s]
        logits = network(F.pad(x, pad))
        return logits[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    steps = compute_steps_for_sliding_window(spatial, patch_size, 0.5)
    out, weight = None, torch.zeros((1, 1, *spatial), device=device)
    with torch.no_grad():
        for start in itertools.product(*steps):
            window = (slice(None), slice(None)) + tuple(slice(b, b + p) for b, p in zip(start, patch_size))
            tile = network(x[window])
            out = torch.zeros((1, tile.shape[1], *spatial), device=device) if out is None else out
            out[window] += tile
            weight[window] += 1
    return (out / weight).requires_grad_(True)

