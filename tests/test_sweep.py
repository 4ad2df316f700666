"""The clamp sweep on a tiny real checkpoint: columns, finiteness, the clamp's dead zone, the fp64 reference."""
import math

import pytest

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.tools.sweep import _reference, device_clock, parse_settings, run_sweep
from geodiag.reports import schema, tables
from shapes import disk, logits_from

SETTINGS = parse_settings(["clamp", "shifted", "additive"], [1e-4, 1e-2])


@pytest.fixture(scope="module")
def sweep(geometric_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    epochs = [geometric_run.switch_on_epoch - 1, geometric_run.switch_on_epoch]
    specs = [f"e{e}={geometric_run.checkpoints[e]}" for e in epochs]
    frame, timing = run_sweep(specs, out, cases="shapes_one_000,shapes_one_001", settings=SETTINGS,
                              precisions=["fp32", "bf16"])
    return out, frame, timing


def test_sweep_writes_every_column_for_every_checkpoint_case_setting_and_precision(sweep):
    out, frame, _ = sweep
    on_disk = tables.read_table(out / "sweep.csv", schema.SWEEP_COLUMNS)
    assert len(on_disk) == 2 * 2 * len(SETTINGS) * 2
    assert set(on_disk.checkpoint) == {"e1", "e2"}
    assert on_disk.geometric_active.tolist().count(True) == len(on_disk) // 2
    hist = tables.read_table(out / "sweep_hist.csv", schema.SWEEP_HIST_COLUMNS)
    # every pixel of both cases lands in a bin or is exactly zero
    assert hist.groupby("checkpoint")["count"].sum().le(2 * 64 * 64).all()


def test_values_are_finite_for_every_positive_eps(sweep):
    _, frame, _ = sweep
    for column in ("loss", "grad_max", "grad_l2", "perimeter", "compactness", "ref_compactness", "sqrt_deriv_max"):
        assert frame[column].map(math.isfinite).all(), column
    assert (frame.nonfinite_loss == 0).all() and (frame.nonfinite_grad == 0).all()


def test_sqrt_local_derivative_is_bounded_by_half_over_sqrt_eps(sweep):
    _, frame, _ = sweep
    assert (frame.sqrt_deriv_max <= 0.5 / frame.eps.map(math.sqrt) * (1 + 1e-6)).all()


def test_clamp_dead_zone_is_exactly_the_pixels_below_eps_and_other_stabilisers_have_none(sweep):
    _, frame, _ = sweep
    clamp = frame[frame.stabilizer == "clamp"]
    assert (clamp.frac_zero_grad == clamp.frac_below_eps).all()
    assert (frame[frame.stabilizer != "clamp"].frac_zero_grad == 0).all()
    larger = frame[(frame.eps == 1e-2)].set_index(["checkpoint", "case", "precision", "stabilizer"]).frac_below_eps
    smaller = frame[(frame.eps == 1e-4)].set_index(["checkpoint", "case", "precision", "stabilizer"]).frac_below_eps
    assert (larger >= smaller).all()


def test_clamp_and_additive_overestimate_and_shifted_underestimates_the_perimeter(sweep):
    _, frame, _ = sweep
    assert (frame[frame.stabilizer.isin(["clamp", "additive"])].bias_perimeter >= 0).all()
    assert (frame[frame.stabilizer == "shifted"].bias_perimeter <= 0).all()


def test_fp64_reference_agrees_with_geometry_on_a_disk():
    r = 30
    logits = logits_from(disk(r, n=128, centre=(64.3, 63.8)), 30.0)
    ref = _reference(logits, (disk(r, n=128, centre=(64.3, 63.8)) > 0.5).double(), (1,), "seed")
    assert 1.00 <= ref["compactness"] <= 1.06
    assert ref["perimeter"] / (2 * math.pi * r) == pytest.approx(1.02, abs=0.015)
    assert ref["aspect"] == pytest.approx(1.0, abs=0.01)  # the seed's elongation of a disk


@pytest.mark.parametrize("stabilizers,eps,message", [
    (["clip"], [1e-2], "unknown stabilizer"),
    (["clamp"], [-1.0], "eps must be"),
])
def test_bad_settings_are_one_line_errors(stabilizers, eps, message):
    with pytest.raises(GeodiagError, match=message):
        parse_settings(stabilizers, eps)


def test_anisotropy_aspect_bias_is_measured_against_an_anisotropy_reference(stock_run, tmp_path):
    """The anisotropy descriptor has no sqrt for eps to act on: against a reference of the same formula its bias
    is zero up to rounding (against the seed's formula it would be the gap between two descriptors)."""
    frame, _ = run_sweep([f"stock={stock_run.final_checkpoint}"], tmp_path, cases="shapes_one_000",
                         settings=parse_settings(["clamp", "additive"], [1e-4, 1e-2]), precisions=["fp32"],
                         aspect_formula="anisotropy")
    assert len(frame) == 4
    # eps does not act on it: one bias per case for every setting, fp32 rounding against fp64 (a reference built with
    # the other formula is off by the gap between the descriptors, ~100% here)
    spread = frame.groupby("case").bias_aspect.agg(lambda bias: bias.max() - bias.min())
    assert (spread < 1e-9).all(), frame.bias_aspect.tolist()
    assert frame.bias_aspect.abs().max() < 1e-3, frame.bias_aspect.tolist()


def test_cuda_work_is_finished_before_the_sweep_reads_the_clock(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    device_clock(torch.device("cpu"))
    assert calls == []
    device_clock(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_sweep_of_one_fold_of_a_results_folder_with_several(stock_run, tmp_path, capsys):
    """Stock nnU-Net names every fold's checkpoint checkpoint_final.pth; --fold picks one, as in analyze."""
    import shutil

    from geodiag.diagnostics.cli import main

    trainer = tmp_path / "results" / stock_run.output_folder.parent.name
    for fold in ("fold_0", "fold_1"):
        (trainer / fold).mkdir(parents=True)
        shutil.copy(stock_run.final_checkpoint, trainer / fold / "checkpoint_final.pth")
    argv = ["clamp-sweep", str(trainer), "--cases", "shapes_one_000", "--stabilizers", "clamp", "--eps", "1e-2",
            "--precision", "fp32", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "both")]) == 2
    assert "--fold" in capsys.readouterr().err
    assert main([*argv, "--fold", "1", "--out", str(tmp_path / "one")]) == 0
    assert len(tables.read_table(tmp_path / "one" / "sweep.csv", schema.SWEEP_COLUMNS)) == 1
