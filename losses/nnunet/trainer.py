"""nnU-Net trainers that add GeometricLoss to Dice+CE after a warm-up, with a guard against non-finite steps and a
stop, before anything poisoned is saved, when the training state rots (collapsed GradScaler, NaN/Inf weights or momentum).

Found by ``nnUNetv2_train -tr NAME`` through the shim folder ``geodiag/losses/nnunet_ext`` in
``nnUNet_extTrainer`` (``eval "$(geodiag env)"``). Settings are class attributes, because nnU-Net rebuilds a
trainer from its base ``__init__`` signature; variants are tiny subclasses, like nnU-Net's own.
"""
from __future__ import annotations

import json
from os.path import join
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from ..geometric_loss import GeometricLoss
from .guard import StepGuard
from .state_health import DEFAULT_SCALE_FLOOR

CLIP_NORM = 12.0


class GeometricProgressLogger(LocalLogger):
    """nnU-Net's local logger, plus ``progress_geometric.png`` beside ``progress.png`` with the geometric keys."""

    def __init__(self, base: LocalLogger, term_keys: tuple[str, ...]) -> None:
        super().__init__(base.verbose)
        self.my_fantastic_logging = base.my_fantastic_logging
        self.term_keys = term_keys

    def plot_progress_png(self, output_folder: str) -> None:
        super().plot_progress_png(output_folder)
        import matplotlib.pyplot as plt

        log = self.my_fantastic_logging
        epochs = min(len(values) for values in log.values())
        x = list(range(epochs))
        fig, (losses, guard) = plt.subplots(2, 1, figsize=(16, 14))
        losses.plot(x, log["train_losses"][:epochs], color="b", lw=3, label="loss_tr (total)")
        losses.plot(x, log["train_dc_ce"][:epochs], color="c", lw=2, ls="--", label="Dice+CE (train)")
        losses.plot(x, log["val_losses"][:epochs], color="r", lw=3, label="loss_val (Dice+CE)")
        terms = losses.twinx()
        for key, color in zip(("train_geometric",) + self.term_keys, ("k", "m", "g", "y")):
            terms.plot(x, log[key][:epochs], color=color, ls=":", lw=3, marker="o", label=key)
        losses.set_xlabel("epoch")
        losses.set_ylabel("loss")
        terms.set_ylabel("geometric terms (blank: warm-up)")
        losses.legend(loc="upper left")
        terms.legend(loc="upper right")
        skipped = log["skipped_steps"][:epochs]
        guard.bar(x, skipped, color="r", alpha=0.5, label="skipped steps")
        guard.set_ylim(0, max([1, *skipped]))
        norms = guard.twinx()
        norms.plot(x, log["grad_norm_max"][:epochs], color="b", lw=2, label="max grad norm (before clip)")
        guard.set_xlabel("epoch")
        guard.set_ylabel("skipped steps")
        norms.set_ylabel("grad norm")
        guard.legend(loc="upper left")
        norms.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(join(output_folder, "progress_geometric.png"))
        plt.close(fig)


