"""Training state: GradScaler scale history and skips from a live CPU GradScaler, 1/scale in fp32, clip norms,
non-finite weights and momentum per step and in a checkpoint dict."""
import math

import pytest
import torch
from torch import nn

from geodiag.diagnostics.instruments.errors import GeodiagError
from geodiag.diagnostics.instruments.training_state import TrainingStateRecorder, checkpoint_health
from geodiag.diagnostics.instruments.host_sync import HostReadDetector

FP32_MAX = torch.finfo(torch.float32).max


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(inplace=True), nn.Linear(8, 1))


def _train(steps: int, bad_steps=(), init_scale: float = 2.0 ** 16, use_scaler: bool = True):
    """nnU-Net's step order: scale, backward, unscale_, clip_grad_norm_(12), step, update; then record."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if use_scaler else None
    recorder = TrainingStateRecorder(chunk=4)  # small chunks: the test crosses chunk boundaries
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).square().mean()
        if step in bad_steps:
            loss = loss * math.inf
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        recorder.record(scaler=scaler, grad_norm=norm, model=model, optimizer=optimizer, step=step)
    return recorder, model, optimizer, scaler


def test_skipped_steps_and_scale_history_follow_injected_overflows():
    bad = {2, 3, 7}
    recorder, *_ = _train(10, bad_steps=bad)
    rows = recorder.rows()
    assert [r["step"] for r in rows] == list(range(10))
    assert {r["step"] for r in rows if r["skipped"]} == bad
    halvings = [sum(1 for b in bad if b <= step) for step in range(10)]
    assert [r["scale"] for r in rows] == [2.0 ** (16 - h) for h in halvings]
    assert all(r["grad_norm_finite"] == (r["step"] not in bad) for r in rows)
    summary = recorder.summary()
    assert (summary["skipped_steps"], summary["first_skipped_step"], summary["min_scale"]) == (3, 2, 2.0 ** 13)
    assert summary["first_nonfinite_weights_step"] is None  # the scaler protected the weights


def test_a_collapsed_scale_has_an_infinite_inverse_in_fp32():
    recorder, *_ = _train(2, init_scale=2.9e-39)
    assert 1 / 2.9e-39 > FP32_MAX  # the reference: 3.45e38 is past fp32's 3.40e38
    assert [r["inv_scale_finite"] for r in recorder.rows()] == [False, False]
    assert recorder.summary()["first_inv_scale_inf_step"] == 0


def test_without_a_scaler_one_bad_step_makes_weights_and_momentum_nonfinite_and_names_them():
    recorder, model, *_ = _train(4, bad_steps={1}, use_scaler=False)
    rows = recorder.rows()
    names = [name for name, _ in model.named_parameters()]
    assert rows[0]["nonfinite_weights"] == [] and rows[0]["nonfinite_momentum"] == []
    assert rows[1]["nonfinite_weights"] == names and rows[1]["nonfinite_momentum"] == names
    assert rows[1]["scale"] != rows[1]["scale"] and rows[1]["skipped"] is None  # no scaler: unknown, not False
    assert recorder.summary()["first_nonfinite_weights_step"] == 1


def test_recorded_grad_norm_is_what_clip_grad_norm_returned():
    model = _model()
    recorder = TrainingStateRecorder()
    norms = []
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), 12.0))
        recorder.record(grad_norm=norms[-1], model=model)
    assert [r["grad_norm"] for r in recorder.rows()] == [n.item() for n in norms]


def test_a_huge_finite_weight_is_not_reported_as_nonfinite():
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # its 2-norm overflows fp32; its max-abs norm does not
    recorder = TrainingStateRecorder()
    recorder.record(model=model)
    assert recorder.rows()[0]["nonfinite_weights"] == []


def test_recording_a_step_reads_nothing_back_to_the_host():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99)
    scaler = torch.amp.GradScaler("cpu")
    recorder = TrainingStateRecorder()
    scaler.scale(model(torch.randn(8, 4)).sum()).backward()
    scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), 12.0)
    scaler.step(optimizer)
    scaler.update()
    with HostReadDetector() as detector:
        for _ in range(3):
            recorder.record(scaler=scaler, grad_norm=norm, model=model, optimizer=optimizer)
    assert detector.seen == []
    assert len(recorder.rows()) == 3


# ---------------------------------------------------------------------- checkpoints
def _scaler_state(scale: float) -> dict:
    """What GradScaler.state_dict() returns."""
    return {"scale": scale, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
            "_growth_tracker": 0}


def _checkpoint(model: nn.Module, optimizer, scaler_state) -> dict:
    return {"network_weights": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": scaler_state, "current_epoch": 6, "trainer_name": "nnUNetTrainerGeometric"}


def test_checkpoint_health_counts_and_names_nonfinite_weights_and_momentum():
    _, model, optimizer, _ = _train(2, use_scaler=False)
    with torch.no_grad():
        model[2].weight[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        optimizer.state[model[0].bias]["momentum_buffer"][5] = math.nan
    report = checkpoint_health(_checkpoint(model, optimizer, None))
    assert report["weights"]["nonfinite"] == {"2.weight": {"nan": 1, "inf": 2, "numel": 8}}
    assert report["weights"]["nonfinite_elements"] == 3
    assert report["optimizer"]["nonfinite"] == {"0.bias.momentum_buffer": {"nan": 1, "inf": 0, "numel": 8}}
    assert report["grad_scaler"] is None
    assert report["healthy"] is False


def test_checkpoint_health_of_a_clean_checkpoint_is_healthy():
    _, model, optimizer, scaler = _train(3)
    report = checkpoint_health(_checkpoint(model, optimizer, scaler.state_dict()))
    assert report["healthy"] is True
    assert report["grad_scaler"]["scale"] == 2.0 ** 16
    assert report["weights"]["elements"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale, inverse_finite", [(2.9e-39, False), (3.0e-39, True), (65536.0, True)])
def test_checkpoint_health_checks_the_inverse_scale_in_fp32(scale, inverse_finite):
    assert (1 / scale <= FP32_MAX) == inverse_finite  # the reference, in fp64
    _, model, optimizer, _ = _train(1, use_scaler=False)
    report = checkpoint_health(_checkpoint(model, optimizer, _scaler_state(scale)))["grad_scaler"]
    assert report["inv_scale_finite"] is inverse_finite
    assert report["collapsed"] is (scale < 1.0)


def test_checkpoint_health_treats_an_empty_scaler_state_as_no_scaler():
    _, model, optimizer, _ = _train(1, use_scaler=False)
    assert checkpoint_health(_checkpoint(model, optimizer, {}))["grad_scaler"] is None


@pytest.mark.parametrize("bad", [[1, 2], {"weights": {}}, {"network_weights": 3}])
def test_checkpoint_health_rejects_what_is_not_a_checkpoint(bad):
    with pytest.raises(GeodiagError):
        checkpoint_health(bad)


def test_a_tensor_saved_under_several_names_is_counted_once():
    shared = torch.zeros(4)
    shared[0] = float("nan")
    report = checkpoint_health({"network_weights": {"encoder.w": shared, "decoder.encoder.w": shared,
                                                    "other": torch.ones(2)}})
    assert report["weights"]["nonfinite_elements"] == 1
    assert list(report["weights"]["nonfinite"]) == ["encoder.w"]


def test_a_step_recorded_without_the_parameter_scan_is_marked_unchecked_not_non_finite():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    recorder = TrainingStateRecorder()
    recorder.record(model=net, grad_norm=torch.tensor(1.0), check_parameters=False)
    recorder.record(model=net, grad_norm=torch.tensor(1.0))
    unchecked, checked = recorder.rows()
    assert unchecked["parameters_checked"] is False and unchecked["nonfinite_weights"] == []
    assert checked["parameters_checked"] is True and checked["nonfinite_weights"] == ["weight"]
