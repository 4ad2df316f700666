"""Cases larger than the patch: network gradients from nnU-Net's training patches, whole-image prediction as
nnU-Net's predictor computes it, in 2D (64^2 images, 32^2 patches) and 3D (40-56 voxels per axis, patch 48^3)."""
import itertools
import json
import logging

import numpy as np
import pytest
import torch

from fixtures_nnunet import BALL_SHAPES, PATCH_3D, crop_with_padding
from geodiag.diagnostics.tools.analyze import analyze_checkpoint
from geodiag.diagnostics.nnunet.cases import find_cases, predict_logits, preprocess
from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.patches import training_patches
from geodiag.reports import schema, tables

log = logging.getLogger(__name__)


def _patch_size(checkpoint) -> list[int]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return list(PlansManager(checkpoint.plans).get_configuration(checkpoint.configuration).patch_size)


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_patches_are_cut_from_the_preprocessed_case_and_the_oversampled_ones_hold_foreground(
        which, patch32_checkpoint, checkpoint_3d):
    ck = load_checkpoint(patch32_checkpoint if which == "2d" else checkpoint_3d)
    patch = _patch_size(ck)
    case = preprocess(ck, find_cases(ck)[0])
    batch = training_patches(ck, case, 3)
    assert batch.forced_foreground == [False, False, True]  # nnU-Net: the last round(3 * 0.33) of a batch
    for i, bbox in enumerate(batch.bboxes):
        spatial = bbox if which == "3d" else bbox[1:]  # a 2D patch is a [1, H, W] box in the [Z, Y, X] case
        assert [hi - lo for lo, hi in spatial] == patch
        image = crop_with_padding(case.data, bbox, 0.0)
        label = np.maximum(crop_with_padding(case.seg, bbox, -1.0), 0)
        if which == "2d":
            image, label = image[:, 0], label[:, 0]
        np.testing.assert_array_equal(batch.image[i].numpy(), image.astype(np.float32))
        np.testing.assert_array_equal(batch.label[i].numpy(), label.astype(np.float32))
        if batch.forced_foreground[i]:
            assert label.sum() > 0
    again = training_patches(ck, case, 3)
    assert again.bboxes == batch.bboxes  # the draw is reproducible (resume computes the same patches)


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_network_gradients_are_recorded_on_cases_larger_than_the_patch(which, patch32_checkpoint, checkpoint_3d,
                                                                        tmp_path):
    path = patch32_checkpoint if which == "2d" else checkpoint_3d
    ck = load_checkpoint(path)
    patch = _patch_size(ck)
    summary = analyze_checkpoint(str(path), tmp_path, max_cases=2, patches=2)
    cases = [json.loads(p.read_text()) for p in sorted((tmp_path / "cases" / "fp32").glob("*.json"))]
    assert len(cases) == 2
    for case in cases:
        shape = case["whole_image"]["shape"]
        assert any(s > p for s, p in zip(shape, patch)), (shape, patch)  # larger than the patch somewhere
        if which == "3d":
            assert any(s < p for s, p in zip(shape, patch)), (shape, patch)  # and shorter somewhere else
    # every parameter the network's output depends on gets a gradient, once per case (counted here on a random
    # input: deep supervision is off, so the coarser stages' segmentation heads get none)
    network = build_network(ck)
    network(torch.randn(1, 1, *patch)).sum().backward()
    used = sum(p.numel() for p in network.parameters() if p.grad is not None)
    gradients = summary["network_gradients"]
    log.info("%s: %s parameter-gradient values over %d cases (network: %d parameters)", which, gradients, 2, used)
    assert gradients["values"] == 2 * used and gradients["nonfinite"] == 0 and gradients["tensors"] > 0
    tensors = tables.read_table(tmp_path / "tensors.csv", schema.TENSORS_COLUMNS)
    params = tensors[(tensors.tensor == "network.parameters") & (tensors.kind == "grad")]
    assert params["count"].tolist() == [gradients["values"]]  # the histogram saw the same values
    assert summary["statistics_from"]["network_gradients"] == "patches"
    assert summary["statistics_from"]["terms.csv"] == "whole_image"
    assert "x".join(map(str, patch)) in summary["inputs"]["patches"]


