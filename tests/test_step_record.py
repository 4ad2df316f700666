"""The one record of a step (``StepGuard``'s ``StepRecord``) on trainers written as researchers write them: who
skipped the optimizer step (the guard, the GradScaler, the trainer's own code), a NaN gradient seen even when the
trainer's own guard abandons the step before clipping or stepping, the clip norm and the scale as they were, and no
event on a healthy run."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from geodiag.losses.nnunet.guard import StepGuard


class LoopTrainer:
    """The attributes and hooks of an nnU-Net trainer a guard wraps, around a small network and SGD."""

    def __init__(self, scaler=None) -> None:
        torch.manual_seed(0)
        self.network = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(), nn.Linear(8, 1))
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        self.grad_scaler = scaler
        self.device = torch.device("cpu")
        self.current_epoch, self.local_rank, self.disable_checkpointing = 0, 0, True
        self.bad_steps: set = set()
        self.step_count = 0

    def loss_of(self, batch):
        loss = self.network(batch).square().mean()
        if self.step_count in self.bad_steps:
            loss = loss + 0.0 * torch.sqrt(loss * 0.0)  # finite forward; sqrt's inf slope at 0 times 0: NaN gradient
        return loss

    def train_step(self, batch):
        self.optimizer.zero_grad()
        loss = self.loss_of(batch)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        self.step_count += 1
        return {"loss": loss.detach().numpy()}

    def on_train_start(self):
        pass

    def on_epoch_end(self):
        pass

    def save_checkpoint(self, filename):
        pass

    def print_to_log_file(self, *args):
        pass


class GuardBeforeClipTrainer(LoopTrainer):
    """A researcher's guard: after backward, any non-finite gradient abandons the step (no clip, no step)."""

    def train_step(self, batch):
        self.optimizer.zero_grad()
        loss = self.loss_of(batch)
        loss.backward()
        self.step_count += 1
        for p in self.network.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                self.optimizer.zero_grad()
                return {"loss": np.float32(0.0)}
        nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        return {"loss": loss.detach().numpy()}


class EveryOtherStepTrainer(LoopTrainer):
    """Steps the optimizer only on even steps (its own accumulation-like condition); nothing is ever non-finite."""

    def train_step(self, batch):
        self.optimizer.zero_grad()
        loss = self.loss_of(batch)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.step_count += 1
        if self.step_count % 2 == 0:
            self.optimizer.step()
        return {"loss": loss.detach().numpy()}


class ScaledTrainer(LoopTrainer):
    """nnU-Net's order under a GradScaler: scale, backward, unscale_, clip, scaler.step, update; an overflow injected
    on the bad steps."""

    def train_step(self, batch):
        self.optimizer.zero_grad()
        loss = self.network(batch).square().mean()
        if self.step_count in self.bad_steps:
            loss = loss * math.inf
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.unscale_(self.optimizer)
        self.norm = nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.step_count += 1
        return {"loss": loss.detach().numpy()}


def _run(trainer, steps: int):
    guard = StepGuard.wrap(trainer, capture=True)
    generator = torch.Generator().manual_seed(1)
    records = []
    try:
        for _ in range(steps):
            trainer.train_step(torch.randn(8, 4, generator=generator))
            records.append(guard.record)
    finally:
        guard.unwrap()
    return guard, records


def test_a_nan_gradient_the_trainers_own_guard_abandons_before_clip_is_an_event_and_a_trainer_skip():
    trainer = GuardBeforeClipTrainer()
    trainer.bad_steps = {2}
    guard, records = _run(trainer, 4)
    assert [r.event for r in records] == [None, None, "gradient", None]
    assert [r.skipped_by for r in records] == ["", "", "trainer", ""]
    assert math.isnan(records[2].grad_norm)  # the norm its backward left, before the trainer's zero_grad
    assert guard.skips == {"guard": 0, "scaler": 0, "trainer": 1} and guard.skipped_steps == 0


def test_a_trainer_that_steps_every_other_step_is_counted_apart_with_no_event():
    guard, records = _run(EveryOtherStepTrainer(), 6)
    assert [r.skipped_by for r in records] == ["trainer", ""] * 3
    assert all(r.event is None for r in records)
    assert guard.skips == {"guard": 0, "scaler": 0, "trainer": 3}


def test_the_guard_skips_a_nan_step_of_a_trainer_without_guards_of_its_own():
    trainer = LoopTrainer()
    trainer.bad_steps = {1}
    guard, records = _run(trainer, 3)
    assert [(r.event, r.skipped_by) for r in records] == [(None, ""), ("gradient", "guard"), (None, "")]
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    assert guard.skips == {"guard": 1, "scaler": 0, "trainer": 0}


def test_a_healthy_trainer_has_no_event_and_no_skip_and_its_norm_is_the_clip_norm():
    trainer = LoopTrainer()
    seen = []
    clip = nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        seen.append(float(clip(*args, **kwargs)))
        return torch.tensor(seen[-1])

    nn.utils.clip_grad_norm_ = recording_clip
    try:
        guard, records = _run(trainer, 4)
    finally:
        nn.utils.clip_grad_norm_ = clip
    assert all(r.event is None and r.skipped_by == "" and r.optimizer_stepped for r in records)
    assert [r.grad_norm for r in records] == pytest.approx(seen, rel=1e-6)
    assert guard.skips == {"guard": 0, "scaler": 0, "trainer": 0}


def test_the_norm_of_a_step_never_clipped_nor_stepped_is_what_its_backward_left():
    class NoClipNoStep(LoopTrainer):
        def train_step(self, batch):
            self.optimizer.zero_grad()
            self.loss_of(batch).backward()
            self.grads = [p.grad.detach().double().numpy().ravel() for p in self.network.parameters()]
            return {}

    trainer = NoClipNoStep()
    _, records = _run(trainer, 1)
    reference = np.sqrt(sum(float(np.sum(g * g)) for g in trainer.grads))  # fp64, numpy
    assert records[0].grad_norm == pytest.approx(reference, rel=1e-5)
    assert records[0].skipped_by == "trainer"


def test_injected_overflows_are_scaler_skips_with_the_scale_history_and_no_event():
    trainer = ScaledTrainer(torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    trainer.bad_steps = {2, 3, 7}
    guard, records = _run(trainer, 10)
    assert {i for i, r in enumerate(records) if r.skipped_by == "scaler"} == trainer.bad_steps
    assert all(r.event is None for r in records)
    halvings = [sum(1 for b in trainer.bad_steps if b <= i) for i in range(10)]
    assert [r.scale for r in records] == [2.0 ** (16 - h) for h in halvings]
    assert guard.skips == {"guard": 0, "scaler": 3, "trainer": 0} and guard.skipped_steps == 3
