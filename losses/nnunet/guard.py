"""One guard for any nnU-Net trainer instance: skip a non-finite step, stop when the training state rots.

Why a wrapper and not a base class: the researcher's own trainer (a ``train_step`` override found through
``nnUNet_extTrainer``) must get the same protection as geodiag's trainers without being edited. ``StepGuard.wrap``
replaces, on one trainer *instance*, ``train_step``, ``on_train_start``, ``on_epoch_end`` and ``save_checkpoint``
with thin wrappers around the class's own methods, and registers an optimizer step pre-hook.

Per step the guard needs the loss and the gradient norm. A trainer that knows them hands them over with
``observe`` (geodiag's trainers do); while ``start_capture()``'s patches are in place (``geodiag watch``) the guard
takes them itself: ``torch.Tensor.backward`` records its root (the loss, scaled under a GradScaler) and
``torch.nn.utils.clip_grad_norm_`` the norm it returns. Without a clip call the pre-hook computes the norm.

The skip: the pre-hook stacks the step's numbers and reads them in one transfer (the only host read the guard
adds); when the loss or the gradient norm is not finite it sets every ``p.grad`` to None, which makes SGD (and
every torch optimizer) leave that parameter and its momentum untouched for the step. A GradScaler that found inf
skips ``optimizer.step`` itself; the guard then reads the numbers after ``train_step`` returns, and the scaler's
``update`` has halved the scale.

The stops (``TrainingStateCorrupted``, logged, naming the last good checkpoint; nothing is saved after it): a
GradScaler scale below ``scale_floor`` or whose fp32 inverse is inf (checked on every read), and NaN/Inf in any
weight or momentum buffer (checked at the start of training, at each epoch end before nnU-Net saves, and in the
pre-hook every ``check_state_every`` steps when set).

This module imports torch, numpy and nnU-Net only: ``geodiag.losses`` never imports ``geodiag.diagnostics``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .patches import PatchGroup, patch
from .state_health import (DEFAULT_SCALE_FLOOR, ROT_EVENTS, momentum_buffers, nonfinite_flags, nonfinite_names,
                           rot_event, state_tensors)

GUARD_ATTRIBUTE = "step_guard"


class TrainingStateCorrupted(RuntimeError):
    """Training was stopped because its state can no longer give a good model (collapsed GradScaler, non-finite
    values it must not go on with). nnU-Net's run_training does not catch it, so ``nnUNetv2_train`` exits with it."""


@dataclass
class StepRecord:
    """What the guard knows about one guarded step, on the host after its read: the one record of a step that the
    trainers, ``geodiag watch`` and its files share.

    ``event``: None, or what made the step bad: "loss", "gradient" (a non-finite loss, gradient norm, or gradient
    left by any backward of the step, even one the trainer never clipped or stepped), "scale" (a collapsed
    GradScaler), "weights" or "momentum" (non-finite state found by the pre-hook scan).
    ``skipped_by``: who kept the optimizer from stepping: "guard" (this guard, on an event), "scaler" (a GradScaler
    that found inf and backed off its scale) or "trainer" (the trainer's own code returned without a step); "" when
    the optimizer stepped.
    """

    iteration: int
    loss: float = math.nan
    grad_norm: float = math.nan
    scale: float = math.nan
    skipped_by: str = ""
    optimizer_stepped: bool = False
    state_checked: bool = False
    nonfinite_weights: int = 0
    nonfinite_momentum: int = 0
    event: Optional[str] = None
    extra: list = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        """The guard or the GradScaler skipped the optimizer step (what a trainer's own skip is kept apart from)."""
        return self.skipped_by in ("guard", "scaler")


