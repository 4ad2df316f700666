"""nnUNetTrainerGeometric: the non-finite step guard, the warm-up switch and the per-epoch logging keys."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometric


@pytest.fixture
def trainer(tiny_dataset_502):
    trainer = nnUNetTrainerGeometric(tiny_dataset_502.load_plans(), tiny_dataset_502.configuration, 0,
                                     tiny_dataset_502.load_dataset_json(), torch.device("cpu"))
    trainer.initialize()
    return trainer


def _batch(trainer, batch_size: int = 2) -> dict:
    """Noisy bright disks with nnU-Net's deep-supervision targets (nearest downsampling)."""
    generator = torch.Generator().manual_seed(0)
    h, w = trainer.configuration_manager.patch_size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) <= (h / 4) ** 2).float()[None, None].repeat(batch_size, 1, 1, 1)
    data = 2 * label + torch.randn(label.shape, generator=generator)
    targets = [label[..., ::round(1 / s[0]), ::round(1 / s[1])] for s in trainer._get_deep_supervision_scales()]
    return {"data": data, "target": targets}


def _weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.network.parameters()]


def _poison_gradient(trainer):
    """Make the loss's gradient with respect to the full-resolution logits infinite (the loss stays finite)."""
    dice_ce = trainer.loss

    def loss(output, target):
        output[0].register_hook(lambda grad: torch.full_like(grad, math.inf))
        return dice_ce(output, target)

    trainer.loss = loss
    return dice_ce


def _nan_loss(trainer):
    dice_ce = trainer.loss
    trainer.loss = lambda output, target: dice_ce(output, target) + torch.tensor(math.nan)
    return dice_ce


@pytest.mark.parametrize("inject", [_nan_loss, _poison_gradient], ids=["nan-loss", "inf-gradient"])
def test_guard_skips_a_nonfinite_step_and_weights_stay_untouched(trainer, inject):
    batch = _batch(trainer)
    before = _weights(trainer)
    dice_ce = inject(trainer)
    result = trainer.train_step(batch)
    assert result["skipped"] == 1.0 and trainer.skipped_steps == 1
    for old, new in zip(before, trainer.network.parameters()):
        assert torch.equal(old, new.detach())
        assert new.grad is None
    assert not trainer.optimizer.state, "a skipped step must not create SGD momentum"

    trainer.loss = dice_ce
    result = trainer.train_step(batch)
    assert result["skipped"] == 0.0 and trainer.skipped_steps == 1
    after = _weights(trainer)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(old, new) for old, new in zip(before, after))


def test_without_the_guard_an_infinite_gradient_turns_weights_nan(trainer):
    """The failure the guard prevents: nnU-Net's own CPU train_step lets clip_grad_norm_ and SGD write NaN."""
    _poison_gradient(trainer)
    nnUNetTrainer.train_step(trainer, _batch(trainer))
    assert any(not torch.isfinite(p).all() for p in trainer.network.parameters())


def test_guard_still_updates_the_grad_scaler_on_a_skipped_step(trainer):
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    batch = _batch(trainer)
    dice_ce = _poison_gradient(trainer)
    assert trainer.train_step(batch)["skipped"] == 1.0
    assert trainer.grad_scaler.get_scale() == 512.0
    trainer.loss = dice_ce
    before = _weights(trainer)
    assert trainer.train_step(batch)["skipped"] == 0.0
    assert trainer.grad_scaler.get_scale() == 512.0
    assert any(not torch.equal(old, new.detach()) for old, new in zip(before, trainer.network.parameters()))


def test_geometric_term_switches_on_at_the_warmup_epoch(trainer):
    infos = []
    trainer.on_train_step_end = infos.append
    batch = _batch(trainer)

    trainer.current_epoch = trainer.warmup_epochs - 1
    assert not trainer.geometric_active
    before = trainer.train_step(batch)
    assert infos[-1]["geometric"] == {}
    assert np.isnan(before["train_geometric"]) and np.isnan(before["train_compactness"])
    assert before["loss"] == pytest.approx(before["train_dc_ce"])

    trainer.current_epoch = trainer.warmup_epochs
    assert trainer.geometric_active
    after = trainer.train_step(batch)
    info = infos[-1]
    assert set(info["geometric"]) == {"compactness", "aspect"}
    terms = sum(float(v) for v in info["geometric"].values())
    assert after["train_geometric"] == pytest.approx(terms, rel=1e-5)
    assert after["train_compactness"] > 0 and np.isfinite(after["train_aspect"])
    assert float(info["loss"]) == pytest.approx(float(info["dc_ce"]) + terms, rel=1e-5)
    assert info["output"].shape[-2:] == info["target"].shape[-2:] == batch["data"].shape[-2:]
    assert info["grad_scaler"] is None and info["skipped"] is False and torch.isfinite(info["grad_norm"])


def test_each_epoch_logs_every_geometric_key_exactly_once(trainer):
    batch = _batch(trainer)
    logging = trainer.logger.local_logger.my_fantastic_logging
    keys = ["train_dc_ce", "train_geometric", "train_compactness", "train_aspect", "grad_norm_max",
            "geometric_active", "skipped_steps"]

    trainer.current_epoch = 0
    warmup = [trainer.train_step(batch) for _ in range(2)]
    trainer.on_train_epoch_end(warmup)
    trainer.current_epoch = trainer.warmup_epochs
    active = [trainer.train_step(batch)]
    _nan_loss(trainer)
    active.append(trainer.train_step(batch))
    trainer.on_train_epoch_end(active)

    for key in keys:
        assert len(logging[key]) == 2, key
    assert logging["geometric_active"] == [False, True]
    assert logging["skipped_steps"] == [0, 1]
    assert np.isnan(logging["train_geometric"][0]) and np.isnan(logging["train_aspect"][0])
    assert logging["train_dc_ce"][0] == pytest.approx(np.mean([o["train_dc_ce"] for o in warmup]))
    assert np.isfinite(logging["train_geometric"][1]) and logging["train_geometric"][1] > 0
    # nnU-Net's convention kept: one NaN step makes the epoch mean NaN (the skipped count says why).
    assert np.isnan(logging["train_dc_ce"][1]) and np.isnan(logging["train_losses"][1])
