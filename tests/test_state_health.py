"""The one finiteness scan and the one rot rule that the guard, the state recorder and the checkpoint check share:
flags against numpy's isfinite in fp64, and the rule's order on states built by hand."""
import math

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments.checkpoint_health import checkpoint_health
from geodiag.losses.nnunet.state_health import nonfinite_flags, nonfinite_names, rot_event


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_flags_match_numpy_isfinite_per_tensor(dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for poison in (None, math.nan, math.inf, -math.inf, None):
        t = torch.randn(7, 5, generator=generator).to(dtype) * 1e3
        if poison is not None:
            t[3, 2] = poison
        tensors.append(t)
    tensors += [None, torch.empty(0, dtype=dtype), torch.arange(4)]  # absent, empty, integer: nothing to flag
    reference = [float(t is not None and t.is_floating_point()
                       and not np.isfinite(t.double().numpy()).all()) for t in tensors]
    assert nonfinite_flags(tensors, torch.device("cpu")).tolist() == reference == [0, 1, 1, 1, 0, 0, 0, 0]


def test_finite_extremes_are_not_flagged_where_a_sum_of_squares_would_overflow():
    big = torch.full((1000,), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert nonfinite_flags([big], torch.device("cpu")).tolist() == [0.0]
    assert not torch.isfinite(big.float().square().sum().half())  # the overflow a norm-based check would see


def test_names_are_those_of_the_poisoned_tensors_in_order():
    named = [("a", torch.ones(3)), ("b", torch.tensor([1.0, math.nan])), ("c", None), ("d", torch.tensor([math.inf]))]
    assert nonfinite_names(named) == ["b", "d"]


@pytest.mark.parametrize("scale,weights,momentum,event", [
    (None, 0, 0, None),
    (65536.0, 0, 0, None),
    (0.5, 2, 1, "scale"),       # the scale is named first: it is what makes the next clean step write NaN
    (65536.0, 2, 1, "weights"),
    (None, 0, 1, "momentum"),
    (math.nan, 0, 0, "scale"),  # a scaler whose scale is NaN is collapsed; "no scaler" is None
])
def test_rot_rule_names_the_first_reason(scale, weights, momentum, event):
    assert rot_event(scale, 1.0, weights, momentum) == event


@pytest.mark.parametrize("scale,weight,healthy", [
    (65536.0, 1.0, True), (0.25, 1.0, False), (65536.0, math.inf, False), (None, math.nan, False), (None, 1.0, True),
])
def test_checkpoint_health_applies_the_same_rule(scale, weight, healthy):
    state = {"network_weights": {"w": torch.tensor([weight, 2.0])}, "optimizer_state": {},
             "grad_scaler_state": {"scale": scale} if scale is not None else None}
    assert checkpoint_health(state)["healthy"] is healthy
