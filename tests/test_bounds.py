"""geodiag check-bounds: analytic bounds, measurement, baseline regression, JUnit output and user losses."""
from __future__ import annotations

import itertools
import json
import math
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from geodiag.diagnostics.nonfinite.loss_spec import as_user_loss, load_loss
from geodiag.diagnostics.tools import bounds
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.testing import assert_gradient_bounds
from geodiag.losses import GeometricLoss

# Losses a user might write; two of them are broken on purpose (the failures check-bounds exists to catch).
USER_LOSSES = '''
import math
import torch
import torch.nn.functional as F
from geodiag.losses import GeometricLoss

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def unprotected_sqrt(probabilities, target):
    """Compactness with sqrt(gx^2 + gy^2) and no eps: 0 * inf = NaN in backward wherever the map is flat."""
    p = F.pad(probabilities[:, 1:2], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(p, _SOBEL.view(1, 1, 3, 3).to(p))
    gy = F.conv2d(p, _SOBEL.t().reshape(1, 1, 3, 3).to(p))
    perimeter = torch.sqrt(gx ** 2 + gy ** 2).flatten(1).sum(1)
    area = probabilities[:, 1].flatten(1).sum(1).clamp_min(1.0)
    compactness = perimeter ** 2 / (4 * math.pi * area)
    return F.smooth_l1_loss(compactness, torch.ones_like(compactness))


def einsum_pixel_moments(probabilities, target):
    """Anisotropy from einsum moments in pixel units: fp16 under autocast, sum p x^2 overflows 65504."""
    p = probabilities[:, 1]
    y = torch.arange(p.shape[-2], dtype=p.dtype, device=p.device)
    x = torch.arange(p.shape[-1], dtype=p.dtype, device=p.device)
    area = p.sum(dim=(-2, -1))
    mx, my = torch.einsum("bhw,w->b", p, x) / area, torch.einsum("bhw,h->b", p, y) / area
    sxx = torch.einsum("bhw,w->b", p, x * x) / area - mx ** 2
    syy = torch.einsum("bhw,h->b", p, y * y) / area - my ** 2
    return ((sxx - syy) ** 2 / (sxx + syy) ** 2).mean()


def make_production():
    return GeometricLoss.from_preset("production")


_PRODUCTION = GeometricLoss.from_preset("production")


def doubled_production(probabilities, target):
    return 2.0 * _PRODUCTION(probabilities, target)


def per_image(probabilities, target):
    return probabilities[:, 1].flatten(1).sum(1)


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_losses(tmp_path, monkeypatch):
    """The module name of USER_LOSSES, importable for --loss."""
    (tmp_path / "geodiag_user_losses.py").write_text(USER_LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "geodiag_user_losses"


def _check_bounds(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["check-bounds", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _independent_sobel_bound(ndim: int) -> float:
    """max_j sum_i ||d g_i / d p_j||_2 from the fp64 Jacobian of a Sobel written out here, replicate padding."""
    n = 7 if ndim == 2 else 5
    smooth, diff = [1.0, 2.0, 1.0], [-1.0, 0.0, 1.0]
    norm = 8.0 if ndim == 2 else 32.0

    def sobel(flat: torch.Tensor) -> torch.Tensor:
        p = flat.view((n,) * ndim)
        outputs = []
        for axis in range(ndim):
            total = torch.zeros_like(p)
            for offset in itertools.product((-1, 0, 1), repeat=ndim):
                weight = math.prod(diff[o + 1] if a == axis else smooth[o + 1] for a, o in enumerate(offset))
                index = [torch.arange(n).add(o).clamp(0, n - 1) for o in offset]
                total = total + weight * p[torch.meshgrid(*index, indexing="ij")]
            outputs.append(total.flatten() / norm)
        return torch.stack(outputs)

    jacobian = torch.autograd.functional.jacobian(sobel, torch.zeros(n ** ndim, dtype=torch.float64))
    return jacobian.norm(dim=0).sum(dim=0).max().item()


@pytest.mark.parametrize("ndim", [2, 3])
def test_perimeter_grad_bound_is_the_sup_of_an_independent_sobel_jacobian(ndim):
    assert bounds.perimeter_grad_bound(ndim) == pytest.approx(_independent_sobel_bound(ndim), rel=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_single_foreground_pixel_attains_the_perimeter_grad_bound(ndim):
    margin = torch.full((1,) + (12,) * ndim, -10.0)
    margin[(0,) + (6,) * ndim] = 10.0
    for stabilizer in ("shifted", "clamp"):
        m = bounds.measure(GeometricLoss(stabilizer=stabilizer, eps=1e-6), bounds.cases._logits(margin),
                           (margin > 0).long().unsqueeze(1), "fp32")
        assert m.perimeter_grad_max == pytest.approx(bounds.perimeter_grad_bound(ndim), rel=1e-3)


def test_measure_matches_the_softmax_derivative_of_a_linear_loss():
    # L = sum p1 at p1 = 0.5: dL/dlogit = +-p0 p1 = +-0.25 on both channels of 2 x 64 x 64 pixels.
    logits, target = bounds.CASES["uniform_half"].inputs(torch.device("cpu"))
    m = bounds.measure(lambda p, t: p[:, 1].sum(), logits, target, "fp32")
    assert m.loss == pytest.approx(0.5 * 2 * 64 * 64)
    assert m.grad_max == pytest.approx(0.25)
    assert m.grad_l2 == pytest.approx(0.25 * math.sqrt(2 * 2 * 64 * 64))
    assert m.headroom_log2 == pytest.approx(math.log2(65504 / (0.25 * 65536)))
    assert (m.loss_nonfinite, m.grad_nonfinite, m.perimeter_grad_max) == (0, 0, None)


def test_switch_on_case_has_the_seeds_share_of_small_sobel_responses():
    """The seed reports 28.3% of pixels with s < 1e-2 and 0.3% with s < 1e-4 at its switch-on, s in its own units:
    raw Sobel with zero padding, computed here by an independent numpy implementation in fp64."""
    from sobel_reference import sobel_squared_magnitude

    logits, _ = bounds.CASES["uncertain"].inputs(torch.device("cpu"))
    foreground = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    squared = np.stack([sobel_squared_magnitude(image, raw=True, padding="constant") for image in foreground])
    # A chi-squared(2) of mean 0.03 gives 28.3% / 0.33%; the bands allow the sampling spread of 2 x 128^2 pixels.
    assert 0.24 < (squared < 1e-2).mean() < 0.33
    assert 0.0015 < (squared < 1e-4).mean() < 0.006


def test_seed_sobel_loss_is_held_to_the_bound_times_its_gain():
    logits, target = bounds.CASES["large_disk"].inputs(torch.device("cpu"))
    m = bounds.measure(GeometricLoss.from_preset("v2.3"), logits, target, "fp32")
    assert m.perimeter_bound == pytest.approx(8 * bounds.perimeter_grad_bound(2))
    assert m.perimeter_grad_max <= m.perimeter_bound


def test_unprotected_sqrt_fails_naming_the_case_and_the_bound(capsys, user_losses):
    code, out, err = _check_bounds(capsys, "--loss", f"{user_losses}:unprotected_sqrt",
                                   "--cases", "saturated,tiny_disk", "--precisions", "fp32")
    assert code == 1 and not err
    regressions = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert any("saturated /" in line and "grad_nonfinite" in line and "finite dL/dlogits" in line
               for line in regressions), regressions


def test_einsum_pixel_moments_fail_under_fp16_autocast_only(capsys, user_losses):
    code, out, _ = _check_bounds(capsys, "--loss", f"{user_losses}:einsum_pixel_moments",
                                 "--cases", "large_disk", "--precisions", "fp32,fp16")
    regressions = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert code == 1
    assert regressions and all("large_disk /" in line and "/ fp16:" in line for line in regressions)
    assert any("loss = " in line and "bound finite" in line for line in regressions), regressions


def test_junit_has_one_testcase_per_run_and_one_failure_per_failing_run(capsys, tmp_path, user_losses):
    junit = tmp_path / "bounds.xml"
    code, _, _ = _check_bounds(capsys, "--loss", f"{user_losses}:unprotected_sqrt", "--cases",
                               "saturated,tiny_disk", "--precisions", "fp32,bf16", "--junit", junit)
    assert code == 1
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    testcases = suite.findall("testcase")
    names = {(t.get("classname").rsplit(".", 1)[1], t.get("name")) for t in testcases}
    setting = f"{user_losses}:unprotected_sqrt"
    assert names == {(c, f"{setting}/{p}") for c in ("saturated", "tiny_disk") for p in ("fp32", "bf16")}
    failures = [t for t in testcases if t.find("failure") is not None]
    assert int(suite.get("tests")) == 4
    assert int(suite.get("failures")) == len(failures) >= 2
    assert {t.get("classname").rsplit(".", 1)[1] for t in failures} >= {"saturated"}
    assert all("grad_nonfinite" in t.find("failure").get("message") or "loss" in t.find("failure").get("message")
               for t in failures)


def test_update_baseline_round_trip_and_a_doubled_gradient_is_a_regression(capsys, tmp_path, user_losses):
    baseline = tmp_path / "baseline.json"
    selection = ["--cases", "tiny_disk,ball_3d", "--precisions", "fp32", "--baseline", baseline]
    code, _, _ = _check_bounds(capsys, "--loss", f"{user_losses}:make_production", "--update-baseline", *selection)
    assert code == 0
    written = json.loads(baseline.read_text())
    assert {(e["case"], e["precision"]) for e in written["entries"]} == {("tiny_disk", "fp32"), ("ball_3d", "fp32")}

    code, out, _ = _check_bounds(capsys, "--loss", f"{user_losses}:make_production", *selection)
    assert code == 0 and "REGRESSION" not in out and "without a baseline" not in out

    # Same name, twice the loss: every gradient doubles, beyond the 10% tolerance.
    doubled = json.loads(baseline.read_text())
    for entry in doubled["entries"]:
        entry["setting"] = f"{user_losses}:doubled_production"
    baseline.write_text(json.dumps(doubled))
    code, out, _ = _check_bounds(capsys, "--loss", f"{user_losses}:doubled_production", *selection)
    regressions = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert code == 1
    assert {line.split(" / ")[0].split()[-1] for line in regressions} == {"tiny_disk", "ball_3d"}
    assert any("grad_max" in line and "baseline" in line and "(+10% or" in line for line in regressions)


@pytest.mark.parametrize("spec", ["no_colon", "geodiag_no_such_module_xyz:f", "math:no_such_attribute",
                                  "geodiag_user_losses:NOT_CALLABLE", ":f", "math:"])
def test_bad_loss_spec_is_a_one_line_error_with_exit_2(capsys, user_losses, spec):
    code, out, err = _check_bounds(capsys, "--loss", spec, "--cases", "tiny_disk", "--precisions", "fp32")
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [["--cases", "tiny_disk,no_such_case"], ["--settings", "no_such_setting"],
                                  ["--precisions", "fp8"], ["--baseline", "/nonexistent/baseline.json"]])
def test_bad_selection_is_a_one_line_error_with_exit_2(capsys, args):
    code, out, err = _check_bounds(capsys, *args)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1


def test_a_non_scalar_loss_is_a_one_line_error(capsys, user_losses):
    code, _, err = _check_bounds(capsys, "--loss", f"{user_losses}:per_image", "--cases", "tiny_disk")
    assert code == 2 and "scalar" in err and len(err.strip().splitlines()) == 1


def test_a_factory_returning_a_module_is_checked_with_its_perimeter_tap(user_losses):
    import geodiag_user_losses

    loss = load_loss(f"{user_losses}:make_production")
    assert isinstance(loss.fn, GeometricLoss)
    assert as_user_loss(geodiag_user_losses.unprotected_sqrt).fn is geodiag_user_losses.unprotected_sqrt
    logits, target = bounds.CASES["tiny_disk"].inputs(torch.device("cpu"))
    assert bounds.measure(loss, logits, target, "fp32").perimeter_bound == bounds.perimeter_grad_bound(2)


def test_assert_gradient_bounds_passes_production_and_names_the_unprotected_sqrt(user_losses):
    import geodiag_user_losses

    outcomes = assert_gradient_bounds(GeometricLoss.from_preset("production"), cases=["tiny_disk", "ball_3d"])
    assert len(outcomes) == 6 and all(o.passed for o in outcomes)
    with pytest.raises(AssertionError, match=r"saturated / loss / fp16: grad_nonfinite"):
        assert_gradient_bounds(geodiag_user_losses.unprotected_sqrt, cases=["saturated"])
