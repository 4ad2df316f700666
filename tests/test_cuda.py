"""What only CUDA shows, written once for every device: the CPU runs each test here, CUDA runs it again where
torch sees a GPU (marker ``cuda``; ``.ci/gpu-check`` runs ``pytest -m cuda`` on the GPU machine).

- GeometricLoss forward + backward with every tap recorded makes no host sync: on CUDA torch's own sync debug
  mode is armed ("error": any synchronising call raises), on both devices the aten host-read detector watches.
- nnU-Net's own ``train_step`` with a real GradScaler (on CUDA under nnU-Net's fp16 autocast; on the CPU, where
  nnU-Net runs neither, a GradScaler("cpu") set on the trainer): one injected overflow is skipped by the scaler,
  its scale halves, StepGuard records the skip and the scale and the weights and momentum stay bit-identical;
  overflow on every step collapses the scale, and the guard stops at the overflow its floor names, the weights
  finite and unchanged.
- NaN provenance and replay on the device's tensors: the producer is named as on the CPU.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from geodiag.diagnostics.instruments.host_sync import HostReadDetector
from geodiag.diagnostics.instruments.recorder import Recorder
from geodiag.diagnostics.nonfinite.provenance import NonFiniteProvenance
from geodiag.diagnostics.nonfinite.replay import replay
from geodiag.losses import GeometricLoss
from geodiag.losses.nnunet.guard import GUARD_ATTRIBUTE, StepGuard, TrainingStateCorrupted

from test_provenance import disk, pixel_unit_first_moments
from test_replay import Gain, backward, moments_step
from test_watch_guard import _batch, _state

CUDA_ONLY = [pytest.mark.cuda,
             pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_ONLY)]

# GradScaler's defaults: initial scale 2^16, halved on every step with inf/NaN among the gradients.
INITIAL_SCALE_LOG2 = 16


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Fails the test on any host read inside: the aten detector on every device, plus torch's CUDA sync debug
    mode "error" (it raises at the synchronising call) on CUDA."""
    previous = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
    with HostReadDetector() as detector:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(previous)
    assert detector.seen == []


# ----------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset,shape", [("production", (2, 2, 96, 96)), ("v2.3", (2, 2, 96, 96)),
                                          ("production", (2, 2, 24, 24, 24))])
def test_loss_and_recorder_forward_backward_make_no_host_sync(device, preset, shape):
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator).to(dev)
    target = torch.randint(0, 2, (shape[0], 1, *shape[2:]), generator=generator).to(dev)
    loss = GeometricLoss.from_preset(preset, softmax=True)
    recorder = Recorder()
    recorder.attach_loss(loss)

    def step():  # a fresh leaf per step, as a network's output is
        output = logits.clone().requires_grad_(True)
        recorder.attach_tensor("logits", output)
        loss(output, target).backward()
        recorder.step()

    step()  # first call: kernels cached, histogram buffers allocated (one-time set-up, not per step)
    with no_host_sync(dev):
        step()
    rows = {(row["name"], row["kind"]): row for row in recorder.snapshot()}  # the one read, after the step
    assert rows[("logits", "value")]["count"] == 2 * logits.numel()  # both steps, every element
    assert rows[("logits", "grad")]["count"] == 2 * logits.numel()
    assert rows[("compactness.grad_mag_squared", "value")]["count"] > 0


