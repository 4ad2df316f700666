"""Recorder: forward values and backward gradients of the loss's taps, the logits and a network; the sqrt's dead
zone and eps fractions against independent counts; the schedule; detaching; no host sync while recording."""
import math

import pytest
import torch
from torch import nn

from geodiag.diagnostics.instruments.histograms import decade_grid
from geodiag.diagnostics.instruments.recorder import Recorder, sqrt_summary
from geodiag.losses import GeometricLoss
from shapes import disk
from geodiag.diagnostics.instruments.host_sync import HostReadDetector


def _uncertain_logits(batch: int = 2, n: int = 64, seed: int = 0) -> torch.Tensor:
    """[B, 2, n, n] logits of a soft disk plus noise: s spreads over many decades, like an early epoch."""
    generator = torch.Generator().manual_seed(seed)
    foreground = disk(14.0, n=n, centre=(31.7, 32.2), softness=2.0).float().repeat(batch, 1, 1, 1)
    signed = 3.0 * (2 * foreground - 1) + 0.7 * torch.randn(batch, 1, n, n, generator=generator)
    return torch.cat([-signed / 2, signed / 2], dim=1).requires_grad_(True)


def _rows(recorder: Recorder) -> dict:
    return {(row["name"], row["kind"]): row for row in recorder.snapshot()}


def _capture(loss: GeometricLoss, name: str) -> dict:
    """An independent tap: keeps the tensor and its gradient for the test's own counts."""
    seen = {}

    def tap(_, tensor):
        seen["value"] = tensor.detach().clone()
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: seen.__setitem__("grad", grad.clone()))

    loss.register_tap(tap, names=[name])
    return seen


@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_clamp_dead_zone_equals_the_fraction_of_s_below_eps(eps):
    loss = GeometricLoss(stabilizer="clamp", eps=eps, reference="prior", aspect_weight=0.0, softmax=True)
    seen = _capture(loss, "compactness.grad_mag_squared")
    recorder = Recorder()
    recorder.attach_loss(loss)
    loss(_uncertain_logits()).backward()

    rows = _rows(recorder)
    s = seen["value"].double()
    below = (s < eps).double().mean().item()
    assert 0.01 < below < 0.99  # the constructed case exercises both sides of the clamp
    assert rows[("compactness.grad_mag_squared", "grad")]["zero_fraction"] == below
    assert sqrt_summary(recorder.snapshot())[0]["dead_zone_fraction"] == below


def test_shifted_sqrt_has_no_dead_zone():
    loss = GeometricLoss(stabilizer="shifted", eps=1e-2, reference="prior", aspect_weight=0.0, softmax=True)
    recorder = Recorder()
    recorder.attach_loss(loss)
    loss(_uncertain_logits()).backward()
    assert _rows(recorder)[("compactness.grad_mag_squared", "grad")]["zero_fraction"] == 0.0


def test_fraction_of_s_below_each_eps_matches_an_independent_count():
    loss = GeometricLoss.from_preset("v2.3", reference="prior", softmax=True)
    seen = _capture(loss, "compactness.grad_mag_squared")
    recorder = Recorder()
    recorder.attach_loss(loss)
    loss(_uncertain_logits()).backward()
    row = _rows(recorder)[("compactness.grad_mag_squared", "value")]
    s = seen["value"].double()
    for eps in decade_grid():
        assert row[f"below_{eps:g}"] == (s < eps).double().mean().item()


def test_local_derivative_is_half_inverse_sqrt_of_the_sqrt_input():
    eps = 1e-4
    loss = GeometricLoss(stabilizer="clamp", eps=eps, reference="prior", aspect_weight=0.0, softmax=True)
    seen = _capture(loss, "compactness.sqrt_input")
    recorder = Recorder()
    recorder.attach_loss(loss)
    loss(_uncertain_logits()).backward()
    row = _rows(recorder)[("compactness.sqrt_input", "local_derivative")]
    x = seen["value"].double()
    # The clamp's floor bounds the derivative: its maximum is exactly 1 / (2 sqrt(eps)) = 50.
    assert row["max"] == pytest.approx(0.5 / math.sqrt(eps), rel=1e-6)
    assert row["min"] == pytest.approx((0.5 / x.max().sqrt()).item(), rel=1e-6)
    assert row["count"] == x.numel()


def test_unprotected_sqrt_shows_an_infinite_local_derivative_where_s_is_zero():
    loss = GeometricLoss(stabilizer="additive", eps=0.0, reference="prior", aspect_weight=0.0)
    seen = _capture(loss, "compactness.grad_mag_squared")
    recorder = Recorder()
    recorder.attach_loss(loss)
    probs = torch.cat([1 - disk(10.0, n=48, centre=(23.6, 24.3)), disk(10.0, n=48, centre=(23.6, 24.3))], 1)
    loss(probs.float().requires_grad_(True)).backward()
    rows = _rows(recorder)
    flat = int((seen["value"] == 0).sum())
    assert flat > 0
    assert rows[("compactness.sqrt_input", "local_derivative")]["posinf"] == flat
    grad = rows[("compactness.grad_mag_squared", "grad")]
    assert grad["posinf"] + grad["neginf"] == flat  # d sqrt(s)/ds = inf at s = 0 (NaN one op later: inf * 0)


