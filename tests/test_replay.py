"""replay() tells broken maths (non-finite in fp64) from benign low-precision overflow (fp16 only)."""
import pytest
import torch
from torch import nn

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.nonfinite.replay import Precision, replay
from geodiag.losses import GeometricLoss

from test_provenance import disk, pixel_unit_first_moments


class Gain(nn.Module):
    """A one-parameter 'network': probabilities times a learnable gain, so the replay has weights to cast."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs * self.gain


def moments_step(model, batch, precision):
    """Network forward + the deliberately broken pixel-unit moments as the loss (finite in fp32: ~2.6e6)."""
    return pixel_unit_first_moments(model(batch)).sum() / 1e6


def test_overflow_only_under_fp16_autocast_is_classified_low_precision():
    model = Gain()
    result = replay(moments_step, disk(256, 80.0, 128.0)[None, None], model=model, original="fp16")
    assert result.verdict == "low-precision"
    assert [r.precision.name for r in result.runs] == ["fp16", "fp32", "fp64"]
    assert result.run("fp32").finite and result.run("fp64").finite
    report = result.reports["fp16"]
    assert report.phase == "forward" and report.op in ("aten.bmm.default", "aten.mm.default")
    assert report.outputs[0].dtype == torch.float16 and report.outputs[0].posinf > 0
    assert "torch.einsum" in report.source
    assert model.gain.dtype == torch.float32 and model.gain.grad is None  # the caller's model is untouched


def test_loss_scale_overflow_is_classified_low_precision():
    def step(model, batch, precision):
        return model(batch).sum() * 1e34  # finite in fp32 (3.4e38 max), Inf once scaled by 65536

    result = replay(step, torch.ones(4), model=Gain(), original="fp32@65536")
    assert result.verdict == "low-precision"
    assert result.run("fp32@65536").report.op == "aten.mul.Tensor"


def test_unprotected_sqrt_in_geometric_loss_is_classified_maths():
    loss = GeometricLoss(stabilizer="additive", eps=0.0, aspect_weight=0.0)
    target = disk(64, 14.0, 32.0)[None, None].long()

    def step(model, batch, precision):
        return loss(model(batch["probs"]), batch["target"])

    foreground = disk(64, 12.0, 30.0)
    batch = {"probs": torch.stack([1 - foreground, foreground])[None], "target": target}
    result = replay(step, batch, model=Gain(), original="fp16", loss=loss)
    assert result.verdict == "maths"
    fp64 = result.reports["fp64"]
    assert fp64.node == "SqrtBackward0" and fp64.tap == "compactness.sqrt_input"
    assert fp64.inputs[0].dtype == torch.float64


def test_finite_batch_is_not_reproduced():
    result = replay(lambda model, batch, precision: model(batch).square().sum(), torch.ones(3), model=Gain())
    assert result.verdict == "not-reproduced"
    assert all(run.report is None for run in result.runs)


def test_nan_already_in_the_batch_is_reported_as_non_finite_input_without_running():
    calls = []
    result = replay(lambda model, batch, precision: calls.append(1), torch.tensor([1.0, float("nan")]))
    assert result.verdict == "non-finite-input" and "batch[0]" in result.explanation
    assert calls == [] and result.runs == ()


@pytest.mark.parametrize("spec", ["fp8", "fp16@zero", "fp32@-1", "fp16@inf"])
def test_bad_precision_spec_is_a_geodiag_error(spec):
    with pytest.raises(GeodiagError):
        Precision.parse(spec)


def test_step_fn_must_return_a_one_element_loss():
    with pytest.raises(GeodiagError, match="one-element"):
        replay(lambda model, batch, precision: batch * 2, torch.ones(3))
