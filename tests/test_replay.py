"""The one replay (``geodiag.diagnostics.nonfinite.replay``) tells broken maths (non-finite in fp64) from a dtype's
range (fp32, or fp16 under autocast) from the GradScaler's scale, on a step function and on nnU-Net's own
``train_step``; its classifications are the names of ``schema.REPLAY_CLASSIFICATIONS``."""
import math

import pytest
import torch
from torch import nn

from geodiag.diagnostics.nonfinite.replay import Replay, replay, replay_train_step
from geodiag.losses import GeometricLoss
from geodiag.reports import analysis_report, schema

from test_provenance import disk, pixel_unit_first_moments
from test_reports import analysis_inputs
from test_watch_guard import _batch, _state, stock_trainer  # noqa: F401 - stock_trainer is a fixture

FP32_MAX = float(torch.finfo(torch.float32).max)


class Gain(nn.Module):
    """A one-parameter 'network': its input times a learnable gain, so the replay has weights to cast."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def backward(loss: torch.Tensor) -> torch.Tensor:
    """A training step's end: back-propagate the loss and return it (the replayed step runs its own backward)."""
    loss.backward()
    return loss


def moments_step(model, batch, setting):
    """The deliberately broken pixel-unit moments as the loss, under fp16 autocast on the batch's device as nnU-Net's
    CUDA step runs (finite in fp32: ~2.6e6)."""
    with torch.autocast(batch["probs"].device.type, dtype=torch.float16):
        return backward(pixel_unit_first_moments(model(batch["probs"])).sum() / 1e6)


def _assert_classified(result, name: str) -> None:
    """The classification, and an explanation that opens with that name's meaning in the shared vocabulary."""
    classification, explanation = ((result.classification, result.explanation) if isinstance(result, Replay)
                                   else (result["classification"], result["explanation"]))
    assert classification == name, explanation
    assert explanation.startswith(schema.REPLAY_CLASSIFICATIONS[name])


def _runs(result: Replay) -> dict:
    return {run.setting.name: run for run in result.runs}


# ----------------------------------------------------------------------------- a step function
def test_overflow_only_under_fp16_autocast_is_classified_precision():
    model = Gain()
    result = replay(moments_step, model, {"probs": disk(256, 80.0, 128.0)[None, None]}, autocast=True)
    _assert_classified(result, "precision")
    runs = _runs(result)
    assert list(runs) == ["as-run", "fp32 at loss scale 1", "fp64 at loss scale 1"]
    assert not runs["fp32 at loss scale 1"].nonfinite and not runs["fp64 at loss scale 1"].nonfinite
    report = runs["as-run"].report
    assert report.phase == "forward" and report.op in ("aten.bmm.default", "aten.mm.default")
    assert report.outputs[0].dtype == torch.float16 and report.outputs[0].posinf > 0
    assert "torch.einsum" in report.source
    assert model.gain.dtype == torch.float32 and model.gain.grad is None  # the caller's model is untouched


def test_overflow_of_fp32_alone_is_classified_precision():
    """exp(100) is above fp32's largest value and far below fp64's: the step is finite in fp64 only."""
    assert FP32_MAX < math.exp(100.0) < float(torch.finfo(torch.float64).max)

    def step(model, batch, setting):
        return backward(torch.exp(model(batch["x"])).sum() * 1e-40)

    result = replay(step, Gain(), {"x": torch.full((3,), 100.0)}, autocast=False)
    _assert_classified(result, "precision")
    runs = _runs(result)
    assert list(runs) == ["as-run", "fp64 at loss scale 1"]  # no autocast, no scaler: as run is fp32
    assert runs["as-run"].report.op == "aten.exp.default" and runs["as-run"].report.phase == "forward"
    assert runs["fp64 at loss scale 1"].loss == pytest.approx(3 * math.exp(100.0) * 1e-40)


def test_unprotected_sqrt_in_geometric_loss_is_classified_maths_and_reaches_the_gradients():
    loss = GeometricLoss(stabilizer="additive", eps=0.0, aspect_weight=0.0)

    def step(model, batch, setting):
        with torch.autocast("cpu", dtype=torch.float16):
            return backward(loss(model(batch["probs"]), batch["target"]))

    foreground = disk(64, 12.0, 30.0)
    batch = {"probs": torch.stack([1 - foreground, foreground])[None],
             "target": disk(64, 14.0, 32.0)[None, None].long()}
    result = replay(step, Gain(), batch, autocast=True, loss_module=loss)
    _assert_classified(result, "maths")
    fp64 = _runs(result)["fp64 at loss scale 1"].report
    assert fp64.node == "SqrtBackward0" and fp64.tap == "compactness.sqrt_input"
    assert fp64.inputs[0].dtype == torch.float64
    assert result.as_json()["reaches_parameter_gradients"]


def test_a_masked_nan_is_named_but_does_not_reach_the_gradients():
    """A researcher's NaN masking: log of a negative value, replaced by 0 before the sum; the gradient is finite."""
    def step(model, batch, setting):
        return backward(torch.nan_to_num(torch.log(model(batch["x"])), nan=0.0).sum())

    result = replay(step, Gain(), {"x": torch.tensor([1.0, -1.0, 2.0])}, autocast=False)
    _assert_classified(result, "maths")
    assert _runs(result)["as-run"].report.op == "aten.log.default"
    assert result.as_json()["reaches_parameter_gradients"] is False
    assert result.as_json()["runs"][0]["nonfinite_parameter_gradients"] == 0


