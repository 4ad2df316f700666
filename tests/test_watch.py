"""`geodiag watch -- nnUNetv2_train ...` on trainers geodiag has never seen, found by nnU-Net through
nnUNet_extTrainer in a temporary folder: the first non-finite step is stopped (exit 3) or skipped, saved, replayed
and named at its source line; `geodiag replay` reproduces it from the saved step; `geodiag doctor` resolves them.

The expected lines, iterations and modules come from the trainer files themselves (tests/user_trainers/), read as
text here, never from geodiag's output.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geodiag.diagnostics.nnunet.checkpoint import load_checkpoint
from geodiag.diagnostics.nnunet.environment import EXT_TRAINER_VAR, ext_trainer_value
from geodiag.diagnostics.instruments.checkpoint_health import checkpoint_health
from geodiag.diagnostics.nonfinite.sites import format_site

USER_TRAINERS = Path(__file__).parent / "user_trainers"
SHAPE_PRIOR_FILE = "my_shape_prior_trainer.py"
STOCK_FILE = "stock_trainer_faults.py"


def _line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text`` (exactly one)."""
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def ext_folder(tmp_path) -> Path:
    """The researcher's folder of trainers (a copy of tests/user_trainers), as nnUNet_extTrainer names it."""
    folder = tmp_path / "my_trainers"
    folder.mkdir()
    for source in USER_TRAINERS.glob("*.py"):
        shutil.copy(source, folder / source.name)
    return folder


def _env(ext_folder: Path, results: Path) -> dict:
    env = dict(os.environ, nnUNet_results=str(results))
    env[EXT_TRAINER_VAR] = ext_trainer_value(str(ext_folder))
    return env


def _geodiag(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geodiag.diagnostics.cli", *args], env=env, capture_output=True,
                          text=True, timeout=900)


def _watch(dataset, ext_folder: Path, tmp_path: Path, trainer: str, *options: str):
    results = tmp_path / "results"
    proc = _geodiag(["watch", *options, "--", "nnUNetv2_train", str(dataset.dataset_id), dataset.configuration, "0",
                     "-tr", trainer, "-device", "cpu"], _env(ext_folder, results))
    fold = results / dataset.name / f"{trainer}__nnUNetPlans__{dataset.configuration}" / "fold_0"
    return proc, fold / "geodiag_watch"