def _sliding_window_in_numpy(network, image: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's whole-image prediction written here in fp64: pad short axes to the patch (half below, the rest
    above), tiles at round(k (size - patch) / (n - 1)) with n the fewest steps no longer than half a patch, each
    tile weighted by a Gaussian of sigma patch / 8 centred on voxel patch // 2, weighted mean, crop."""
    shape = image.shape[1:]
    below = [max(p - s, 0) // 2 for s, p in zip(shape, patch)]
    above = [max(p - s, 0) - b for s, p, b in zip(shape, patch, below)]
    padded = np.pad(image.astype(np.float64), [(0, 0)] + list(zip(below, above)))
    size = padded.shape[1:]
    starts = []
    for n_voxels, p in zip(size, patch):
        n = int(np.ceil((n_voxels - p) / (p / 2))) + 1
        starts.append([int(np.round((n_voxels - p) / (n - 1) * k)) for k in range(n)] if n > 1 else [0])
    weight = np.ones(patch)
    for axis, p in enumerate(patch):
        profile = np.exp(-((np.arange(p) - p // 2) ** 2) / (2 * (p / 8) ** 2))
        weight = weight * profile.reshape([-1 if a == axis else 1 for a in range(len(patch))])
    total, norm = None, np.zeros(size)
    for corner in itertools.product(*starts):
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        with torch.no_grad():
            tile = network(torch.from_numpy(padded[(slice(None),) + window][None]).float())[0].double().numpy()
        total = np.zeros((tile.shape[0], *size)) if total is None else total
        total[(slice(None),) + window] += tile * weight
        norm[window] += weight
    crop = tuple(slice(b, b + s) for b, s in zip(below, shape))
    return (total / norm)[(slice(None),) + crop]


@pytest.mark.parametrize("which", ["2d", "3d"])
def test_whole_image_prediction_is_nnunets_sliding_window_on_cases_larger_and_shorter_than_the_patch(
        which, patch32_checkpoint, checkpoint_3d):
    """(nnU-Net's own predictor accumulates in fp16, whose Gaussian weights underflow at the tile borders, so it
    is no reference at 1e-4.) Every 3D case is shorter than the patch along one axis and longer along another."""
    ck = load_checkpoint(patch32_checkpoint if which == "2d" else checkpoint_3d)
    network = build_network(ck)
    patch = tuple(_patch_size(ck))
    case = preprocess(ck, find_cases(ck)[0])
    if which == "3d":
        assert tuple(case.image.shape[1:]) == BALL_SHAPES[0] and BALL_SHAPES[0][0] < PATCH_3D[0] < BALL_SHAPES[0][1]
    reference = _sliding_window_in_numpy(network, case.image.numpy(), patch)
    ours = predict_logits(network, case.image, patch)
    assert ours.shape == (1, *reference.shape)
    np.testing.assert_allclose(ours[0].double().numpy(), reference, rtol=1e-4, atol=1e-4)


def test_clamp_sweep_runs_on_a_3d_checkpoint_against_a_reference_of_its_own_aspect_formula(checkpoint_3d, tmp_path,
                                                                                            capsys):
    """The anisotropy descriptor has no sqrt, so eps cannot bias it: its bias against the reference is ~0."""
    out = tmp_path / "sweep"
    code = main(["clamp-sweep", str(checkpoint_3d), "--out", str(out), "--cases", "ball_000,ball_001",
                 "--stabilizers", "clamp,additive", "--eps", "1e-6,1e-2", "--precision", "fp32",
                 "--aspect-formula", "anisotropy", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    frame = tables.read_table(out / "sweep.csv", schema.SWEEP_COLUMNS)
    assert len(frame) == 2 * 2 * 2
    # eps does not act on it: one bias per case for every setting, fp32 rounding against fp64 (a reference built with
    # the other formula is off by the gap between the descriptors, ~100% here)
    spread = frame.groupby("case").bias_aspect.agg(lambda bias: bias.max() - bias.min())
    assert (spread < 1e-9).all(), frame.bias_aspect.tolist()
    assert frame.bias_aspect.abs().max() < 1e-3, frame.bias_aspect.tolist()


def test_clamp_sweep_with_the_seeds_2d_aspect_formula_on_a_3d_checkpoint_is_a_one_line_error(checkpoint_3d,
                                                                                              tmp_path, capsys):
    code = main(["clamp-sweep", str(checkpoint_3d), "--out", str(tmp_path / "sweep"), "--precision", "fp32",
                 "--aspect-formula", "seed", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--aspect-formula anisotropy" in err[0], err


def test_augmented_patches_go_through_nnunets_training_transforms(patch32_checkpoint, tmp_path):
    """With --augment the patches are cut at nnUNetTrainer's enlarged size and transformed down to the patch: no
    longer plain crops of the case, still patch-sized, labels still 0/1; the summary says so."""
    ck = load_checkpoint(patch32_checkpoint)
    patch = _patch_size(ck)
    case = preprocess(ck, find_cases(ck)[0])
    batch = training_patches(ck, case, 2, augment=True)
    assert list(batch.image.shape[2:]) == patch and list(batch.label.shape[2:]) == patch
    assert set(batch.label.unique().tolist()) <= {0.0, 1.0}
    cut = [hi - lo for lo, hi in batch.bboxes[0][1:]]
    assert all(c > p for c, p in zip(cut, patch)), cut  # enlarged for rotation and scaling
    plain = crop_with_padding(case.data, batch.bboxes[0], 0.0)[:, 0]
    assert batch.image[0].shape != plain.shape or not np.allclose(batch.image[0].numpy(), plain)
    again = training_patches(ck, case, 2, augment=True)
    torch.testing.assert_close(again.image, batch.image)  # seeded: a resumed run sees the same patches
    summary = analyze_checkpoint(str(patch32_checkpoint), tmp_path, max_cases=1, patches=2, augment=True)
    assert "nnUNetTrainer augmentation" in summary["inputs"]["patches"] and summary["settings"]["augment"] is True
    assert summary["network_gradients"]["values"] > 0