def test_a_finite_step_is_not_reproduced():
    result = replay(lambda model, batch, setting: backward(model(batch["x"]).square().sum()), Gain(),
                    {"x": torch.ones(3)}, autocast=True)
    _assert_classified(result, "not-reproduced")
    assert all(run.report is None and not run.nonfinite for run in result.runs)


@pytest.mark.parametrize("where", ["batch", "weights"])
def test_nan_already_in_the_inputs_is_non_finite_input_without_running(where):
    calls = []
    model, x = Gain(), torch.tensor([1.0, 2.0])
    with torch.no_grad():
        (x if where == "batch" else model.gain).fill_(math.nan)
    result = replay(lambda m, b, s: calls.append(1), model, {"x": x, "keys": ["case_1"]}, autocast=False)
    _assert_classified(result, "non-finite-input")
    assert result.explanation.endswith("in x" if where == "batch" else "in gain")
    assert calls == [] and result.runs == () and result.as_json()["reaches_parameter_gradients"] is None


def test_a_step_that_returns_no_one_element_loss_is_replay_failed():
    result = replay(lambda model, batch, setting: batch["x"] * 2, Gain(), {"x": torch.ones(3)}, autocast=False)
    assert result.classification == "replay-failed" and "one-element" in result.explanation
    assert result.runs == ()


# ----------------------------------------------------------------------------- nnU-Net's own train_step
def test_a_scaled_loss_overflowing_fp32_is_classified_scaler(stock_trainer):  # noqa: F811
    """nnU-Net's train_step with a GradScaler("cpu") at scale 2^100 and Dice+CE (of order 1) times 1e12: within
    fp32 at scale 1, Inf once scaled (1e12 x 2^100 = 1.3e42 is above fp32's 3.4e38). The live scaler, weights and
    momentum are left as they were."""
    assert 1e12 < FP32_MAX < 1e12 * 2.0 ** 100
    dice_ce = stock_trainer.loss
    stock_trainer.loss = lambda output, target: dice_ce(output, target) * 1e12
    stock_trainer.grad_scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)
    network, optimizer, before = stock_trainer.network, stock_trainer.optimizer, _state(stock_trainer)

    result = replay_train_step(stock_trainer, stock_trainer.train_step, _batch(stock_trainer))
    _assert_classified(result, "scaler")
    runs = {run["setting"]: run for run in result["runs"]}
    assert list(runs) == ["as-run", "fp32 at loss scale 1", "fp64 at loss scale 1"]  # the CPU step has no autocast
    assert runs["as-run"]["op"] == "mul" and runs["as-run"]["phase"] == "forward"
    assert not runs["fp32 at loss scale 1"]["nonfinite"] and not runs["fp64 at loss scale 1"]["nonfinite"]
    assert (stock_trainer.network, stock_trainer.optimizer, stock_trainer.grad_scaler) == (network, optimizer, scaler)
    assert scaler.get_scale() == 2.0 ** 100
    assert all(torch.equal(old, new) for old, new in zip(before, _state(stock_trainer)))


def test_a_healthy_nnunet_step_is_not_reproduced(stock_trainer):  # noqa: F811
    result = replay_train_step(stock_trainer, stock_trainer.train_step, _batch(stock_trainer))
    _assert_classified(result, "not-reproduced")
    assert [run["nonfinite"] for run in result["runs"]] == [False, False]
    assert result["reaches_parameter_gradients"] is False


def test_a_train_step_that_raises_is_replay_failed_and_the_trainer_is_restored(stock_trainer):  # noqa: F811
    def raising(output, target):
        raise RuntimeError("shape mismatch in my loss")

    stock_trainer.loss = raising
    network, optimizer = stock_trainer.network, stock_trainer.optimizer
    result = replay_train_step(stock_trainer, stock_trainer.train_step, _batch(stock_trainer))
    assert result == {"classification": "replay-failed", "explanation": "RuntimeError: shape mismatch in my loss",
                      "reaches_parameter_gradients": None, "runs": []}
    assert (stock_trainer.network, stock_trainer.optimizer) == (network, optimizer)


def test_a_nan_in_the_batch_is_non_finite_input_naming_it(stock_trainer):  # noqa: F811
    batch = _batch(stock_trainer)
    batch["data"][0, 0, 3, 4] = math.nan
    result = replay_train_step(stock_trainer, stock_trainer.train_step, batch)
    _assert_classified(result, "non-finite-input")
    assert result["explanation"].endswith("in data") and result["runs"] == []


# ----------------------------------------------------------------------------- the analysis report reads the names
def test_the_analysis_report_gives_each_replayed_pass_its_classification_and_meaning(tmp_path):
    analysis_inputs(tmp_path, provenance=[
        {"pass": "patches", "phase": "backward", "op": "aten.div.Tensor", "node": "SqrtBackward0", "module": None,
         "tap": "compactness.sqrt_input", "message": "0 / 0", "classification": "maths", "explanation": "..."}])
    markdown = analysis_report.render(tmp_path).markdown.read_text()
    assert "| backward | aten.div.Tensor | SqrtBackward0 |" in markdown and "| maths |" in markdown
    assert f"- **maths**: {schema.REPLAY_CLASSIFICATIONS['maths']}" in markdown
    assert f"**{schema.REPLAY_SCALER}**" not in markdown  # only the names that occur are explained