def _rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("iterations_epoch_*.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def _assert_finite_nnunet_checkpoint(path: Path, dataset) -> dict:
    """nnU-Net's own load_checkpoint takes it, geodiag's allowlisted loader takes it, every weight is finite."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = nnUNetTrainer(dataset.load_plans(), dataset.configuration, 0, dataset.load_dataset_json(),
                            torch.device("cpu"))
    trainer.load_checkpoint(str(path))
    assert all(bool(torch.isfinite(p).all()) for p in trainer.network.parameters())
    data = load_checkpoint(path).data
    assert checkpoint_health(data)["weights"]["nonfinite_elements"] == 0
    return data


def test_watch_stops_a_researchers_trainer_at_its_backward_nan_and_names_the_sqrt_line(tiny_dataset_502, ext_folder,
                                                                                        tmp_path):
    """The term's masked prediction is exactly flat outside the object: sqrt(0) is finite, its backward is not."""
    user_file = ext_folder / SHAPE_PRIOR_FILE
    before = hashlib.sha256(user_file.read_bytes()).hexdigest()
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerMyShapePrior")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert hashlib.sha256(user_file.read_bytes()).hexdigest() == before

    report = json.loads((folder / "first_nonfinite.json").read_text())
    switch_on = 1 * 3  # shape_start_epoch 1 of num_iterations_per_epoch 3, in the trainer file
    assert (report["iteration"], report["epoch"]) == (switch_on, 1)
    assert report["phase"] == "backward" and report["op"] == "sqrt" and report["node"] == "SqrtBackward0"
    assert report["site"] == format_site(str(user_file), _line_of(user_file, 'torch.sqrt(gx ** 2 + gy ** 2)'))
    assert report["trigger"] == "gradient" and math.isfinite(report["seen_live"]["loss"])  # the forward is finite
    assert len(report["cases"]) == 2 and all(c.startswith("shapes_one_") for c in report["cases"])
    assert report["replay"]["classification"] == "maths"
    assert report["replay"]["reaches_parameter_gradients"]
    assert [r["setting"] for r in report["replay"]["runs"]] == ["as-run", "fp64 at loss scale 1"]
    assert "sqrt" in (folder / "first_nonfinite.md").read_text()

    rows = _rows(folder)
    assert [int(r["iteration"]) for r in rows] == list(range(switch_on + 1))
    assert [r["skipped"] for r in rows] == ["0"] * switch_on + ["1"]
    assert math.isnan(float(rows[-1]["grad_norm"])) and all(math.isfinite(float(r["grad_norm"])) for r in rows[:-1])
    _assert_finite_nnunet_checkpoint(folder / "last_good.pth", tiny_dataset_502)
    assert {p.name for p in (folder / f"step_{switch_on}").iterdir()} == {"batch.pt", "state.pth", "meta.json"}

    replayed = _geodiag(["replay", str(folder / f"step_{switch_on}")],
                        _env(ext_folder, tmp_path / "results"))
    assert replayed.returncode == 3, replayed.stdout[-2000:] + replayed.stderr[-2000:]
    again = json.loads((folder / f"step_{switch_on}" / "replay_cpu.json").read_text())
    assert again["classification"] == "maths"
    assert {(r["phase"], r["op"], r["site"]) for r in again["runs"]} == {("backward", "sqrt", report["site"])}


def test_watch_skip_finishes_the_run_and_counts_the_skipped_steps(tiny_dataset_502, ext_folder, tmp_path):
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerMyShapePrior",
                          "--on-nonfinite", "skip", "--every", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _rows(folder)
    assert [(int(r["epoch"]), r["skipped"]) for r in rows] == [(0, "0")] * 3 + [(1, "1")] * 3
    assert "training finished; 3 skipped steps" in proc.stdout
    assert json.loads((folder / "first_nonfinite.json").read_text())["action"] == "skipped and continued"
    _assert_finite_nnunet_checkpoint(folder.parent / "checkpoint_final.pth", tiny_dataset_502)
    # recorded every iteration: the logits of the 3 training steps of epoch 1, none of the replays' forwards
    histograms = json.loads((folder / "histograms_epoch_0001.json").read_text())
    logits = {r["kind"]: r for r in histograms["rows"] if r["name"] == "logits"}
    batch, patch = 2, 64 * 64
    assert logits["value"]["count"] == 3 * batch * 2 * patch
    assert logits["grad"]["finite"] < logits["grad"]["count"]  # the skipped steps' NaN gradients are in it


def test_watch_names_the_conv_module_of_a_forward_inf_in_a_stock_train_step(tiny_dataset_502, ext_folder, tmp_path):
    stock_file = ext_folder / STOCK_FILE
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerInfConv")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((folder / "first_nonfinite.json").read_text())
    assert report["iteration"] == 2 and report["phase"] == "forward"  # epoch 1 of 2 iterations per epoch
    assert report["module"].startswith("PlainConvUNet.encoder.stages.1.0.convs.0.conv ")
    assert report["op"] == "masked_fill"
    assert report["site"] == format_site(str(stock_file), _line_of(stock_file, 'output.masked_fill(corner'))
    _assert_finite_nnunet_checkpoint(folder / "last_good.pth", tiny_dataset_502)


def test_watch_stops_on_a_collapsing_grad_scaler_before_nan_weights(tiny_dataset_502, ext_folder, tmp_path):
    """CPU GradScaler at init scale 4 and a NaN loss from epoch 1: skipped steps halve it 4 -> 2 -> 1 -> 0.5."""
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerScalerCollapse")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((folder / "first_nonfinite.json").read_text())
    assert report["phase"] == "scaler" and report["trigger"] == "scale"
    assert report["iteration"] == 2 + 2  # two clean steps, then the third skipped step collapses the scale
    assert report["seen_live"]["scale"] == 0.5
    rows = _rows(folder)
    assert [(r["skipped"], float(r["scale"])) for r in rows[2:]] == [("1", 2.0), ("1", 1.0), ("1", 0.5)]
    saved = _assert_finite_nnunet_checkpoint(folder / "last_good.pth", tiny_dataset_502)
    assert saved["grad_scaler_state"]["scale"] == 1.0  # the scaler before the collapsing step
    assert "GradScaler scale 0.5 is below the floor 1" in proc.stdout


def test_watch_stops_on_a_nan_weight_without_saving_it_as_good(tiny_dataset_502, ext_folder, tmp_path):
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerNanWeight", "--every", "1")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((folder / "first_nonfinite.json").read_text())
    assert (report["iteration"], report["phase"], report["trigger"]) == (2, "optimizer", "weights")
    assert report["seen_live"]["nonfinite_weight_tensors"] == 1 and report["replay"] is None
    assert not (folder / "last_good.pth").exists() and not (folder / "step_2" / "state.pth").exists()
    assert report["last_good"] == str(folder.parent / "checkpoint_best.pth")  # nnU-Net's save after epoch 0
    _assert_finite_nnunet_checkpoint(folder.parent / "checkpoint_best.pth", tiny_dataset_502)


def test_doctor_resolves_a_researchers_trainer_and_says_watch_wraps_it(ext_folder, tmp_path):
    proc = _geodiag(["doctor", "--trainer", "nnUNetTrainerMyShapePrior"], _env(ext_folder, tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resolved trainer file  {ext_folder / SHAPE_PRIOR_FILE}" in proc.stdout
    assert "geodiag watch can wrap it" in proc.stdout
    assert "no trainer named" not in proc.stdout


@pytest.mark.parametrize("command,message", [
    (["python", "train.py"], "expected the training command after --"),
    (["nnUNetv2_train", "502", "-tr", "X"], "nnUNetv2_train needs DATASET CONFIGURATION FOLD first"),
], ids=["not-nnunet", "no-fold"])
def test_watch_rejects_a_command_that_is_not_nnunet_training(command, message):
    proc = _geodiag(["watch", "--", *command], dict(os.environ))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def test_watch_records_geodiags_own_trainer_with_its_taps_and_terms(tiny_dataset_502, ext_folder, tmp_path):
    """nnUNetTrainerGeometricQuick brings its own guard: watch reuses it, records its loss taps every 2 iterations
    and the per-term values its train_step returns; a clean run exits 0 with nothing skipped."""
    from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometricQuick as quick

    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerGeometricQuick", "--every", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (folder / "first_nonfinite.json").exists()
    rows = _rows(folder)
    assert [int(r["iteration"]) for r in rows] == list(range(6 * 4))  # the quick trainer: 6 epochs of 4
    assert all(r["skipped"] == "0" for r in rows)
    active = [r for r in rows if int(r["epoch"]) >= quick.warmup_epochs]
    for row in active:  # the trainer's own decomposition, as its train_step returned it
        terms = float(row["train_compactness"]) + float(row["train_aspect"])
        assert float(row["loss"]) == pytest.approx(float(row["train_dc_ce"]) + terms, rel=1e-5)
    assert [r["state_checked"] for r in rows[:4]] == ["1", "0", "1", "0"]
    histograms = json.loads((folder / f"histograms_epoch_{quick.warmup_epochs:04d}.json").read_text())
    table = {(r["name"], r["kind"]): r for r in histograms["rows"]}
    pixels = 2 * 64 * 64
    # 3 of the epoch's 4 iterations: the first of the epoch, the first after its terms were reported on, every 2nd
    first = quick.warmup_epochs * 4
    assert histograms["recorded_iterations"] == [first, first + 1, first + 2]
    assert table[("compactness.sqrt_input", "value")]["count"] == 3 * pixels
    assert table[("logits", "value")]["count"] == 3 * 2 * pixels


_BLOCK_TENSORBOARD = ("import sys\n"
                      "class Block:\n"
                      "    def find_spec(self, name, path=None, target=None):\n"
                      "        if name.split('.')[0] == 'tensorboard':\n"
                      "            raise ImportError('blocked: ' + name)\n"
                      "sys.meta_path.insert(0, Block())\n"
                      "from geodiag.diagnostics.cli import main\n"
                      "sys.exit(main())\n")


def test_watch_refuses_tensorboard_without_the_package(tmp_path):
    """A machine without tensorboard (its import blocked here): a one-line error before nnU-Net starts."""
    proc = subprocess.run([sys.executable, "-c", _BLOCK_TENSORBOARD, "watch", "--tensorboard", str(tmp_path / "tb"),
                           "--", "nnUNetv2_train", "502", "2d", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--tensorboard needs the tensorboard package" in proc.stderr and not (tmp_path / "tb").exists()


def test_watch_writes_its_scalars_and_its_own_bins_for_tensorboard(tiny_dataset_502, ext_folder, tmp_path):
    """--tensorboard: the stock EventAccumulator reads back every iteration's loss as the CSV has it, and each
    histogram's buckets are geodiag's own bin counts (no recomputation from values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerGeometricQuick", "--every", "2",
                          "--tensorboard", str(board))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    events = EventAccumulator(str(board), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("watch/loss")}
    rows = _rows(folder)
    assert sorted(losses) == [int(r["iteration"]) for r in rows]
    assert all(losses[int(r["iteration"])] == pytest.approx(float(r["loss"]), rel=1e-6) for r in rows)
    recorded = json.loads((folder / "histograms_epoch_0000.json").read_text())
    row = next(r for r in recorded["rows"] if r["name"] == "logits" and r["kind"] == "value")
    [written] = [e for e in events.Histograms("logits/value |x|") if e.step == recorded["iterations"][1]]
    assert written.histogram_value.num == sum(row["bin_counts"]) > 0
    assert [int(c) for c in written.histogram_value.bucket] == [int(c) for c in row["bin_counts"]]


def test_watch_works_with_a_compiled_network_and_replays_it_uncompiled(tiny_dataset_502, ext_folder, tmp_path):
    """torch.compile (Inductor on the CPU) on the network: the always-on statistics, the hooks of the histograms and
    the replay (on the uncompiled module) still find the sqrt line."""
    user_file = ext_folder / SHAPE_PRIOR_FILE
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerMyShapePriorCompiled", "--every", "1")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((folder / "first_nonfinite.json").read_text())
    assert (report["iteration"], report["phase"], report["op"]) == (3, "backward", "sqrt")
    assert report["site"] == format_site(str(user_file), _line_of(user_file, 'torch.sqrt(gx ** 2 + gy ** 2)'))
    assert report["replay"]["classification"] == "maths"
    histograms = json.loads((folder / "histograms_epoch_0000.json").read_text())
    logits = {r["kind"]: r["count"] for r in histograms["rows"] if r["name"] == "logits"}
    assert logits == {"value": 3 * 2 * 2 * 64 * 64, "grad": 3 * 2 * 2 * 64 * 64}  # every step of epoch 0
    _assert_finite_nnunet_checkpoint(folder / "last_good.pth", tiny_dataset_502)


GUARDED_FILE = "my_guarded_trainers.py"


def test_watch_sees_a_nan_gradient_the_trainers_own_guard_hides_before_clip(tiny_dataset_502, ext_folder, tmp_path):
    """The trainer zeroes a non-finite gradient and returns before clip and step: no clip norm, no optimizer hook;
    watch still stops at the first such step and names the sqrt line."""
    user_file = ext_folder / GUARDED_FILE
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerGuardBeforeClip")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((folder / "first_nonfinite.json").read_text())
    assert (report["iteration"], report["trigger"], report["phase"], report["op"]) == (2, "gradient", "backward",
                                                                                       "sqrt")
    assert report["site"] == format_site(str(user_file), _line_of(user_file, 'return torch.sqrt('))
    rows = _rows(folder)
    assert [r["skipped_by_trainer"] for r in rows] == ["0", "0", "1"] and rows[-1]["event"] == "gradient"


def test_watch_skip_counts_the_steps_the_trainers_own_guard_abandoned(tiny_dataset_502, ext_folder, tmp_path):
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerGuardBeforeClip",
                          "--on-nonfinite", "skip")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _rows(folder)
    abandoned = sum(int(r["skipped_by_trainer"]) for r in rows)
    assert abandoned == sum(r["event"] == "gradient" for r in rows) >= 1
    assert f"training finished; {abandoned} skipped steps (by the guard 0, the GradScaler 0, the trainer's own " \
           f"code {abandoned})" in proc.stdout


def test_watch_counts_a_trainers_own_skips_apart_and_raises_no_event(tiny_dataset_502, ext_folder, tmp_path):
    """Every other step has no optimizer step by the trainer's own design: counted, and no false alarm."""
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerEveryOtherStep", "--every", "3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (folder / "first_nonfinite.json").exists()
    rows = _rows(folder)
    assert [r["skipped_by_trainer"] for r in rows] == ["1", "0"] * 4 and all(r["event"] == "" for r in rows)
    assert all(r["skipped"] == "0" for r in rows)
    assert "training finished; 4 skipped steps (by the guard 0, the GradScaler 0, the trainer's own code 4)" \
        in proc.stdout
    assert "epoch 0: 2 of 4 steps skipped by the trainer's own code" in proc.stdout
    # histograms: every 3rd iteration by the global numbering, plus the first of each epoch
    recorded = [json.loads((folder / f"histograms_epoch_{e:04d}.json").read_text())["recorded_iterations"]
                for e in (0, 1)]
    assert recorded == [[0, 3], [4, 6]]


PRIOR_FILE = "my_prior_trainers.py"


def test_watch_reports_a_nan_the_trainer_masks_to_zero_at_its_sqrt_line(tiny_dataset_502, ext_folder, tmp_path):
    """The seed's NaN -> 0 masking keeps the loss and the weights finite; watch names the masked sqrt, goes on."""
    user_file = ext_folder / PRIOR_FILE
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerMaskedEccentricity", "--every", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    masked = json.loads((folder / "masked_nonfinite.json").read_text())["masked_nonfinite"]
    sqrt_line = f"{PRIOR_FILE}:{_line_of(user_file, 'ecc = torch.sqrt(')}"
    assert masked and {Path(m["site"]).name for m in masked} == {sqrt_line} and "sqrt" in {m["op"] for m in masked}
    rows = _rows(folder)
    assert all(math.isfinite(float(r["loss"])) and r["event"] == "" for r in rows)
    assert {m["iteration"] for m in masked} == {int(r["iteration"]) for r in rows if int(r["masked_nonfinite"])}
    assert f"non-finite values hidden from a finite loss at {ext_folder / sqrt_line}" in proc.stdout
    assert not (folder / "first_nonfinite.json").exists()

    stopped, folder = _watch(tiny_dataset_502, ext_folder, tmp_path / "stop", "nnUNetTrainerMaskedEccentricity",
                             "--every", "1", "--on-masked", "stop")
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    first = json.loads((folder / "masked_nonfinite.json").read_text())["masked_nonfinite"][0]["iteration"]
    assert max(int(r["iteration"]) for r in _rows(folder)) == first


def test_watch_counts_an_error_the_trainers_try_except_swallowed(tiny_dataset_502, ext_folder, tmp_path):
    """A clamp bound above fp16's range under CPU autocast raises on every step; the trainer's except drops the
    term; watch records the message and the clamp's line."""
    user_file = ext_folder / PRIOR_FILE
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerSwallowingPrior", "--every", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    swallowed = json.loads((folder / "swallowed_errors.json").read_text())["swallowed_errors"]
    clamp_line = f"{PRIOR_FILE}:{_line_of(user_file, 'torch.clamp(m, 10.0, 1e6)')}"
    assert {(Path(e["site"]).name, e["op"]) for e in swallowed} == {(clamp_line, "clamp")}
    assert all("Half" in e["message"] and "overflow" in e["message"] for e in swallowed)
    rows = _rows(folder)
    sampled = [int(r["iteration"]) for r in rows if r["swallowed_errors"] != ""]
    assert sorted(e["iteration"] for e in swallowed) == sampled and len(sampled) >= 3  # every sampled step
    assert f"{len(swallowed)} errors caught by the trainer's code in sampled steps" in proc.stdout


@pytest.mark.parametrize("trainer,prior,inert", [("nnUNetTrainerWeightedPrior", "WeightedPrior", True),
                                                 ("nnUNetTrainerStrongPrior", "StrongPrior", False)],
                         ids=["tiny-weight", "carrying"])
def test_watch_says_when_the_users_prior_is_inert_and_only_then(tiny_dataset_502, ext_folder, tmp_path, trainer,
                                                                  prior, inert):
    spec = f"{ext_folder / PRIOR_FILE}:{prior}"
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, trainer, "--every", "1", "--loss", spec)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _rows(folder)
    shares = [float(r["prior_share"]) for r in rows]
    assert all(r["prior_ran"] == "1" for r in rows) and all(math.isfinite(s) for s in shares)
    said = [line for line in proc.stdout.splitlines() if line.endswith(": inert")]
    if inert:
        assert all(abs(s) < 0.01 for s in shares) and len(said) == 2  # one line per epoch
        assert f"the loss at {spec} carried" in said[0]
    else:
        assert min(shares) > 0.01 and said == []


def test_watch_is_silent_on_a_healthy_trainer_behind_all_four_guards(tiny_dataset_502, ext_folder, tmp_path):
    proc, folder = _watch(tiny_dataset_502, ext_folder, tmp_path, "nnUNetTrainerAllGuards", "--every", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = _rows(folder)
    assert all(r["event"] == "" and r["skipped"] == "0" and r["skipped_by_trainer"] == "0" for r in rows)
    assert all(r["masked_nonfinite"] == "0" and r["swallowed_errors"] == "0" for r in rows)
    assert not any((folder / name).exists() for name in ("masked_nonfinite.json", "swallowed_errors.json",
                                                           "first_nonfinite.json"))
    assert "training finished; 0 skipped steps" in proc.stdout and "masked" not in proc.stdout