def test_logits_gradient_equals_the_autograd_gradient():
    loss = GeometricLoss.from_preset("production", reference="prior", softmax=True)
    logits = _uncertain_logits()
    recorder = Recorder()
    recorder.attach_loss(loss)
    recorder.attach_tensor("logits", logits)
    loss(logits).backward()
    rows = _rows(recorder)
    grad = logits.grad.double()
    row = rows[("logits", "grad")]
    assert (row["count"], row["min"], row["max"]) == (grad.numel(), grad.min().item(), grad.max().item())
    assert row["rms"] == pytest.approx(grad.square().mean().sqrt().item(), rel=1e-9)
    assert rows[("logits", "value")]["max"] == logits.max().item()


def test_only_every_nth_step_is_recorded():
    loss = GeometricLoss.from_preset("production", reference="prior", softmax=True)
    recorder = Recorder(every=3)
    recorder.attach_loss(loss)
    logits = _uncertain_logits()
    for _ in range(7):  # steps 0, 3 and 6 are recorded
        loss(logits).backward()
        recorder.step()
    rows = _rows(recorder)
    assert rows[("loss", "value")]["count"] == 3
    assert rows[("probabilities", "grad")]["count"] == 3 * logits[:, 1].numel()


def test_names_whitelist_limits_what_is_recorded():
    loss = GeometricLoss.from_preset("production", reference="prior", softmax=True)
    recorder = Recorder(names=["loss", "logits"])
    recorder.attach_loss(loss)
    logits = _uncertain_logits()
    recorder.attach_tensor("logits", logits)
    loss(logits).backward()
    assert {name for name, _ in _rows(recorder)} == {"loss", "logits"}


def _inplace_net() -> nn.Module:
    """Conv -> InstanceNorm -> in-place LeakyReLU, the block that breaks register_full_backward_hook."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(0.01, inplace=True),
        nn.Conv2d(4, 2, 3, padding=1),
    )


def test_network_parameter_gradients_and_conv_outputs_are_recorded_with_inplace_activations():
    torch.manual_seed(0)
    net = _inplace_net()
    recorder = Recorder()
    recorder.attach_network(net, conv_outputs=True)
    out = net(torch.randn(2, 1, 16, 16))
    out.square().mean().backward()
    rows = _rows(recorder)
    n_params = sum(p.numel() for p in net.parameters())
    pooled = rows[("network.parameters", "grad")]
    assert pooled["count"] == n_params
    assert pooled["max"] == max(p.grad.max().item() for p in net.parameters())
    assert rows[("network.0", "value")]["count"] == 2 * 4 * 16 * 16
    assert rows[("network.3", "grad")]["count"] == out.numel()


def test_removing_the_attachment_stops_recording():
    loss = GeometricLoss.from_preset("production", reference="prior", softmax=True)
    net = _inplace_net()
    recorder = Recorder()
    with recorder.attach_loss(loss), recorder.attach_network(net):
        pass
    assert not loss.has_taps
    loss(_uncertain_logits()).backward()
    net(torch.randn(1, 1, 8, 8)).sum().backward()
    assert recorder.snapshot() == []


def test_reset_empties_the_snapshot():
    loss = GeometricLoss.from_preset("production", reference="prior", softmax=True)
    recorder = Recorder()
    recorder.attach_loss(loss)
    loss(_uncertain_logits()).backward()
    assert recorder.snapshot()
    recorder.reset()
    assert recorder.snapshot() == []


def test_recording_a_training_step_reads_nothing_back_to_the_host():
    loss = GeometricLoss.from_preset("v2.3", reference="prior", softmax=True)
    net = _inplace_net()
    recorder = Recorder()
    recorder.attach_loss(loss)
    recorder.attach_network(net, conv_outputs=True)
    with HostReadDetector() as detector:
        logits = net(torch.randn(2, 1, 32, 32))
        recorder.attach_tensor("logits", logits)
        loss(logits).backward()
        recorder.step()
    assert detector.seen == []
    assert len(recorder.snapshot()) > 30  # it did record


def test_host_read_detector_catches_item_and_boolean_masks():
    with HostReadDetector() as detector:
        x = torch.ones(3)
        x.sum().item()
        x[x > 0].sum()
    assert "aten::_local_scalar_dense" in detector.seen
    assert "aten::index" in detector.seen


def test_pooled_parameter_gradients_come_once_per_backward_and_skip_unused_parameters():
    torch.manual_seed(1)
    net = _inplace_net()
    unused = nn.Linear(3, 3)  # a head this loss never reaches: no gradient, nothing recorded for it
    model = nn.ModuleDict({"net": net, "unused": unused})
    recorder = Recorder(every=2)
    recorder.attach_network(model)
    grads = []
    for _ in range(3):  # steps 0 and 2 are recorded, step 1 is not
        net.zero_grad(set_to_none=True)
        net(torch.randn(2, 1, 8, 8)).square().mean().backward()
        if recorder.recording:
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double())
        recorder.step()
    pooled = _rows(recorder)[("network.parameters", "grad")]
    every = torch.cat(grads)
    assert pooled["count"] == every.numel() == 2 * sum(p.numel() for p in net.parameters())
    assert (pooled["min"], pooled["max"]) == (every.min().item(), every.max().item())
    assert pooled["sum"] == pytest.approx(every.sum().item(), rel=1e-9)
