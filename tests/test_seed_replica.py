"""The seed replica (diagnostics/study/seed_replica/) trained by real nnU-Net, found as a user's trainer through
nnUNet_extTrainer; its terms checked against the three terms written here again in numpy, fp64."""
import math
import os
import sys

import numpy as np
import pytest
import torch

from geodiag.diagnostics.study.replica import FILE as SEED_REPLICA

SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def correlate_zero_padded(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """out[i, j] = sum_ab kernel[a, b] * image[i + a - 1, j + b - 1], zero outside the image."""
    padded = np.pad(image, 1)
    h, w = image.shape
    return sum(kernel[a, b] * padded[a:a + h, b:b + w] for a in range(3) for b in range(3))


def numpy_terms(probs: np.ndarray, eps: float) -> dict:
    """The three terms on class 1 of [B, C, H, W] probabilities, as the seed's document and issue describe them."""
    images = [p for p in probs[:, 1] if p.sum() >= 50]
    compactness, aspect = [], []
    for p in images:
        gx, gy = correlate_zero_padded(p, SOBEL_X), correlate_zero_padded(p, SOBEL_X.T)
        perimeter = np.clip(np.sqrt(np.maximum(gx ** 2 + gy ** 2, eps)).sum(), 10, 1e6)
        area = np.clip(p.sum(), 50, 1e6)
        compactness.append(1 - np.clip(4 * np.pi * area / (perimeter ** 2 + 1e-2), 0, 1))
        ys, xs = np.indices(p.shape, dtype=np.float64)
        mass = max(p.sum(), 1.0)
        cx, cy = (p * xs).sum() / mass, (p * ys).sum() / mass
        mu20 = max((p * (xs - cx) ** 2).sum() / mass, 1e-3)
        mu02 = max((p * (ys - cy) ** 2).sum() / mass, 1e-3)
        mu11 = (p * (xs - cx) * (ys - cy)).sum() / mass
        trace, det = mu20 + mu02, mu20 * mu02 - mu11 ** 2
        root = np.sqrt(np.clip(trace ** 2 - 4 * det, eps, 1e12))
        l1 = np.clip((trace + root) / 2 + 1e-2, 0.1, 1e6)
        l2 = np.clip((trace - root) / 2 + 1e-2, 0.1, 1e6)
        r = np.clip(l1 / l2, 0.1, 10)
        aspect.append(abs(r - 1) / (r + 1))
    laplacians = np.stack([np.clip(correlate_zero_padded(p, LAPLACIAN), -10, 10) * (p > 0.1) for p in images])
    boundary = laplacians.var(ddof=1) + 0.1 * np.abs(laplacians).mean()
    terms = {"compactness": float(np.mean(compactness)), "aspect": float(np.mean(aspect)), "boundary": float(boundary)}
    terms["geometric"] = 0.1 * terms["compactness"] + 0.15 * terms["aspect"] + 0.05 * terms["boundary"]
    return terms


@pytest.fixture(scope="module")
def replica_run(tiny_dataset_502, monkeypatch_module):
    """nnU-Net resolves nnUNetTrainerSeedReplicaV23 from the replica's folder (nnUNet_extTrainer) and trains it
    3 epochs of 2 iterations, the geometric term on from epoch 1; every train_step's input batch and returned
    values are kept (a spy on the instance, the class untouched)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    folders = os.environ.get("nnUNet_extTrainer", "")
    monkeypatch_module.setenv("nnUNet_extTrainer", os.pathsep.join([str(SEED_REPLICA.parent), folders]))
    for key, value in {"SEED_EPOCHS": "3", "SEED_ITERATIONS": "2", "SEED_WARMUP": "1"}.items():
        monkeypatch_module.setenv(key, value)
    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(tiny_dataset_502.dataset_id), tiny_dataset_502.configuration, 0,
                                    "nnUNetTrainerSeedReplicaV23", device=torch.device("cpu"))
    trainer.num_val_iterations_per_epoch = 1
    steps, inputs = [], []
    train_step = trainer.train_step

    def spy(batch):
        result = train_step(batch)
        steps.append((trainer.current_epoch, result))
        return result

    trainer.train_step = spy
    trainer.initialize()
    forward = trainer.geometric_loss.forward
    trainer.geometric_loss.forward = lambda probs, target=None: (inputs.append(probs.detach().clone()),
                                                                 forward(probs, target))[1]
    trainer.run_training()
    return trainer, steps, inputs


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_replica_is_a_users_trainer_found_by_nnunet(replica_run):
    trainer, steps, _ = replica_run
    assert type(trainer).__name__ == "nnUNetTrainerSeedReplicaV23"
    assert trainer.geometric_loss.eps == 1e-4 and trainer.num_epochs == 3 and trainer.warmup_epochs == 1
    # nnU-Net drops the modules it imported from an outside folder, and geodiag's package imported nothing from it;
    # only a --loss SPEC typed by a user (another test, in this process) loads it, under the loader's own names
    assert not [name for name in sys.modules if "SeedReplica" in name and not name.startswith("geodiag_user_loss_")]


def test_geometric_term_switches_on_after_the_warmup(replica_run):
    _, steps, inputs = replica_run
    assert [epoch for epoch, _ in steps] == [0, 0, 1, 1, 2, 2]
    for epoch, result in steps:
        assert math.isfinite(float(result["loss"]))
        if epoch < 1:
            assert "geometric" not in result and float(result["loss"]) == float(result["dc_ce"])
        else:
            assert float(result["geometric"]) > 0
            assert float(result["loss"]) == pytest.approx(float(result["dc_ce"]) + float(result["geometric"]),
                                                          rel=1e-5)
    # the loss sees the softmax of at most the first 4 samples of the full-resolution output
    assert len(inputs) == 4
    for probs in inputs:
        assert probs.shape[0] <= 4 and probs.shape[1] == 2
        torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))


def test_terms_match_numpy_fp64_on_a_training_prediction(replica_run):
    trainer, steps, inputs = replica_run
    probs = inputs[0]
    reference = numpy_terms(probs.double().numpy(), eps=1e-4)
    loss = type(trainer.geometric_loss)(eps=1e-4).double()
    total = loss(probs.double())
    for name in ("compactness", "aspect", "boundary"):
        assert loss.last_terms[name] == pytest.approx(reference[name], rel=1e-9, abs=1e-12), name
    assert float(total) == pytest.approx(reference["geometric"], rel=1e-9)
    # what the training step itself logged, in fp32, on the same prediction
    logged = next(result for epoch, result in steps if epoch == 1)
    assert logged["compactness"] == pytest.approx(reference["compactness"], rel=1e-4)
    assert logged["boundary"] == pytest.approx(reference["boundary"], rel=1e-3)
    assert logged["aspect"] == pytest.approx(reference["aspect"], abs=1e-3)


def test_terms_match_numpy_where_the_clamps_and_the_area_cut_bind():
    """A sharp disk (flat regions below both eps), a faint image dropped by area < 50, an elongated blob."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seed_replica_under_test", SEED_REPLICA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ys, xs = np.indices((48, 48), dtype=np.float64)
    disk = 1 / (1 + np.exp(-(10 - np.hypot(xs - 20, ys - 25)) / 0.7))
    faint = np.full((48, 48), 0.01)
    ellipse = 1 / (1 + np.exp(-(1 - np.hypot((xs - 24) / 16, (ys - 24) / 5)) / 0.1))
    fg = np.stack([disk, faint, ellipse])
    probs = np.stack([1 - fg, fg], axis=1)
    for eps, factory in ((1e-4, module.loss_v23), (1e-2, module.loss_v24)):
        loss = factory().double()
        total = loss(torch.from_numpy(probs))
        reference = numpy_terms(probs, eps)
        for name in ("compactness", "aspect", "boundary"):
            assert loss.last_terms[name] == pytest.approx(reference[name], rel=1e-9, abs=1e-12), (eps, name)
        assert float(total) == pytest.approx(reference["geometric"], rel=1e-9)


def test_sites_are_named_at_the_replicas_lines_though_it_ships_inside_geodiag():
    """The replica lives under geodiag's diagnostics folder as data (no __init__.py); automatic taps must treat it
    as the user's file: its two sqrt clamps at the lines that hold them, at-bound shares counted on the input."""
    from geodiag.diagnostics.nonfinite.autotaps import AutoTaps
    from geodiag.diagnostics.nonfinite.loss_spec import load_loss
    from geodiag.diagnostics.study.replica import sqrt_clamp_sites

    loss = load_loss(f"{SEED_REPLICA}:loss_v24")
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 48, 48, dtype=torch.float64, requires_grad=True)
    taps = AutoTaps()
    taps.run(loss, logits, None).backward()
    result = taps.result()
    clamps = {row["site"].rsplit(":", 1)[1]: row for row in result.sites
              if row["op"] == "clamp" and row["site"].rsplit(":", 1)[0].endswith(SEED_REPLICA.name)}
    for term, site in sqrt_clamp_sites().items():
        line = site.rsplit(":", 1)[1]
        assert line in clamps, (term, site, sorted(clamps))
    # the compactness clamp's at-bound share is the share of s = gx^2 + gy^2 below 1e-2, counted here in numpy
    probs = torch.softmax(logits, 1).detach().numpy()
    s_values = np.concatenate([(correlate_zero_padded(p, SOBEL_X) ** 2 + correlate_zero_padded(p, SOBEL_X.T) ** 2)
                               .ravel() for p in probs[:, 1]])
    row = clamps[sqrt_clamp_sites()["compactness"].rsplit(":", 1)[1]]
    assert row["at_bound_fraction"] == pytest.approx((s_values < 1e-2).mean(), abs=1e-12)
