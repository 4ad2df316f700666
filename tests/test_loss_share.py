"""loss_share: each value's share of a step's gradient, <g_x, g>/|g|^2, and its norm ratio, at the logits and at the
parameters; a user's loss split into terms (weight attributes, a SPEC of its own, a returned dict); the roles.

References: on a linear model the gradients are known in closed form, so the shares are recomputed here in numpy
fp64 from the model's inputs; the roles from the thresholds' definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments.errors import ArgumentError
from geodiag.diagnostics.nonfinite.loss_spec import as_user_loss, load_loss
from geodiag.diagnostics.tools import loss_share
from geodiag.losses import GeometricLoss
from geodiag.reports.schema import DOMINANT_SHARE, INERT_SHARE, share_role

WEIGHTED_LOSS = '''import torch
import torch.nn as nn


class ShapeLoss(nn.Module):
    """Two terms a researcher weighs by hand: foreground area against the target's, and a smoothness penalty."""

    def __init__(self, w_area=0.5, w_smooth=0.1):
        super().__init__()
        self.w_area = w_area
        self.w_smooth = w_smooth

    def forward(self, pred, target):
        p = pred[:, 1]
        area = (p.mean() - (target[:, 0] > 0).float().mean()) ** 2
        smooth = (p[:, 1:, :] - p[:, :-1, :]).abs().mean()
        return self.w_area * area + self.w_smooth * smooth


def smooth_only(pred, target):
    p = pred[:, 1]
    return 0.1 * (p[:, 1:, :] - p[:, :-1, :]).abs().mean()


def as_dict(pred, target):
    p = pred[:, 1]
    return {"area": 0.5 * (p.mean() - (target[:, 0] > 0).float().mean()) ** 2,
            "smooth": 0.1 * (p[:, 1:, :] - p[:, :-1, :]).abs().mean()}