# ----------------------------------------------------------------------------- GradScaler and StepGuard
@pytest.fixture
def scaled_trainer(request, tiny_dataset_502, monkeypatch):
    """A stock nnUNetTrainer on the device with a real GradScaler (nnU-Net's own on CUDA), not compiled; its
    guard, if a test wrapped one, is unwrapped afterwards (capture patches torch.Tensor.backward globally)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setenv("nnUNet_compile", "f")
    device = torch.device(request.param)
    torch.manual_seed(0)
    trainer = nnUNetTrainer(tiny_dataset_502.load_plans(), tiny_dataset_502.configuration, 0,
                            tiny_dataset_502.load_dataset_json(), device)
    trainer.initialize()
    if device.type == "cpu":
        trainer.grad_scaler = torch.amp.GradScaler("cpu")
    assert trainer.grad_scaler is not None and trainer.grad_scaler.get_scale() == 2.0 ** INITIAL_SCALE_LOG2
    yield trainer
    guard = getattr(trainer, GUARD_ATTRIBUTE, None)
    if guard is not None:
        guard.unwrap()


def _exploding_loss(dice_ce, factor: float):
    """A user's loss that explodes: nnU-Net's Dice+CE times ``factor``."""
    return lambda output, target: dice_ce(output, target) * factor


@pytest.mark.parametrize("scaled_trainer", DEVICES, indirect=True)
def test_an_injected_overflow_is_skipped_the_scale_backs_off_and_the_guard_records_both(scaled_trainer):
    trainer = scaled_trainer
    cuda = trainer.device.type == "cuda"
    guard = StepGuard.wrap(trainer, capture=True)
    batch = _batch(trainer)
    trainer.train_step(batch)  # a clean step: momentum buffers exist
    assert not guard.record.skipped and guard.record.optimizer_stepped
    before = _state(trainer)

    # CUDA: 1e6 keeps the scaled loss finite in fp32 (about 1e11) while the gradient reaching nnU-Net's fp16
    # output overflows fp16 (65504): the overflow GradScaler exists for. CPU: no fp16 here, so the loss itself
    # overflows fp32 once scaled.
    dice_ce = trainer.loss
    trainer.loss = _exploding_loss(dice_ce, 1e6 if cuda else 1e38)
    trainer.train_step(batch)
    bad = guard.record
    assert bad.skipped and not bad.optimizer_stepped and bad.event is None  # the scaler's skip is no event
    assert guard.skipped_steps == 1
    assert bad.scale == trainer.grad_scaler.get_scale() == 2.0 ** (INITIAL_SCALE_LOG2 - 1)
    if cuda:
        assert math.isfinite(bad.loss)  # the scaled loss was finite: the overflow happened in fp16 only
    for old, new in zip(before, _state(trainer)):
        assert torch.equal(old, new)

    trainer.loss = dice_ce
    trainer.train_step(batch)
    good = guard.record
    assert good.optimizer_stepped and not good.skipped and good.event is None
    assert good.scale == 2.0 ** (INITIAL_SCALE_LOG2 - 1)  # regrows only after 2000 clean steps
    assert guard.skipped_steps == 1


# Consecutive overflows halve 2^16 each step: below the default floor 1 at the 17th (2^-1); with no floor the fp32
# inverse 2^128 overflows (fp32's largest value is just below 2^128) at the 144th (2^-128), where GradScaler
# would unscale the next finite step to inf/NaN.
# The CPU runs the default floor only: 144 nnU-Net steps are too slow for the shared CPU machine.
@pytest.mark.parametrize("scaled_trainer,floor,stopping_overflow", [
    pytest.param("cpu", 1.0, 17, id="cpu-floor1"),
    pytest.param("cuda", 1.0, 17, id="cuda-floor1", marks=CUDA_ONLY),
    pytest.param("cuda", 0.0, 144, id="cuda-nofloor", marks=CUDA_ONLY)], indirect=["scaled_trainer"])
def test_overflow_on_every_step_collapses_the_scale_and_the_guard_stops_before_nan_reaches_the_weights(
        scaled_trainer, floor, stopping_overflow):
    trainer = scaled_trainer
    guard = StepGuard.wrap(trainer, capture=True, scale_floor=floor)
    batch = _batch(trainer)
    trainer.train_step(batch)
    before = _state(trainer)
    trainer.loss = _exploding_loss(trainer.loss, math.inf)  # every step's scaled loss and gradients are inf or NaN, whatever the scale
    overflows = 0
    with pytest.raises(TrainingStateCorrupted, match="GradScaler scale"):
        while overflows < 200:
            overflows += 1
            trainer.train_step(batch)
    assert overflows == stopping_overflow
    assert guard.record.event == "scale" and guard.skipped_steps == stopping_overflow
    assert guard.record.scale <= 2.0 ** (INITIAL_SCALE_LOG2 - stopping_overflow)  # 0 if the device flushes it
    for old, new in zip(before, _state(trainer)):
        assert torch.isfinite(new).all() and torch.equal(old, new)


# ----------------------------------------------------------------------------- provenance and replay
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sync", ["step", "op"])
def test_provenance_names_the_sqrt_backward_on_the_device(device, sync):
    x = torch.zeros(3, device=device, requires_grad=True)
    with NonFiniteProvenance(sync=sync) as prov:
        torch.sqrt(x * x).sum().backward()
    report = prov.report()
    assert report is not None and report.produced and report.phase == "backward"
    assert (report.node, report.forward_op, report.op) == ("SqrtBackward0", "aten.sqrt.default", "aten.div.Tensor")
    assert "torch.sqrt(x * x)" in report.source
    assert torch.isnan(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_provenance_names_the_fp16_einsum_under_the_devices_autocast(device):
    probs = disk(256, 80.0, 128.0)[None, None].to(device)
    with NonFiniteProvenance(sync="op") as prov:
        with torch.autocast(device, dtype=torch.float16):
            moments = pixel_unit_first_moments(probs)
    report = prov.report()
    assert not torch.isfinite(moments).all()
    assert report is not None and report.produced and report.phase == "forward"
    assert report.op in ("aten.bmm.default", "aten.mm.default")
    assert "torch.einsum" in report.source
    assert report.outputs[0].dtype == torch.float16 and report.outputs[0].posinf == 2  # both (y, x) sums


@pytest.mark.parametrize("device", DEVICES)
def test_replay_tells_fp16_overflow_from_maths_on_the_device(device):
    model = Gain().to(device)
    result = replay(moments_step, model, {"probs": disk(256, 80.0, 128.0)[None, None].to(device)}, autocast=True)
    assert result.classification == "precision"
    as_run, fp32, fp64 = result.runs
    assert not fp32.nonfinite and not fp64.nonfinite
    assert as_run.report.outputs[0].dtype == torch.float16
    assert model.gain.device.type == torch.device(device).type and model.gain.grad is None

    loss = GeometricLoss(stabilizer="additive", eps=0.0, aspect_weight=0.0)  # a bare sqrt: NaN at s = 0
    foreground = disk(64, 12.0, 30.0)
    batch = {"probs": torch.stack([1 - foreground, foreground])[None].to(device),
             "target": disk(64, 14.0, 32.0)[None, None].long().to(device)}

    def step(m, b, setting):
        with torch.autocast(device, dtype=torch.float16):
            return backward(loss(m(b["probs"]), b["target"]))

    maths = replay(step, Gain().to(device), batch, autocast=True, loss_module=loss)
    assert maths.classification == "maths"
    fp64_report = maths.runs[-1].report
    assert fp64_report.node == "SqrtBackward0" and fp64_report.tap == "compactness.sqrt_input"
