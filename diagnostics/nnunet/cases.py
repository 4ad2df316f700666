"""Real cases for a checkpoint: find image/label files, preprocess them as nnU-Net does, predict whole images.

nnU-Net's predictor forces fp16 autocast on CUDA, so the whole-image prediction is rebuilt here from its own parts
(padding, sliding-window steps, Gaussian blending) to run in the precision being measured.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint
from ..instruments.errors import ArgumentError, GeodiagError


@dataclass
class CaseFiles:
    name: str
    images: list[str]
    label: Optional[str]


@dataclass
class Case:
    """A preprocessed case: image [C, *S] (normalised as in training) and label map [1, *S] in the same space,
    plus nnU-Net's own arrays ([C, Z, Y, X] data and seg, properties with the foreground locations) from which
    its data loader draws training patches (absent for synthetic cases, which are never cut into patches)."""

    name: str
    image: torch.Tensor
    label: Optional[torch.Tensor]
    data: Optional[np.ndarray] = None
    seg: Optional[np.ndarray] = None
    properties: dict = field(default_factory=dict)


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
        raise ArgumentError(f"{{cases}} {cases} is a file; give a folder or comma-separated case names", "cases")
    else:
        wanted = [c.strip() for c in cases.split(",") if c.strip()] if cases else None
        root = raw_root or os.environ.get("nnUNet_raw")
        dataset = checkpoint.plans.get("dataset_name")
        if not root or not dataset:
            raise ArgumentError("cannot find the dataset's images: set nnUNet_raw or pass {cases} FOLDER", "cases")
        folder = Path(root) / dataset
        if not folder.is_dir():
            raise ArgumentError(f"dataset folder not found: {folder} (set nnUNet_raw or pass {{cases}} FOLDER)",
                                "cases")
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
    plans_manager = checkpoint.plans_manager
    config = checkpoint.configuration_manager
    _check_raw_case(checkpoint, files)
    preprocessor = config.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case(files.images, files.label, plans_manager, config,
                                                  checkpoint.dataset_json)
    if not np.isfinite(data).all():
        raise GeodiagError(f"case {files.name}: preprocessing produced NaN or Inf values")
    seg = seg if files.label is not None else None
    image, label = data, seg
    if len(config.patch_size) == 2 and data.ndim == 4:
        image, label = _slice_for_2d(data, seg)
    image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    label = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32)) if label is not None else None
    if label is not None:
        label = label.clamp_min(0)  # nnU-Net marks outside-the-crop as -1
    return Case(files.name, image, label, data, seg, properties)


def _slice_for_2d(data: np.ndarray, seg: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """A 2D configuration sees [C, Z, H, W] slice by slice: take the slice with most foreground (middle one
    without a label; the only one for 2D images, which nnU-Net reads with Z = 1)."""
    if seg is not None:
        z = int(np.argmax((seg > 0).reshape(seg.shape[0], seg.shape[1], -1).sum(axis=(0, 2))))
    else:
        z = data.shape[1] // 2
    return data[:, z], (seg[:, z] if seg is not None else None)


def _check_raw_case(checkpoint: Checkpoint, files: CaseFiles) -> None:
    """What nnU-Net's preprocessing would silently spread or crash on, checked on the files as read: unreadable
    files, a channel count the network was not trained for, NaN/Inf intensities, a label of another size."""
    reader = checkpoint.plans_manager.image_reader_writer_class()
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


def predict_logits(network: nn.Module, image: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Logits [1, C, *S] of one whole preprocessed image as nnU-Net's predictor computes them, without gradients.

    As nnU-Net's sliding window: axes shorter than the patch are padded up to it (zeros, split evenly on both
    sides), tiles overlap by half a patch and are blended with nnU-Net's Gaussian weights, the padding is cropped
    off again. No test-time mirroring. The network gets no gradient from this pass: what training back-propagates
    is measured on training patches (``patches.training_patches``).
    """
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    spatial, patch = tuple(image.shape[1:]), tuple(int(p) for p in patch_size)
    if len(spatial) != len(patch):
        raise GeodiagError(f"image has {len(spatial)} spatial dimensions, the network expects {len(patch)}")
    device = next(network.parameters()).device
    padded, revert = pad_nd_image(image.to(device), patch, "constant", {"value": 0}, True, None)
    size = tuple(padded.shape[1:])
    x = padded[None]
    with torch.no_grad():
        gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                                    device=device)
        out, weight = None, torch.zeros((1, 1, *size), device=device)
        for start in itertools.product(*compute_steps_for_sliding_window(size, patch, 0.5)):
            window = (slice(None), slice(None)) + tuple(slice(b, b + p) for b, p in zip(start, patch))
            tile = network(x[window]).float()
            out = torch.zeros((1, tile.shape[1], *size), device=device) if out is None else out
            out[window] += tile * gaussian
            weight[window] += gaussian
    return (out / weight)[(slice(None), slice(None)) + tuple(revert[1:])]
