"""analyze-checkpoint on real nnU-Net checkpoints: verdicts and tables (resume: test_interrupted_runs.py)."""
import json
import math

import pytest

from checkpoint_faults import collapsed_scaler, nan_momentum, nan_weights, write_modified
from geodiag.diagnostics.tools.analyze import analyze_checkpoint
from geodiag.reports import schema, tables


def _analyze(path, out, **kwargs):
    return analyze_checkpoint(str(path), out, max_cases=kwargs.pop("max_cases", 2), **kwargs)


def test_switch_on_checkpoint_of_the_geometric_trainer_is_healthy_and_fully_recorded(geometric_run, tmp_path):
    epoch = geometric_run.switch_on_epoch
    summary = _analyze(geometric_run.checkpoints[epoch], tmp_path, precisions=["fp32", "bf16"])
    assert summary["verdict"] == "healthy"
    assert summary["checkpoint"]["trainer_name"] == "nnUNetTrainerGeometricQuick"
    assert summary["checkpoint"]["epoch"] == epoch and summary["checkpoint"]["geometric_active"] is True
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["verdict"] == "healthy"
    tensors = tables.read_table(tmp_path / "tensors.csv", schema.TENSORS_COLUMNS)
    recorded = set(zip(tensors.tensor, tensors.kind))
    for needed in [("compactness.grad_mag_squared", "value"), ("compactness.grad_mag_squared", "grad"),
                   ("compactness.sqrt_input", "local_derivative"), ("logits", "grad"),
                   ("network.parameters", "grad"), ("aspect.discriminant", "value")]:
        assert needed in recorded
    assert set(tensors.precision) == {"fp32", "bf16"}
    eps = tables.read_table(tmp_path / "eps_fractions.csv", schema.EPS_FRACTION_COLUMNS)
    fp32 = eps[(eps.precision == "fp32") & (eps.tensor == "compactness.grad_mag_squared")].sort_values("eps")
    assert fp32.fraction_below.is_monotonic_increasing and fp32.fraction_below.between(0, 1).all()
    terms = tables.read_table(tmp_path / "terms.csv", schema.TERM_COLUMNS)
    assert {"dc_ce", "compactness", "aspect", "geometric_total"} <= set(terms.term)
    shares = terms[terms.term.isin(["compactness", "aspect"])].groupby(["case", "precision"]).grad_share.sum()
    assert shares.round(6).eq(1).all()
    assert summary["closest_to_trouble"]["headroom_decades"] < 40


def test_stock_checkpoint_is_analysed_without_its_trainer_class(stock_run, tmp_path):
    foreign = write_modified(stock_run.final_checkpoint, tmp_path / "foreign.pth",
                             lambda d: d.__setitem__("trainer_name", "SomeonesPrivateTrainer"))
    summary = _analyze(foreign, tmp_path / "out", max_cases=1)
    assert summary["verdict"] == "healthy"
    assert summary["checkpoint"]["geometric_active"] is None
    assert summary["settings"]["stabilizer"] == "shifted"  # the production preset for a foreign trainer


@pytest.mark.parametrize("fault,verdict", [
    (nan_weights, "non_finite_weights"),
    (nan_momentum, "non_finite_optimizer_state"),
    (collapsed_scaler, "grad_scaler_collapsed"),
])
def test_faulty_checkpoint_gets_the_verdict_of_its_fault(stock_run, tmp_path, fault, verdict):
    broken = write_modified(stock_run.final_checkpoint, tmp_path / "broken.pth", fault)
    summary = _analyze(broken, tmp_path / "out", max_cases=1)
    assert summary["verdict"] == verdict
    if verdict == "non_finite_weights":
        assert summary["state"]["non_finite_weights"] == 5
    if verdict == "grad_scaler_collapsed":
        assert summary["state"]["inverse_scale_finite"] is False


def test_unprotected_sqrt_gives_a_non_finite_gradient_named_at_its_producer(stock_run, tmp_path):
    """eps = 0 on the additive form is a bare sqrt, NaN in backward (0 / 0) wherever s is exactly 0. With the
    output layers' weights zeroed and their biases at +-1e4, the network predicts background with probability
    exactly 1 on every pixel (exp(-2e4) underflows to 0), so s = 0 everywhere and the gradient must be non-finite."""
    def saturated_background(data: dict) -> None:
        for name, tensor in data["network_weights"].items():
            if "seg_layers" in name and name.endswith("weight"):
                tensor.zero_()
            elif "seg_layers" in name:
                tensor.fill_(-1e4)[0] = 1e4

    flat = write_modified(stock_run.final_checkpoint, tmp_path / "flat.pth", saturated_background)
    summary = _analyze(flat, tmp_path / "out", max_cases=1, stabilizer="additive", eps=0.0)
    assert summary["verdict"] == "non_finite_gradient"
    assert any("sqrt" in (p["node"] or p["op"]).lower() for p in summary["provenance"])
    # s is exactly 0 in fp64 too (exp(-2e4) underflows there as well): the replay blames the formula
    assert {p["classification"] for p in summary["provenance"]} == {"maths"}
    assert "replayed: maths" in summary["verdict_reason"]


def test_geometric_fraction_of_pixels_below_eps_matches_an_independent_count(geometric_run, tmp_path):
    """eps_fractions.csv (measured on the training patches) against s recomputed here in fp64 from the network's
    output on the same patches, cut here from the preprocessed case at the boxes the analysis recorded."""
    import numpy as np
    import torch

    from fixtures_nnunet import crop_with_padding
    from geodiag.diagnostics.nnunet.cases import find_cases, preprocess
    from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint

    path = geometric_run.checkpoints[geometric_run.switch_on_epoch]
    _analyze(path, tmp_path, max_cases=1)
    ck = load_checkpoint(path)
    case = preprocess(ck, find_cases(ck)[0])
    boxes = json.loads((tmp_path / "cases" / "fp32" / f"{case.name}.json").read_text())["patches"]["bboxes"]
    patches = np.stack([crop_with_padding(case.data, box, 0.0)[:, 0] for box in boxes])
    with torch.no_grad():
        p = torch.softmax(build_network(ck)(torch.from_numpy(patches).float()).double(), dim=1)[:, 1]
    padded = torch.nn.functional.pad(p[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    gy = ((padded[:, 2:, :-2] + 2 * padded[:, 2:, 1:-1] + padded[:, 2:, 2:])
          - (padded[:, :-2, :-2] + 2 * padded[:, :-2, 1:-1] + padded[:, :-2, 2:])) / 8
    gx = ((padded[:, :-2, 2:] + 2 * padded[:, 1:-1, 2:] + padded[:, 2:, 2:])
          - (padded[:, :-2, :-2] + 2 * padded[:, 1:-1, :-2] + padded[:, 2:, :-2])) / 8
    s = gx**2 + gy**2
    eps = tables.read_table(tmp_path / "eps_fractions.csv")
    for row in eps[eps.tensor == "compactness.grad_mag_squared"].itertuples():
        independent = float((s < row.eps).double().mean())
        assert math.isclose(row.fraction_below, independent, abs_tol=2.0 / s.numel()), row.eps
