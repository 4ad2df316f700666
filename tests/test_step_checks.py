"""The sampled checks of watch, unit by unit: automatic taps restricted to the user's own calls, a raising call
listed and re-raised, masked values judged against an outside final value, the code of a loss noticed running, and
the share of the gradient a prior sends, against an independent fp64 computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geodiag.diagnostics.nnunet.step_checks import StepChecks, inert_epoch, loss_codes
from geodiag.reports.schema import INERT_SHARE
from geodiag.diagnostics.nonfinite.autotaps import AutoTaps
from geodiag.diagnostics.nonfinite.loss_spec import as_user_loss


def users_step(x):
    y = F.softplus(x)               # torch's own Python code runs inside: not the user's calls
    z = torch.sqrt(y - 10.0)        # NaN: the user's call
    if torch.isnan(z).any():
        z = x.sum() * 0             # masked
    return z


def test_only_the_users_calls_are_tapped_and_a_masked_nan_is_judged_against_the_final_value():
    x = torch.randn(8, requires_grad=True)
    with AutoTaps(user_calls_only=True) as taps:
        final = users_step(x)
        taps.judge(final)
    result = taps.result()
    ops = {row["op"] for row in result.sites}
    assert ops == {"sqrt", "bool"}  # the risky call and the host sync of `if`; nothing of softplus's internals
    assert [(m["op"], m["calls"]) for m in result.masked_nonfinite] == [("sqrt", 1)]
    assert all(m["site"].endswith(f"test_step_checks.py:{users_step.__code__.co_firstlineno + 2}")
               for m in result.masked_nonfinite)


def test_a_non_finite_final_value_masks_nothing():
    with AutoTaps(user_calls_only=True) as taps:
        taps.judge(torch.sqrt(torch.tensor([-1.0])))
    assert taps.result().masked_nonfinite == []


def test_a_raising_call_is_listed_with_its_line_and_its_exception_goes_on_unchanged():
    half = torch.ones(2, 2, dtype=torch.float16)
    with AutoTaps(user_calls_only=True) as taps:
        with pytest.raises(RuntimeError, match="Half"):
            torch.clamp(half, 10.0, 1e6)  # the bound does not fit fp16
    [raised] = taps.raised
    assert raised["op"] == "clamp" and "overflow" in raised["message"] and "\n" not in raised["message"]


class Prior(torch.nn.Module):
    def forward(self, probs, target):
        return helper(probs)


def helper(probs):
    return probs[:, 1].mean()


def test_the_code_of_a_loss_is_noticed_running_through_its_helpers_and_only_then():
    codes = loss_codes(as_user_loss(Prior()))
    x = torch.randn(2, 2, 4, 4)
    with AutoTaps(user_calls_only=True, codes=codes) as taps:
        torch.softmax(x, 1)
    assert not taps.codes_ran
    with AutoTaps(user_calls_only=True, codes=codes) as taps:
        Prior()(torch.softmax(x, 1), None)
    assert taps.codes_ran


def test_the_share_a_prior_sends_equals_an_independent_fp64_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    weight = 0.3
    checks = StepChecks(as_user_loss(lambda probs, t: (probs[:, 1] ** 2).mean() * weight, input_kind="probabilities"))
    checks.begin()
    output = logits.clone().requires_grad_(True)
    checks.on_output(output)
    probs = torch.softmax(output, 1)
    total = F.binary_cross_entropy(probs[:, 1:], target) + (probs[:, 1] ** 2).mean() * weight
    total.backward()
    found = checks.end(total.detach(), {"target": [target]})

    # reference: numpy fp64, the softmax and both gradients by hand
    x = logits.double().numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    p1 = p[:, 1]
    n = p1.size
    d_prior_d_p1 = weight * 2 * p1 / n
    t = target.double().numpy()[:, 0]
    d_bce_d_p1 = (-(t / p1) + (1 - t) / (1 - p1)) / n
    dp1_dx1, dp1_dx0 = p1 * (1 - p1), -p1 * (1 - p1)

    def at_logits(d):
        return np.stack([d * dp1_dx0, d * dp1_dx1], axis=1)

    g_prior, g = at_logits(d_prior_d_p1), at_logits(d_prior_d_p1 + d_bce_d_p1)
    assert found["prior_share"] == pytest.approx(float((g_prior * g).sum() / (g * g).sum()), rel=1e-4)
    assert found["prior_value"] == pytest.approx(float(weight * (p1 ** 2).mean()), rel=1e-5)
    assert found["masked"] == [] and found["raised"] == []


def test_an_epoch_is_inert_only_when_every_sampled_step_ran_the_prior_below_the_threshold():
    on = {"prior_ran": 1, "prior_value": 0.2}
    shares = [0.001, -0.002, 0.003]
    assert inert_epoch([{**on, "prior_share": share} for share in shares]) == pytest.approx(0.001)  # the median
    assert inert_epoch([{**on, "prior_share": 0.001}, {**on, "prior_share": 2 * INERT_SHARE}]) is None
    assert inert_epoch([{**on, "prior_ran": 0, "prior_share": 0.001}]) is None  # never switched on
    assert inert_epoch([{**on, "prior_value": 0.0, "prior_share": 0.0}]) is None
    assert inert_epoch([{"loss": 1.0}]) is None and not math.isnan(INERT_SHARE)
