"""The clamp sweep on a tiny real checkpoint: columns, finiteness, the clamp's dead zone, the fp64 reference."""
import math

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.tools import sweep as sweep_module
from geodiag.diagnostics.tools.sweep import (Setting, _reference, device_clock, evaluate_settings, parse_settings,
                                             run_sweep)
from geodiag.losses import GeometricLoss
from geodiag.reports import schema, tables
from shapes import disk, logits_from
from sobel_reference import sobel_perimeter
from test_geometry_reference import STAIRCASE_EXCESS

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
    # numpy, fp64: the softmax's foreground of the two logits, its Sobel perimeter and P^2 / (4 pi A), exactly
    foreground = 1 / (1 + np.exp(-(logits[0, 1] - logits[0, 0]).numpy()))
    perimeter = sobel_perimeter(foreground)
    assert ref["perimeter"] == pytest.approx(perimeter, rel=1e-9)
    assert ref["compactness"] == pytest.approx(perimeter ** 2 / (4 * math.pi * foreground.sum()), rel=1e-9)
    # geometry: 2 pi r and compactness 1, within what a staircase boundary adds (the prediction is binary to 1e-13)
    assert 1.0 <= ref["perimeter"] / (2 * math.pi * r) <= 1.0 + STAIRCASE_EXCESS
    assert 1.0 <= ref["compactness"] <= (1.0 + STAIRCASE_EXCESS) ** 2 * (1 + 0.01)
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


BATCHED = [Setting("clamp", 1e-4), Setting("clamp", 1e-2), Setting("additive", 1e-4), Setting("shifted", 1e-10),
           Setting("shifted", 1e-2), Setting("additive", 0.0), Setting("clamp", 0.0)]


def _alone(logits, label, setting, aspect_formula):
    """One setting, one image: a GeometricLoss built with that stabiliser, and the statistics taken in numpy."""
    loss = GeometricLoss((1,), softmax=True, stabilizer=setting.stabilizer, eps=setting.eps,
                         aspect_formula=aspect_formula)
    seen = {}
    loss.register_tap(lambda name, t: seen.__setitem__(name, t.detach()))
    leaf = logits.clone().requires_grad_(True)
    value = loss(leaf, label)
    value.backward()
    grad = leaf.grad.double().numpy().ravel()
    s = seen["compactness.grad_mag_squared"].double().numpy().ravel()
    return seen, {"loss": float(value.detach()), "perimeter": float(seen["perimeter"].mean()),
                  "compactness": float(seen["compactness"].mean()), "aspect": float(seen["aspect"].mean()),
                  "grad_max": float(np.nanmax(np.abs(grad))), "grad_l2": float(np.sqrt(np.nansum(grad ** 2))),
                  "frac_below_eps": float(np.mean(s < np.float32(setting.eps))),
                  "nonfinite_grad": int((~np.isfinite(grad)).sum())}


@pytest.mark.parametrize("ndim,aspect_formula", [(2, "seed"), (3, "anisotropy")])
@pytest.mark.parametrize("batch_elements", [1 << 22, 1])
def test_settings_evaluated_as_one_batch_equal_each_setting_evaluated_alone(ndim, aspect_formula, batch_elements,
                                                                            monkeypatch):
    """Image i of the batch under setting i gives what a loss built with that setting alone gives the single image
    (values, descriptors, gradient, s); also when every setting runs in a batch of its own."""
    monkeypatch.setattr(sweep_module, "SETTINGS_BATCH_ELEMENTS", batch_elements)
    generator = torch.Generator().manual_seed(7)
    size = 48 if ndim == 2 else 20
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * ndim, indexing="ij")
    inside = sum((g - size * 0.45) ** 2 for g in grids) < (size * 0.3) ** 2
    label = inside.long()[None, None]
    noisy_half = grids[-1] < size / 2  # the other half keeps flat regions, where s = 0 exactly
    foreground = (2.0 * inside.float() - 1.0) * 3.0 + torch.randn(inside.shape, generator=generator) * noisy_half
    logits = torch.stack([-foreground, foreground])[None]
    results = evaluate_settings(logits, label, (1,), BATCHED, aspect_formula)
    assert len(results) == len(BATCHED)
    for setting, (measured, s) in zip(BATCHED, results):
        seen, alone = _alone(logits, label, setting, aspect_formula)
        for key in ("loss", "perimeter", "compactness", "aspect", "grad_max", "grad_l2", "frac_below_eps"):
            assert measured[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-12), (setting, key)
        assert measured["nonfinite_grad"] == alone["nonfinite_grad"], setting
        torch.testing.assert_close(s, seen["compactness.grad_mag_squared"], rtol=1e-6, atol=0)
    unstabilised = results[BATCHED.index(Setting("additive", 0.0))][0]
    assert unstabilised["nonfinite_grad"] > 0  # a bare sqrt at s = 0: the failure the sweep must show, per image


def _readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix``, as words (its comment dropped)."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith(prefix))
    return shlex.split(line, comments=True)


def test_clamp_sweep_as_the_readme_writes_it_on_a_3d_results_folder_picks_anisotropy_and_says_why(
        checkpoint_3d, tmp_path, capsys, monkeypatch):
    """The planned 3D dataset's cases are larger than the 48^3 patch along one axis and shorter along another; no
    aspect flag is given. The seed's formula takes the square root of tr^2 - 4 det of 2D moments: it has no 3D
    form, so the sweep must take anisotropy and measure its bias against an anisotropy reference (~0: no sqrt)."""
    from geodiag.diagnostics.cli import main
    from geodiag.diagnostics.nnunet.cases import find_cases, preprocess
    from geodiag.diagnostics.nnunet.checkpoint import load_checkpoint
    from geodiag.reports.schema import read_json

    results = checkpoint_3d.parent.parent  # .../Dataset590_Balls3D/nnUNetTrainer__nnUNetPlans__3d_tiny
    monkeypatch.chdir(tmp_path)
    words = _readme_command("geodiag clamp-sweep $R --fold 0 --out ")
    argv = [results if word == "$R" else word for word in words[1:]]
    checkpoint = load_checkpoint(checkpoint_3d)
    case = preprocess(checkpoint, find_cases(checkpoint)[0])
    shape, patch = case.image.shape[1:], checkpoint.patch_size
    assert any(s > p for s, p in zip(shape, patch)) and any(s < p for s, p in zip(shape, patch))
    code = main([*map(str, argv), "--cases", case.name, "--precision", "fp32", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    out_dir = tmp_path / argv[argv.index("--out") + 1]
    settings = read_json(out_dir / "settings.json")
    assert settings["aspect_formula"] == "anisotropy" and "2D only" in settings["aspect_formula_why"]
    assert f"aspect formula: anisotropy ({settings['aspect_formula_why']})" in out
    assert f"- aspect formula: anisotropy ({settings['aspect_formula_why']})" in (out_dir / "report.md").read_text()
    frame = tables.read_table(out_dir / "sweep.csv", schema.SWEEP_COLUMNS)
    assert frame.bias_aspect.abs().max() < 1e-3  # anisotropy against anisotropy: no sqrt for eps to act on


def test_clamp_sweep_on_2d_checkpoints_keeps_the_seeds_formula_and_says_why(stock_run, tmp_path):
    from geodiag.reports.schema import read_json

    run_sweep([f"stock={stock_run.final_checkpoint}"], tmp_path, cases="shapes_one_000",
              settings=parse_settings(["clamp"], [1e-2]), precisions=["fp32"])
    settings = read_json(tmp_path / "settings.json")
    assert settings["aspect_formula"] == "seed" and "every checkpoint is 2D" in settings["aspect_formula_why"]
