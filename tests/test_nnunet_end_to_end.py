"""The real tools: plan_and_preprocess, nnUNetv2_train with the quick geometric trainer, nnUNetv2_predict."""
from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_nnunet import env_from_geodiag
from geodiag.diagnostics.nnunet.environment import trainer_folders
from geodiag.diagnostics.nnunet.plans import nnunet_tool


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_nnunet_train_finds_the_trainer_through_geodiag_env(geometric_run):
    assert f"Using trainer 'nnUNetTrainerGeometricQuick' from: {trainer_folders()[0]}" in geometric_run.console


def test_geometric_term_is_logged_finite_after_warmup_and_absent_before(geometric_run):
    logging = _load(geometric_run.final_checkpoint)["logging"]
    switch_on = geometric_run.switch_on_epoch
    epochs = len(logging["train_losses"])
    assert epochs == 6 and switch_on == 2
    assert logging["geometric_active"] == [e >= switch_on for e in range(epochs)]
    for epoch in range(epochs):
        values = [logging[key][epoch] for key in ("train_geometric", "train_compactness", "train_aspect")]
        if epoch < switch_on:
            assert all(math.isnan(v) for v in values)
            assert logging["train_losses"][epoch] == pytest.approx(logging["train_dc_ce"][epoch], rel=1e-6)
        else:
            assert all(math.isfinite(v) for v in values) and values[0] > 0
            assert values[0] == pytest.approx(values[1] + values[2], rel=1e-6)
    assert logging["skipped_steps"] == [0] * epochs
    assert all(math.isfinite(v) for v in logging["val_losses"])
    settings = json.loads((geometric_run.output_folder / "geometric_settings.json").read_text())
    assert settings["warmup_epochs"] == 2 and settings["stabilizer"] == "shifted"
    for plot in ("progress.png", "progress_geometric.png"):
        assert (geometric_run.output_folder / plot).stat().st_size > 10_000
    log_text = "".join(p.read_text() for p in geometric_run.output_folder.glob("training_log_*.txt"))
    assert "geometric term on" in log_text and "final validation skipped" in log_text


def test_each_epoch_checkpoint_is_named_by_the_epoch_it_closes(geometric_run):
    assert sorted(geometric_run.checkpoints) == list(range(6))
    for epoch, path in geometric_run.checkpoints.items():
        checkpoint = _load(path)
        assert checkpoint["current_epoch"] == epoch + 1
        assert checkpoint["trainer_name"] == "nnUNetTrainerGeometricQuick"
        assert {len(v) for v in checkpoint["logging"].values()} == {epoch + 1}
    last_plain = _load(geometric_run.checkpoints[geometric_run.switch_on_epoch - 1])["network_weights"]
    first_geometric = _load(geometric_run.checkpoints[geometric_run.switch_on_epoch])["network_weights"]
    assert any(not torch.equal(last_plain[k], first_geometric[k]) for k in last_plain)


def test_nnunet_predict_runs_from_the_switch_on_checkpoint(geometric_run, tmp_path):
    raw = geometric_run.dataset.dirs.raw / geometric_run.dataset.name
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = sorted((raw / "imagesTr").glob("*_0000.png"))[:2]
    for case in cases:
        (inputs / case.name).symlink_to(case)
    checkpoint = geometric_run.checkpoints[geometric_run.switch_on_epoch].name
    command = [nnunet_tool("nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "502",
               "-c", geometric_run.dataset.configuration, "-tr", geometric_run.trainer, "-f", "0", "-chk",
               checkpoint, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    proc = subprocess.run(command, env=env_from_geodiag(dict(os.environ)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for case in cases:
        prediction = np.asarray(Image.open(tmp_path / "out" / case.name.replace("_0000", "")))
        assert prediction.shape == np.asarray(Image.open(case)).shape
        assert set(np.unique(prediction)) <= {0, 1}


def test_stock_run_leaves_a_final_checkpoint_of_nnunets_own_trainer(stock_run):
    checkpoint = _load(stock_run.final_checkpoint)
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["current_epoch"] == 1
    assert "train_geometric" not in checkpoint["logging"]
    assert all(torch.isfinite(w).all() for w in checkpoint["network_weights"].values())