class nnUNetTrainerGeometric(nnUNetTrainer):
    """Dice+CE with deep supervision, plus GeometricLoss on the full-resolution output after ``warmup_epochs``.

    Settings (class attributes; subclass to change them): ``geometric_preset`` (a GeometricLoss preset),
    ``compactness_weight``, ``aspect_weight``, ``geometric_reference`` ("target" or "prior"), ``warmup_epochs``
    (epochs 0 .. warmup_epochs-1 are plain Dice+CE), ``save_every_epoch``.

    Guard (``geodiag.losses.nnunet.guard.StepGuard``, the same wrapper ``geodiag watch`` puts on any trainer): a
    step whose loss or gradient norm (clip_grad_norm_'s return, after GradScaler.unscale_) is not finite gets no
    optimizer step (its gradients are dropped), the GradScaler is still updated (so it halves its scale on CUDA),
    and it is counted in ``self.skipped_steps``. Without it, nnU-Net's CPU path writes NaN into every weight and
    the SGD momentum. The one host sync per step is the guard's, before the optimizer step: all per-step values
    are stacked and read together, and the skip decision and the logged values come from that copy.

    Rot stop (the guard's): a GradScaler whose scale is below ``grad_scale_floor`` or whose inverse is inf in fp32
    (read with the step's values), and NaN/Inf in any weight or SGD momentum buffer (one device-side scan and one
    sync at the start of training and at each epoch end, before nnU-Net saves), stop training with
    ``TrainingStateCorrupted``: the message goes to the log and names the last good checkpoint; no checkpoint
    (latest, best, final, per-epoch) is written from the poisoned state.

    Logged once per epoch (nnU-Net's logger and ``progress_geometric.png``): ``train_dc_ce``, ``train_geometric``,
    ``train_<term>`` for each weighted term (its contribution, weight * mean, so they sum to train_geometric; NaN
    while ``geometric_active`` is False), ``geometric_active``, ``skipped_steps`` and ``grad_norm_max``.
    ``train_losses`` stays nnU-Net's epoch mean of the total; ``val_losses`` stays plain Dice+CE.

    Extension points for monitors (subclass and override):
      - ``self.geometric_loss``: the GeometricLoss (register taps on it).
      - ``self.geometric_active``: whether the geometric term is on in the current epoch.
      - ``on_train_step_end(info)``: called at the end of every ``train_step`` with device tensors, not synced:
        ``loss`` (total), ``dc_ce``, ``geometric`` ({term: contribution}, empty before warm-up), ``grad_norm``
        (clip's return), ``skipped`` (bool), ``grad_scaler`` (or None on CPU), ``output`` (full-resolution
        logits, detached), ``target`` (full-resolution label map).

    Per-epoch checkpoints (``save_every_epoch``): ``checkpoint_epoch_{E:04d}.pth`` holds the state after epoch E
    (E counted from 0, like nnU-Net's log; its ``current_epoch`` key is E + 1, the epoch a resume would start).
    The geometric term was active during epoch E exactly when E >= warmup_epochs: checkpoint_epoch_{warmup-1} is
    the last pure Dice+CE state, checkpoint_epoch_{warmup} the first trained with the term. It is written after
    nnU-Net's own end-of-epoch bookkeeping, so its logging lists are complete (a resume from it stays aligned).
    ``geometric_settings.json`` in the fold folder records the settings in effect.
    """

    geometric_preset: str = "production"
    compactness_weight: float = 1.0
    aspect_weight: float = 1.0
    geometric_reference: str = "target"
    warmup_epochs: int = 20
    save_every_epoch: bool = False
    grad_scale_floor: float = DEFAULT_SCALE_FLOOR

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} needs softmax (label) training; region-based datasets are "
                               "not supported")
        self.geometric_loss = GeometricLoss.from_preset(
            self.geometric_preset, classes=tuple(self.label_manager.foreground_labels),
            compactness_weight=self.compactness_weight, aspect_weight=self.aspect_weight,
            reference=self.geometric_reference, softmax=True)
        self.geometric_weights = {term: float(weight) for term, weight in self.geometric_loss.term_weights().items()
                                  if weight > 0}
        self._step_terms: dict[str, torch.Tensor] = {}
        self._term_tap = self.geometric_loss.register_tap(
            self._record_term, names=[f"{term}.term" for term in self.geometric_weights])
        self._term_keys = tuple(f"train_{term}" for term in self.geometric_weights)
        self._epoch_keys = ("train_dc_ce", "train_geometric") + self._term_keys + ("grad_norm_max",)
        local = GeometricProgressLogger(self.logger.local_logger, self._term_keys)
        for key in self._epoch_keys + ("geometric_active", "skipped_steps"):
            local.my_fantastic_logging[key] = []
        self.logger.local_logger = local
        self.step_guard = StepGuard.wrap(self, scale_floor=self.grad_scale_floor)

    @property
    def skipped_steps(self) -> int:
        """Steps the guard skipped so far."""
        return self.step_guard.skipped_steps

    @property
    def last_good_checkpoint(self) -> Optional[str]:
        """The last checkpoint written from a good state (None before the first)."""
        return self.step_guard.last_good_checkpoint

    # ------------------------------------------------------------------ settings
    @property
    def geometric_active(self) -> bool:
        """True from epoch ``warmup_epochs`` on (epochs count from 0)."""
        return self.current_epoch >= self.warmup_epochs

    def geometric_settings(self) -> dict:
        """The geometric settings in effect, as recorded next to the checkpoints."""
        return {"trainer": type(self).__name__, "geometric_preset": self.geometric_preset,
                "stabilizer": self.geometric_loss.stabilizer.name, "eps": self.geometric_loss.stabilizer.eps,
                "aspect_formula": self.geometric_loss.aspect_formula, "sobel": self.geometric_loss.sobel,
                "classes": list(self.geometric_loss.classes),
                "weights": self.geometric_weights, "reference": self.geometric_reference,
                "warmup_epochs": self.warmup_epochs, "save_every_epoch": self.save_every_epoch}

    def _record_term(self, name: str, per_image: torch.Tensor) -> None:
        term = name.split(".")[0]
        self._step_terms[term] = self.geometric_weights[term] * per_image.detach().mean()

    # ------------------------------------------------------------------ hooks into nnU-Net's loop
    def on_train_start(self) -> None:
        super().on_train_start()
        settings = self.geometric_settings()
        self.print_to_log_file("geodiag geometric settings:", settings)
        with open(join(self.output_folder, "geometric_settings.json"), "w") as handle:
            json.dump(settings, handle, indent=2)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        state = "on" if self.geometric_active else f"off (warm-up until epoch {self.warmup_epochs})"
        self.print_to_log_file(f"geometric term {state}")

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        self._step_terms = {}
        active = self.geometric_active
        # Autocast on CUDA only, as nnU-Net does (CPU autocast is slow, MPS rejects it).
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            dc_ce = self.loss(output, target)
            full_output = output[0] if self.enable_deep_supervision else output
            full_target = target[0] if self.enable_deep_supervision else target
            if active:
                geometric = self.geometric_loss(full_output, full_target)
                total = dc_ce + geometric
            else:
                geometric = None
                total = dc_ce

        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), CLIP_NORM)

        terms = dict(self._step_terms) if active else {}
        per_step = [total, dc_ce, grad_norm]
        if geometric is not None:
            per_step += [geometric] + [terms[term] for term in self.geometric_weights]
        self.step_guard.observe(loss=total, grad_norm=grad_norm, extra=per_step)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)  # the guard's pre-hook drops the gradients of a bad step
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        values = np.asarray(self.step_guard.host_values())
        skipped = self.step_guard.record.skipped

        self.on_train_step_end({"loss": total.detach(), "dc_ce": dc_ce.detach(), "geometric": terms,
                                "grad_norm": grad_norm, "skipped": skipped, "grad_scaler": self.grad_scaler,
                                "output": full_output.detach(), "target": full_target})
        inactive = np.full(1 + len(self.geometric_weights), np.nan)
        geometric_values = values[3:] if geometric is not None else inactive
        return {"loss": values[0], "train_dc_ce": values[1], "grad_norm": values[2],
                "train_geometric": geometric_values[0], "skipped": float(skipped),
                **{f"train_{term}": geometric_values[1 + i] for i, term in enumerate(self.geometric_weights)}}

    def on_train_step_end(self, info: dict) -> None:
        """Called at the end of every train_step with device tensors (see the class docstring); no-op here."""

    def on_train_epoch_end(self, train_outputs: List[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        epoch = self.current_epoch
        for key in self._epoch_keys:
            if key == "grad_norm_max":
                values = self._gathered(outputs["grad_norm"])
                finite = values[np.isfinite(values)]
                value = float(finite.max()) if finite.size else float("nan")
            else:
                value = float(np.mean(self._gathered(outputs[key])))
            self.logger.log(key, value, epoch)
        self.logger.log("skipped_steps", int(self._gathered(outputs["skipped"]).sum()), epoch)
        self.logger.log("geometric_active", bool(self.geometric_active), epoch)

    def _gathered(self, values) -> np.ndarray:
        """Per-step values of this epoch from every DDP rank (this rank's alone without DDP)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not self.is_ddp:
            return values
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        return np.concatenate(gathered)

    def on_epoch_end(self) -> None:
        last = {key: self.logger.get_value(key, step=-1) for key in self._epoch_keys + ("skipped_steps",)}
        geometric = "off"
        if self.geometric_active:
            geometric = " ".join(f"{key} {last[key]:.6g}" for key in ("train_geometric",) + self._term_keys)
        self.print_to_log_file(f"train Dice+CE {last['train_dc_ce']:.4f}, geometric {geometric}, "
                               f"skipped steps {last['skipped_steps']}")
        finished = self.current_epoch
        super().on_epoch_end()
        if self.save_every_epoch:
            # super() incremented current_epoch; save_checkpoint stores current_epoch + 1, so step back as
            # nnU-Net's on_train_end does, to record the epoch that just finished.
            self.current_epoch = finished
            self.save_checkpoint(join(self.output_folder, f"checkpoint_epoch_{finished:04d}.pth"))
            self.current_epoch = finished + 1



class nnUNetTrainerGeometricQuick(nnUNetTrainerGeometric):
    """A few-second CPU run for tests and the demo: 6 epochs of 4 + 2 iterations, warm-up 2, no final validation."""

    warmup_epochs = 2
    save_every_epoch = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 6
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """Skipped: the full sliding-window validation would dominate a run this short."""
        self.print_to_log_file("final validation skipped (quick trainer)")


class nnUNetTrainerGeometricV23(nnUNetTrainerGeometric):
    """Replays the seed's V2.3: sqrt(clamp(min=1e-4)) and tr^2 - 4 det, switched on after 5 epochs."""

    geometric_preset = "v2.3"
    warmup_epochs = 5


class nnUNetTrainerGeometricV24(nnUNetTrainerGeometric):
    """Replays the seed's V2.4 "fix": the clamp raised to 1e-2, switched on after 5 epochs."""

    geometric_preset = "v2.4"
    warmup_epochs = 5


class nnUNetTrainerGeometricV23Quick(nnUNetTrainerGeometricQuick):
    """The V2.3 replay at the quick trainer's size (warm-up 2)."""

    geometric_preset = "v2.3"


class nnUNetTrainerGeometricV24Quick(nnUNetTrainerGeometricQuick):
    """The V2.4 replay at the quick trainer's size (warm-up 2)."""

    geometric_preset = "v2.4"
