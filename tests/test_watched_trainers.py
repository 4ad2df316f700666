"""The monitored trainers are geodiag's trainer under watch: a real run writes watch's per-iteration rows and
per-epoch histograms as it goes, ignores validation forwards, writes strict JSON atomically, and is found by
nnU-Net's trainer lookup."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from geodiag.diagnostics.nnunet.watch import WATCH_FOLDER
from geodiag.diagnostics.nnunet.watched_trainers import nnUNetTrainerGeometricMonitoredQuick


def _read_iterations(folder) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("iterations_epoch_*.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


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
    folder = Path(monitored_run.output_folder) / WATCH_FOLDER
    rows = _read_iterations(folder)
    per_epoch = monitored_run.num_iterations_per_epoch
    assert [int(r["iteration"]) for r in rows] == list(range(3 * per_epoch))
    assert [int(r["epoch"]) for r in rows] == [e for e in range(3) for _ in range(per_epoch)]
    for row in rows:
        terms = [float(row["train_compactness"]), float(row["train_aspect"])]
        if int(row["epoch"]) < monitored_run.warmup_epochs:
            assert all(math.isnan(t) for t in terms)
        else:  # the total is Dice+CE plus the weighted terms
            assert float(row["loss"]) == pytest.approx(float(row["train_dc_ce"]) + sum(terms), rel=1e-5)
        assert row["nonfinite_weight_tensors"] == "0"  # every iteration is scanned (monitor_every 1)
        assert row["skipped"] == row["skipped_by_trainer"] == "0" and row["event"] == ""
    # nnU-Net's own epoch means agree with the monitor's per-iteration values
    logged = monitored_run.logger.local_logger.my_fantastic_logging["train_losses"]
    for epoch in range(3):
        values = [float(r["loss"]) for r in rows if int(r["epoch"]) == epoch]
        assert sum(values) / len(values) == pytest.approx(logged[epoch], rel=1e-5)


def test_monitored_run_writes_each_epochs_histograms(monitored_run):
    folder = Path(monitored_run.output_folder) / WATCH_FOLDER
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{kind}_epoch_{epoch:04d}.{ending}" for kind, ending in (("histograms", "json"), ("iterations", "csv"))
        for epoch in range(3)]
    warmup = _strict_json(folder / "histograms_epoch_0000.json")
    active = _strict_json(folder / "histograms_epoch_0002.json")
    assert {r["name"] for r in warmup["rows"]} == {"logits", "network.parameters"}
    table = {(r["name"], r["kind"]): r for r in active["rows"]}
    per_epoch = monitored_run.num_iterations_per_epoch
    batch, patch = monitored_run.batch_size, monitored_run.configuration_manager.patch_size
    pixels = per_epoch * batch * math.prod(patch)
    logits = pixels * monitored_run.label_manager.num_segmentation_heads
    assert table[("logits", "grad")]["count"] == logits
    assert table[("logits", "value")]["count"] == logits  # the epoch's validation forwards are not in it
    assert table[("compactness.grad_mag_squared", "grad")]["count"] == pixels
    assert table[("compactness.sqrt_input", "local_derivative")]["count"] == pixels
    # the lowest-resolution head has deep-supervision weight 0: it gets no gradient
    n_params = sum(p.numel() for p in monitored_run.network.parameters() if p.grad is not None)
    assert table[("network.parameters", "grad")]["count"] == per_epoch * n_params
    assert active["iterations"] == [2 * per_epoch, 3 * per_epoch]
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_monitored_trainer_is_found_by_nnunets_trainer_lookup(nnunet_env):  # noqa: F811
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    found = recursive_find_trainer_class_by_name("nnUNetTrainerGeometricMonitoredQuick")
    assert found.__name__ == "nnUNetTrainerGeometricMonitoredQuick"
    assert found.__module__ == "geodiag.diagnostics.nnunet.watched_trainers"