class StepGuard:
    """The guard of one trainer instance (see the module docstring). Use ``StepGuard.wrap(trainer)``."""

    def __init__(self, trainer, *, scale_floor: float = DEFAULT_SCALE_FLOOR, check_state_every: int = 0) -> None:
        self.trainer = trainer
        self.scale_floor = scale_floor
        self.check_state_every = check_state_every
        self.skips = {"guard": 0, "scaler": 0, "trainer": 0}  # steps without an optimizer step, by who skipped
        self.iteration = 0
        self.last_good_checkpoint: Optional[str] = None
        # objects with before_step(guard, batch), after_step(guard, batch, result) and step_aborted(guard) (the
        # trainer's train_step raised)
        self.listeners: list = []
        self.record: Optional[StepRecord] = None
        self.neutralise_all = False  # inside replaying(): every optimizer step becomes a no-op
        self._in_step = False
        self._loss: Optional[torch.Tensor] = None
        self._norm: Optional[torch.Tensor] = None
        self._backward_norm: Optional[torch.Tensor] = None
        self._scale_before: Optional[torch.Tensor] = None
        self._extra: Sequence[torch.Tensor] = ()
        self._read = False
        self._hooked_optimizer = None
        self._hook = None
        self._patches = PatchGroup()
        self._originals: dict[str, Callable] = {}

    @property
    def skipped_steps(self) -> int:
        """Steps the guard or the GradScaler skipped (the trainer's own skips are ``skips["trainer"]``)."""
        return self.skips["guard"] + self.skips["scaler"]

    @property
    def original_train_step(self) -> Callable[[dict], dict]:
        """The trainer's own train_step (its class's, bound), without the guard around it."""
        return self._originals["train_step"]

    # ------------------------------------------------------------------ installation
    @classmethod
    def wrap(cls, trainer, *, capture: bool = False, **options) -> "StepGuard":
        """The trainer's guard, created and installed on the instance if it has none; with ``capture``, a new guard
        also captures (``start_capture``) until ``unwrap``."""
        guard = getattr(trainer, GUARD_ATTRIBUTE, None)
        if isinstance(guard, cls):
            if options.get("check_state_every"):
                guard.check_state_every = options["check_state_every"]
            return guard
        guard = cls(trainer, **options)
        setattr(trainer, GUARD_ATTRIBUTE, guard)
        for name in ("train_step", "on_train_start", "on_epoch_end", "save_checkpoint"):
            handle = guard._patches.add(patch(trainer, name, getattr(guard, f"_wrapped_{name}")))
            guard._originals[name] = handle.replaced
        if capture:
            guard._patches.add(guard.start_capture())
        return guard

    def start_capture(self) -> PatchGroup:
        """Until the returned group is removed: the loss from ``Tensor.backward`` and the norm from
        ``clip_grad_norm_`` (process-wide replacements that act only inside this guard's steps)."""
        backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
        guard = self

        def capturing_backward(tensor, *args, **kwargs):
            if guard._in_step and tensor.numel() == 1:
                guard._loss = tensor.detach()
            result = backward(tensor, *args, **kwargs)
            if guard._in_step:  # what this backward left in the gradients, before any clip, step or zero_grad
                norm = _gradient_norm(guard._hooked_optimizer)
                if norm is not None:
                    guard._backward_norm = norm if guard._backward_norm is None \
                        else torch.maximum(guard._backward_norm, norm)
            return result

        def capturing_clip(*args, **kwargs):
            norm = clip(*args, **kwargs)
            if guard._in_step:
                guard._norm = norm
            return norm

        return PatchGroup([patch(torch.Tensor, "backward", capturing_backward),
                           patch(torch.nn.utils, "clip_grad_norm_", capturing_clip)])

    def unwrap(self) -> None:
        """Put back the trainer's own methods; the optimizer hook and the trainer's guard go too."""
        self._patches.remove()
        if self._hook is not None:
            self._hook.remove()
            self._hook = self._hooked_optimizer = None
        if getattr(self.trainer, GUARD_ATTRIBUTE, None) is self:
            delattr(self.trainer, GUARD_ATTRIBUTE)

    # ------------------------------------------------------------------ per step
    def observe(self, loss: Optional[torch.Tensor] = None, grad_norm: Optional[torch.Tensor] = None,
                extra: Sequence[torch.Tensor] = ()) -> None:
        """Hand over this step's loss and gradient norm (device tensors), and scalars to read in the same
        transfer (``host_values()`` returns them)."""
        if loss is not None:
            self._loss = loss.detach()
        if grad_norm is not None:
            self._norm = grad_norm
        self._extra = tuple(extra)

    def host_values(self) -> list[float]:
        """The ``extra`` values of ``observe``, read now if the pre-hook has not read them yet."""
        self._read_now(pre_step=False)
        return self.record.extra

    @contextlib.contextmanager
    def replaying(self):
        """Inside: a fresh step record, every optimizer step a no-op (gradients dropped), nothing counted; the
        live step's record is restored afterwards. For re-running a step's ``train_step`` code."""
        saved = (self.record, self._read, self._loss, self._norm, self._backward_norm, self._scale_before,
                 self._extra)
        self._begin_step()
        self.neutralise_all = True
        try:
            yield
        finally:
            self.neutralise_all = self._in_step = False
            (self.record, self._read, self._loss, self._norm, self._backward_norm, self._scale_before,
             self._extra) = saved

    def _begin_step(self) -> None:
        optimizer = getattr(self.trainer, "optimizer", None)
        if optimizer is not None and optimizer is not self._hooked_optimizer:
            if self._hook is not None:
                self._hook.remove()
            self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
            self._hooked_optimizer = optimizer
        self._loss = self._norm = self._backward_norm = None
        scale = self._scaler_scale()
        if scale is not None:
            self._scale_before = scale.detach().clone().reshape(())
        else:  # a GradScaler creates its scale tensor at its first scale(): until then it is its initial scale
            scaler = getattr(self.trainer, "grad_scaler", None)
            enabled = scaler is not None and scaler.is_enabled()
            self._scale_before = torch.tensor(float(scaler._init_scale)) if enabled else None
        self._extra = ()
        self._read = False
        self.record = StepRecord(self.iteration)
        self._in_step = True

    def _wrapped_train_step(self, batch: dict) -> dict:
        self._begin_step()
        for listener in self.listeners:
            listener.before_step(self, batch)
        try:
            result = self._originals["train_step"](batch)
        except BaseException:
            for listener in self.listeners:
                listener.step_aborted(self)
            raise
        finally:
            self._in_step = False
        self._read_now(pre_step=False)
        if self.record.skipped_by:
            self.skips[self.record.skipped_by] += 1
        for listener in self.listeners:
            listener.after_step(self, batch, result)
        self.iteration += 1
        if self.record.event in ROT_EVENTS:
            self.stop(self.describe_event())
        return result

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self.neutralise_all:
            self._drop_gradients(optimizer)
            return
        if not self._in_step:
            return
        self.record.optimizer_stepped = True
        self._read_now(pre_step=True)
        if self.record.event is not None:
            self.record.skipped_by = "guard"
            self._drop_gradients(optimizer)

    @staticmethod
    def _drop_gradients(optimizer) -> None:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None

    def _scaler_scale(self) -> Optional[torch.Tensor]:
        scaler = getattr(self.trainer, "grad_scaler", None)
        return getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None

    def _read_now(self, pre_step: bool) -> None:
        """The guard's one host read of the step: loss, norms, scale (before and now), optional state scan and
        ``extra``."""
        if self._read or self.record is None:
            return
        self._read = True
        record, trainer = self.record, self.trainer
        device = _device_of(trainer)
        nan = torch.full((), math.nan, device=device)
        norm = self._norm
        if norm is None and pre_step:
            norm = _gradient_norm(self._hooked_optimizer)
        scale = self._scaler_scale()
        check_state = pre_step and self.check_state_every and self.iteration % self.check_state_every == 0
        optional = [self._loss, norm, scale, self._scale_before, self._backward_norm]
        values = [v.reshape(()) if v is not None else nan for v in optional] + list(self._extra)
        if check_state:
            values += list(_state_flags(trainer.network, self._hooked_optimizer, device))
        host = torch.stack([v.detach().to(device, torch.float64).reshape(()) for v in values]).cpu().tolist()
        record.loss, record.grad_norm, record.scale, scale_before, backward_norm = host[:5]
        record.extra = host[5:5 + len(self._extra)]
        if norm is None and self._backward_norm is not None:
            record.grad_norm = backward_norm  # never clipped nor stepped: the norm its backward left
        if check_state:
            record.state_checked = True
            record.nonfinite_weights, record.nonfinite_momentum = (int(v) for v in host[-2:])
        if not pre_step:  # no optimizer step happened: the scaler backed off, or the trainer's code returned early
            backed_off = scale is not None and record.scale < scale_before
            record.skipped_by = "scaler" if backed_off else "trainer"
        backward_bad = self._backward_norm is not None and not math.isfinite(backward_norm)
        norm_bad = (norm is not None or self._backward_norm is not None) and not math.isfinite(record.grad_norm)
        self._classify(record, loss_known=self._loss is not None, gradient_bad=backward_bad or norm_bad)

    def _classify(self, record: StepRecord, loss_known: bool, gradient_bad: bool) -> None:
        """What made the step bad. A step the GradScaler skipped is counted but is no event: skipping overflowing
        steps is its job; only when its scale collapses is the run in trouble."""
        if record.skipped_by == "scaler":
            pass
        elif loss_known and not math.isfinite(record.loss):
            record.event = "loss"
        elif gradient_bad:
            record.event = "gradient"
        scale = None if math.isnan(record.scale) else record.scale  # NaN: no scaler enabled
        rot = rot_event(scale, self.scale_floor, record.nonfinite_weights, record.nonfinite_momentum)
        if rot is not None:
            record.event = rot

    def describe_event(self) -> str:
        record = self.record
        if record.event == "scale":
            return (f"GradScaler scale {record.scale:.3g} is below the floor {self.scale_floor:g} or its inverse is "
                    "inf in fp32 (too many skipped steps: once 1/scale is inf, the next finite step is unscaled "
                    "to NaN)")
        if record.event in ("weights", "momentum"):
            count = record.nonfinite_weights if record.event == "weights" else record.nonfinite_momentum
            return f"non-finite values in {count} {record.event} tensors before step {record.iteration}"
        return (f"non-finite {record.event} in step {record.iteration} (loss {record.loss:.6g}, gradient norm "
                f"{record.grad_norm:.6g})")

    # ------------------------------------------------------------------ rot stop around nnU-Net's hooks
    def _wrapped_on_train_start(self) -> None:
        self._originals["on_train_start"]()
        self.check_state("at the start of training (a resumed checkpoint's state)")

    def _wrapped_on_epoch_end(self) -> None:
        self.check_state(f"after epoch {self.trainer.current_epoch}")  # before nnU-Net saves latest/best
        self._originals["on_epoch_end"]()

    def _wrapped_save_checkpoint(self, filename: str) -> None:
        self._originals["save_checkpoint"](filename)
        if self.trainer.local_rank == 0 and not self.trainer.disable_checkpointing:
            self.last_good_checkpoint = filename

    def stop(self, reason: str) -> None:
        """Log why training stops and raise; nothing is saved after this."""
        trainer = self.trainer
        last = self.last_good_checkpoint or "none (no checkpoint was written before)"
        message = (f"geodiag stopped training in epoch {trainer.current_epoch}: {reason}. No checkpoint was written "
                   f"from this state; the last good one is {last}")
        trainer.print_to_log_file(message)
        raise TrainingStateCorrupted(message)

    def check_state(self, when: str) -> None:
        """One device-side scan of every weight and momentum buffer and one read; names them only if bad."""
        named = nonfinite_names(state_tensors(self.trainer.network, self.trainer.optimizer))
        if named:
            self.stop(f"non-finite values {when} in {len(named)} tensors (first: {', '.join(named[:3])})")


def _device_of(trainer) -> torch.device:
    network = getattr(trainer, "network", None)
    parameter = next(network.parameters(), None) if network is not None else None
    return parameter.device if parameter is not None else torch.device(getattr(trainer, "device", "cpu"))


def _gradient_norm(optimizer) -> Optional[torch.Tensor]:
    """The 2-norm over every gradient of the optimizer's parameters (as clip_grad_norm_ computes it)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None] \
        if optimizer is not None else []
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]), 2.0)


def _state_flags(network, optimizer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Device counts of weight and momentum tensors holding NaN/Inf."""
    parameters = list(network.parameters())
    return (nonfinite_flags(parameters, device).sum(),
            nonfinite_flags(momentum_buffers(parameters, optimizer), device).sum())
