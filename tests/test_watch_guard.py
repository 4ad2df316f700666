"""StepGuard on a stock nnUNetTrainer instance (nnU-Net's own train_step, no override): it captures the loss and
the clip norm itself, a non-finite step leaves weights and an existing SGD momentum bit-identical, and unwrap puts
back everything it replaced."""
from __future__ import annotations

import math

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from geodiag.losses.nnunet.guard import GUARD_ATTRIBUTE, StepGuard


@pytest.fixture
def stock_trainer(tiny_dataset_502):
    trainer = nnUNetTrainer(tiny_dataset_502.load_plans(), tiny_dataset_502.configuration, 0,
                            tiny_dataset_502.load_dataset_json(), torch.device("cpu"))
    trainer.initialize()
    return trainer


def _batch(trainer) -> dict:
    generator = torch.Generator().manual_seed(0)
    h, w = trainer.configuration_manager.patch_size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) <= (h / 4) ** 2).float()[None, None].repeat(2, 1, 1, 1)
    data = 2 * label + torch.randn(label.shape, generator=generator)
    targets = [label[..., ::round(1 / s[0]), ::round(1 / s[1])] for s in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets}


def _state(trainer) -> list[torch.Tensor]:
    weights = [p.detach().clone() for p in trainer.network.parameters()]
    momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values() if "momentum_buffer" in s]
    return weights + momentum


def test_guard_skips_a_stock_step_with_a_nan_gradient_keeping_weights_and_momentum(stock_trainer):
    backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    guard = StepGuard.wrap(stock_trainer, capture=True)
    batch = _batch(stock_trainer)

    stock_trainer.train_step(batch)  # a good step: momentum buffers now exist
    good = guard.record
    assert good.event is None and not good.skipped and math.isfinite(good.grad_norm)
    assert math.isfinite(good.loss)
    before = _state(stock_trainer)
    assert len(before) > len(list(stock_trainer.network.parameters()))  # momentum for every trained parameter

    dice_ce = stock_trainer.loss
    stock_trainer.loss = lambda output, target: dice_ce(output, target) * torch.tensor(math.nan)
    stock_trainer.train_step(batch)
    bad = guard.record
    assert bad.event == "loss" and bad.skipped and math.isnan(bad.grad_norm) and guard.skipped_steps == 1
    for old, new in zip(before, _state(stock_trainer)):
        assert torch.equal(old, new)

    # what nnU-Net's train_step does without the guard, for contrast: NaN in every weight
    guard.unwrap()
    assert torch.Tensor.backward is backward and torch.nn.utils.clip_grad_norm_ is clip
    assert "train_step" not in vars(stock_trainer) and not hasattr(stock_trainer, GUARD_ATTRIBUTE)
    stock_trainer.train_step(batch)
    assert all(not torch.isfinite(p).all() for p in stock_trainer.network.parameters() if p.grad is not None)


def test_guard_computes_the_norm_when_the_trainer_never_clips(stock_trainer, monkeypatch):
    """A train_step without clip_grad_norm_: the pre-hook takes the 2-norm over the gradients itself."""
    seen = {}

    def no_clip(parameters, max_norm):  # stands in for a trainer that does not clip: it only looks
        grads = [p.grad for p in parameters if p.grad is not None]
        seen["norm"] = float(torch.linalg.vector_norm(torch.cat([g.double().ravel() for g in grads])))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clip)
    guard = StepGuard.wrap(stock_trainer, capture=True)
    stock_trainer.train_step(_batch(stock_trainer))
    guard.unwrap()
    assert guard.record.grad_norm == pytest.approx(seen["norm"], rel=1e-5)
    assert not guard.record.skipped
