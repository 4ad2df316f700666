"""Live monitoring: a real monitored nnU-Net run writes per-iteration rows and per-epoch histograms as it goes;
the monitor records skips and scale from a live GradScaler, ignores validation, and writes strict JSON."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from geodiag.diagnostics.nnunet.monitor import (ITERATIONS_FILE, MONITOR_FOLDER, TrainingMonitor,
                                         nnUNetTrainerGeometricMonitoredQuick)
from geodiag.losses import GeometricLoss
from shapes import disk


def _read_iterations(folder) -> list[dict]:
    with open(folder / ITERATIONS_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _strict_json(path) -> dict:
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=reject)


# ---------------------------------------------------------------------- a real nnU-Net run
@pytest.fixture(scope="module")
def monitored_run(tiny_dataset_502):  # noqa: F811 - the imported session fixture
    """nnUNetTrainerGeometricMonitoredQuick in process for 3 epochs of 4 iterations: the term is on in epoch 2."""
    trainer = nnUNetTrainerGeometricMonitoredQuick(
        tiny_dataset_502.load_plans(), tiny_dataset_502.configuration, 0, tiny_dataset_502.load_dataset_json(),
        torch.device("cpu"))
    trainer.num_epochs = 3
    trainer.run_training()
    return trainer


def test_monitored_run_writes_one_row_per_iteration_with_each_term(monitored_run):
    folder = Path(monitored_run.output_folder) / MONITOR_FOLDER
    rows = _read_iterations(folder)
    per_epoch = monitored_run.num_iterations_per_epoch
    assert [int(r["iteration"]) for r in rows] == list(range(3 * per_epoch))
    assert [int(r["epoch"]) for r in rows] == [e for e in range(3) for _ in range(per_epoch)]
    for row in rows:
        terms = [float(row["geometric_compactness"]), float(row["geometric_aspect"])]
        if int(row["epoch"]) < monitored_run.warmup_epochs:
            assert all(math.isnan(t) for t in terms)
        else:  # the total is Dice+CE plus the weighted terms
            assert float(row["loss"]) == pytest.approx(float(row["dc_ce"]) + sum(terms), rel=1e-5)
        assert row["nonfinite_weight_tensors"] == "0"
    # nnU-Net's own epoch means agree with the monitor's per-iteration values
    logged = monitored_run.logger.local_logger.my_fantastic_logging["train_losses"]
    for epoch in range(3):
        values = [float(r["loss"]) for r in rows if int(r["epoch"]) == epoch]
        assert sum(values) / len(values) == pytest.approx(logged[epoch], rel=1e-5)


def test_monitored_run_writes_each_epochs_histograms(monitored_run):
    folder = Path(monitored_run.output_folder) / MONITOR_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == [
        "histograms_epoch_0000.json", "histograms_epoch_0001.json", "histograms_epoch_0002.json", ITERATIONS_FILE]
    warmup = _strict_json(folder / "histograms_epoch_0000.json")
    active = _strict_json(folder / "histograms_epoch_0002.json")
    assert {r["name"] for r in warmup["rows"]} == {"logits", "network.parameters"}
    table = {(r["name"], r["kind"]): r for r in active["rows"]}
    per_epoch = monitored_run.num_iterations_per_epoch
    batch, patch = monitored_run.batch_size, monitored_run.configuration_manager.patch_size
    pixels = per_epoch * batch * math.prod(patch)
    assert table[("logits", "grad")]["count"] == pixels * monitored_run.label_manager.num_segmentation_heads
    assert table[("compactness.grad_mag_squared", "grad")]["count"] == pixels
    assert table[("compactness.sqrt_input", "local_derivative")]["count"] == pixels
    # the lowest-resolution head has deep-supervision weight 0: it gets no gradient
    n_params = sum(p.numel() for p in monitored_run.network.parameters() if p.grad is not None)
    assert table[("network.parameters", "grad")]["count"] == per_epoch * n_params
    assert active["iterations"] == [2 * per_epoch, 3 * per_epoch]


def test_monitored_trainer_is_found_by_nnunets_trainer_lookup(nnunet_env):  # noqa: F811
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    found = recursive_find_trainer_class_by_name("nnUNetTrainerGeometricMonitoredQuick")
    assert found.__name__ == "nnUNetTrainerGeometricMonitoredQuick"
    assert found.__module__ == "geodiag.diagnostics.nnunet.monitor"


# ---------------------------------------------------------------------- the monitor on its own
def test_monitor_records_skips_and_scale_from_a_live_grad_scaler_and_ignores_eval_forwards(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True),
                        nn.LeakyReLU(0.01, inplace=True), nn.Conv2d(4, 2, 3, padding=1))
    loss_fn = GeometricLoss.from_preset("v2.3", reference="prior", softmax=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    monitor = TrainingMonitor(tmp_path / MONITOR_FOLDER, terms=("compactness",))
    monitor.attach(net, loss_fn)
    image = disk(8.0, n=32, centre=(15.5, 16.2)).float()
    bad_iteration = 2
    for epoch in range(2):
        for i in range(3):
            iteration = 3 * epoch + i
            net.train()
            optimizer.zero_grad()
            loss = loss_fn(net(image))
            if iteration == bad_iteration:
                loss = loss * math.inf
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            monitor.on_step_end({"loss": loss.detach(), "geometric": {}, "grad_norm": norm, "grad_scaler": scaler},
                                net, optimizer)
        net.eval()
        with torch.no_grad():
            net(image)  # a validation forward: not recorded
        monitor.end_epoch(epoch)
    monitor.detach()

    folder = tmp_path / MONITOR_FOLDER
    rows = _read_iterations(folder)
    assert [r["skipped"] for r in rows] == ["True" if i == bad_iteration else "False" for i in range(6)]
    assert [float(r["scale"]) for r in rows] == [2.0 ** 16] * bad_iteration + [2.0 ** 15] * (6 - bad_iteration)
    assert math.isinf(float(rows[bad_iteration]["loss"]))
    epoch0 = _strict_json(folder / "histograms_epoch_0000.json")
    logits = {r["kind"]: r for r in epoch0["rows"] if r["name"] == "logits"}
    assert logits["value"]["count"] == 3 * 2 * 32 * 32  # three training forwards, no eval forward
    assert epoch0["training_state"]["skipped_steps"] == 1
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary file
    assert not loss_fn.has_taps