'''


@pytest.fixture
def loss_file(tmp_path):
    path = tmp_path / "shape_loss.py"
    path.write_text(WEIGHTED_LOSS)
    return path


def test_shares_of_a_linear_model_match_their_closed_form():
    """logits = W x (a 1x1 convolution, no bias); a = <c1, logits>, b = <c2, logits>. At the logits g_a = c1; at W,
    g_a[k, j] = sum over pixels of c1[k, p] x[j, p]. The step is a + b."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 5, 4, generator=generator, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 2, 1, bias=False).double()
    c1, c2 = (torch.randn(1, 2, 5, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    logits = conv(x)
    rows = loss_share.gradient_shares({"a": (c1 * logits).sum(), "b": (c2 * logits).sum()}, logits,
                                      list(conv.parameters()), step=("a", "b"))
    C1, C2, X = (t.numpy()[0].reshape(t.shape[1], -1) for t in (c1, c2, x))
    for side, (ga, gb) in {"logits": (C1, C2), "params": (C1 @ X.T, C2 @ X.T)}.items():
        g = ga + gb
        for name, gx in (("a", ga), ("b", gb)):
            assert rows[name][f"share_{side}"] == pytest.approx(np.sum(gx * g) / np.sum(g * g), rel=1e-10)
            assert rows[name][f"norm_ratio_{side}"] == pytest.approx(np.linalg.norm(gx) / np.linalg.norm(g),
                                                                     rel=1e-10)
            assert rows[name][f"grad_norm_{side}"] == pytest.approx(np.linalg.norm(gx), rel=1e-10)
        assert rows["a"][f"share_{side}"] + rows["b"][f"share_{side}"] == pytest.approx(1.0, abs=1e-12)
    assert rows["a"]["max_abs_grad_logits"] == pytest.approx(np.abs(C1).max())
    assert rows["a"]["value"] == pytest.approx(float((c1 * logits).sum().detach()))
    assert rows["a"]["nonfinite_grad_logits"] == rows["a"]["nonfinite_grad_params"] == 0


def test_without_parameters_only_the_logits_side_is_measured():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    rows = loss_share.gradient_shares({"a": logits.sum(), "b": (2 * logits).sum()}, logits, [], step=("a", "b"))
    assert rows["a"]["share_logits"] == pytest.approx(1 / 3) and rows["b"]["share_logits"] == pytest.approx(2 / 3)
    assert math.isnan(rows["a"]["share_params"]) and math.isnan(rows["a"]["grad_norm_params"])


@pytest.mark.parametrize("share,role", [(0.0, "inert"), (0.009, "inert"), (-0.009, "inert"), (0.01, "contributes"),
                                        (-0.2, "contributes"), (0.5, "contributes"), (0.51, "dominant"),
                                        (float("nan"), "not measured")])
def test_the_roles_follow_the_documented_thresholds(share, role):
    assert (INERT_SHARE, DOMINANT_SHARE) == (0.01, 0.5)
    assert share_role(share) == role


def _values(loss, terms, logits, label):
    return loss_share.loss_values(loss, logits, label, lambda lg, lb: lg.float().square().mean(), terms, None)


def test_weight_terms_sum_to_the_loss_and_their_shares_to_its_share(loss_file):
    loss = load_loss(f"{loss_file}:ShapeLoss")
    terms = loss_share.parse_terms(loss, ["area=w_area", "smooth=w_smooth"])
    assert loss.fn.w_area == 0.5 and loss.fn.w_smooth == 0.1  # the loss itself is left as it was
    logits = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    label = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    values = _values(loss, terms, logits, label)
    assert list(values) == ["dice_ce", "loss", "area", "smooth"]
    assert (values["area"] + values["smooth"]).item() == pytest.approx(values["loss"].item(), rel=1e-6)
    rows = loss_share.gradient_shares(values, logits, [], loss_share.STEP)
    assert rows["area"]["share_logits"] + rows["smooth"]["share_logits"] == pytest.approx(
        rows["loss"]["share_logits"], rel=1e-6)
    # g is the fp32 gradient of the summed step: the shares' sum is 1 up to fp32 rounding
    assert rows["dice_ce"]["share_logits"] + rows["loss"]["share_logits"] == pytest.approx(1.0, rel=1e-6)


def test_a_term_spec_of_its_own_and_a_returned_dict_give_the_same_term(loss_file):
    logits = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    label = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    label[..., 3:8, 4:9] = 1
    by_spec = _values(load_loss(f"{loss_file}:ShapeLoss"),
                      loss_share.parse_terms(load_loss(f"{loss_file}:ShapeLoss"),
                                             [f"smooth={loss_file}:smooth_only"]), logits, label)
    by_dict = _values(load_loss(f"{loss_file}:as_dict"), {}, logits, label)
    assert by_spec["smooth"].item() == pytest.approx(by_dict["smooth"].item(), rel=1e-7)
    assert by_dict["loss"].item() == pytest.approx((by_dict["area"] + by_dict["smooth"]).item(), rel=1e-7)
    assert by_dict["loss"].item() == pytest.approx(by_spec["loss"].item(), rel=1e-6)


def test_geometric_loss_terms_come_from_its_taps_and_sum_to_it():
    loss = GeometricLoss.from_preset("production", classes=(1,), softmax=True)
    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    label[..., 8:24, 10:22] = 1
    logits = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    values = _values(loss, {}, logits, label)
    assert {"compactness", "aspect"} <= set(values)
    assert (values["compactness"] + values["aspect"]).item() == pytest.approx(values["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("item,message", [
    ("area", "expected NAME=SPEC"), ("loss=w_area", "expected NAME=SPEC"), ("dice_ce=w_area", "expected NAME=SPEC"),
    ("area=w_volume", "no numeric attribute 'w_volume'"), ("area=no_such_file.py:f", "no such file"),
])
def test_a_bad_term_is_an_error_naming_the_argument(loss_file, item, message):
    with pytest.raises(ArgumentError, match=message) as raised:
        loss_share.parse_terms(load_loss(f"{loss_file}:ShapeLoss"), [item])
    assert raised.value.arguments == ("term",)


def test_terms_of_geodiags_own_loss_or_of_a_plain_function_by_weight_are_refused():
    with pytest.raises(ArgumentError, match="your own loss"):
        loss_share.parse_terms(GeometricLoss(), ["compactness=compactness_weight"])
    with pytest.raises(ArgumentError, match="no numeric attribute"):
        loss_share.parse_terms(as_user_loss(lambda p, t: p.sum()), ["area=w_area"])


def _summary(loss_share_median: float, term_share_median: float, samples: int = 8) -> dict:
    def stats(share):
        return {"samples": samples, "share_params": {"median": share, "min": share, "max": share},
                "role": share_role(share)}
    return {"fp32": {"patches": {"dice_ce": stats(1 - loss_share_median), "loss": stats(loss_share_median),
                                 "compactness": stats(term_share_median)}}}


def _clamp(site, fraction, elements):
    return {"precision": "fp32", "pass": "patches", "op": "clamp", "site": site, "at_bound_fraction": fraction,
            "elements": elements}


def test_only_a_per_pixel_clamp_holding_most_elements_explains_an_inert_part():
    """8 patches of 64^2: a per-image gate at its bound in every image is no explanation; the pixel clamp is."""
    pixels = 64 * 64
    gate, pixel_clamp = _clamp("loss.py:10", 1.0, 8), _clamp("loss.py:27", 0.97, 8 * pixels)
    role = loss_share.headline(_summary(0.002, 0.0001), [gate, pixel_clamp], "loss.py:f", pixels)
    assert role["role"] == "inert" and role["explained_by"] == {"site": "loss.py:27", "op": "clamp",
                                                                "at_bound_fraction": 0.97}
    assert loss_share.headline(_summary(0.002, 0.0001), [gate], "loss.py:f", pixels)["explained_by"] is None
    half_held = _clamp("loss.py:27", 0.3, 8 * pixels)
    assert loss_share.headline(_summary(0.002, 0.0001), [half_held], "loss.py:f", pixels)["explained_by"] is None
    # nothing inert, nothing to explain; an inert term alone is explained too
    assert loss_share.headline(_summary(0.2, 0.2), [pixel_clamp], "loss.py:f", pixels)["explained_by"] is None
    contributing = loss_share.headline(_summary(0.2, 0.001), [pixel_clamp], "loss.py:f", pixels)
    assert contributing["role"] == "contributes" and contributing["terms"] == {"compactness": "inert"}
    assert contributing["explained_by"]["site"] == "loss.py:27"


def test_a_dict_term_that_sends_no_gradient_has_share_0_and_a_non_scalar_one_is_refused():
    from geodiag.diagnostics.instruments.errors import GeodiagError

    def logged(pred, target):  # a researcher logs a metric beside the term that trains
        p = pred[:, 1]
        return {"fg": p.mean(), "dice_metric": (p > 0.5).float().mean(), "weight": 0.0}

    logits = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    values = _values(as_user_loss(logged), {}, logits, label)
    rows = loss_share.gradient_shares(values, logits, [], loss_share.STEP)
    assert rows["dice_metric"]["share_logits"] == rows["weight"]["share_logits"] == 0.0
    assert rows["fg"]["share_logits"] == pytest.approx(rows["loss"]["share_logits"], rel=1e-6)
    with pytest.raises(GeodiagError, match=r"'per_image' as \(2,\); each term must be a scalar tensor"):
        _values(as_user_loss(lambda p, t: {"per_image": p[:, 1].flatten(1).mean(1).repeat(2)}), {}, logits, label)
