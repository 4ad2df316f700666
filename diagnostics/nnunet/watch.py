"""``geodiag watch``: run ``nnUNetv2_train`` in process with any trainer nnU-Net resolves, guarded and recorded, and
make its first non-finite step explain itself.

Why at run time on the instance: the researcher's trainer (found through ``nnUNet_extTrainer``, a ``train_step``
override) must run unchanged. ``run_watched`` patches ``nnunetv2.run.run_training.get_trainer_from_args`` for the
duration of the run, so nnU-Net's own entry point parses the arguments, resolves and builds the trainer, and
``Watch`` is attached to the instance it returns: the ``StepGuard`` (with ``capture``: the loss from
``Tensor.backward``, the norm from ``clip_grad_norm_``), plus recording.

Always on, per step: loss (the value ``train_step`` returns), the other scalars it returns (per-term values where
the trainer exposes them), gradient norm, GradScaler scale, skip; read by the guard's one host read. Every
``every`` steps, the first step of every epoch and the first after the loss's composition changed (a term turned on):
the histograms of the network's output, its parameter gradients and the GeometricLoss taps (when the trainer has
a ``geometric_loss``), recorded by ``Recorder``; every ``every`` steps the weight and momentum finiteness (in the
same read). Steps that abandon the optimizer step in the trainer's own code are counted apart
(``skipped_by_trainer``); a non-finite gradient left by any backward is an event even then. The sampled steps also
run ``step_checks`` (masked values, swallowed errors, the ``--loss`` prior's share), kept by ``sampled_findings``. Written into ``<fold>/geodiag_watch/`` at each epoch end:
``iterations_epoch_XXXX.csv`` and ``histograms_epoch_XXXX.json`` (the rows of a stopped epoch are written too).

On the first bad step (see ``StepGuard``): the step's batch and pre-step state go to ``step_<iteration>/`` and
``last_good.pth``; after ``train_step`` has returned, the step is replayed (``nonfinite.replay``) and
``first_nonfinite.json``/``.md`` are written; then training stops (``TrainingStateCorrupted``) or, with
``on_nonfinite="skip"``, the step stays skipped and training goes on.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from geodiag.losses import GeometricLoss
from geodiag.losses.nnunet.guard import GUARD_ATTRIBUTE, StepGuard, TrainingStateCorrupted
from geodiag.losses.nnunet.patches import PatchGroup, patch
from geodiag.losses.nnunet.state_health import ROT_EVENTS
from geodiag.reports import schema

from ..instruments.errors import ArgumentError, GeodiagError
from ..instruments.recorder import Recorder
from ..nonfinite.loss_spec import UserLoss, load_loss
from ..nonfinite.replay import replay_train_step
from . import first_nonfinite, saved_step
from .sampled_findings import MASKED_FILE, SampledFindings
from .step_checks import StepChecks
from .watch_tensorboard import TensorBoardSink, summary_writer_class

WATCH_FOLDER = "geodiag_watch"
LAST_GOOD = "last_good.pth"
LOGITS = "logits"
ON_NONFINITE = ("stop", "skip")
ON_MASKED = ("report", "stop")
ROW_FIELDS = ("epoch", "iteration", "loss", "grad_norm", "skipped", "skipped_by_trainer", "event", "scale",
              "state_checked", "nonfinite_weight_tensors", "nonfinite_momentum_tensors")


@dataclass(frozen=True)
class WatchOptions:
    """``every``: histograms and the weight/momentum scan every N iterations; ``per_parameter``: one gradient
    histogram per parameter instead of one pooled; ``conv_outputs``: also every convolution's output and gradient."""

    every: int = 16
    on_nonfinite: str = "stop"
    on_masked: str = "report"
    tensorboard: Optional[str] = None
    per_parameter: bool = False
    conv_outputs: bool = False
    loss: Optional[str] = None
    loss_input: str = "probabilities"


def skip_summary(skips: dict) -> str:
    """'k skipped steps (guard g, GradScaler s, the trainer's own code t)': never 0 while any kind skipped."""
    total = sum(skips.values())
    return (f"{total} skipped steps (by the guard {skips['guard']}, the GradScaler {skips['scaler']}, the trainer's "
            f"own code {skips['trainer']})")


class Watch:
    """Attached to one trainer instance by ``attach``; a listener of its StepGuard."""

    def __init__(self, trainer, options: WatchOptions, progress: Callable[[str], None] = print,
                 prior: Optional[UserLoss] = None) -> None:
        self.trainer = trainer
        self.options = options
        self.progress = progress
        self.recorder = Recorder(every=options.every)
        self.guard: Optional[StepGuard] = None
        self.folder: Optional[Path] = None
        self.first: Optional[dict] = None  # first_nonfinite.json's document, once written
        self.rows: list[dict] = []
        self.stopped: Optional[str] = None  # the stop message, when training was stopped
        self.checks = StepChecks(prior)
        self.findings = SampledFindings(prior.spec if prior is not None else None, progress)
        self._pre_step: dict = {}
        self._handles: list = []
        self._replaying = False
        self._originals: dict = {}
        self._patches = PatchGroup()
        self._owns_guard = False
        self._epoch_start = 0
        self._recorded: list[int] = []  # iterations of this epoch whose histograms were recorded
        self._composition: Optional[frozenset] = None  # the loss terms the last step reported as on
        self._tensorboard = TensorBoardSink(options.tensorboard) if options.tensorboard else None

    def attach(self) -> "Watch":
        # geodiag's trainers bring their own guard: it stays when the watch goes
        self._owns_guard = not isinstance(getattr(self.trainer, GUARD_ATTRIBUTE, None), StepGuard)
        self.guard = StepGuard.wrap(self.trainer, check_state_every=self.options.every)
        self.guard.listeners.append(self)
        self._patches.add(self.guard.start_capture())
        for name in ("on_train_start", "on_train_epoch_end"):
            self._originals[name] = self._patches.add(patch(self.trainer, name, getattr(self, f"_{name}"))).replaced
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.recorder.detach()
        self._patches.remove()
        if self.guard is not None:
            self.guard.listeners.remove(self)
            if self._owns_guard:
                self.guard.unwrap()
        if self._tensorboard is not None:
            self._tensorboard.close()

    # ------------------------------------------------------------------ nnU-Net's hooks
    def _on_train_start(self) -> None:
        self._originals["on_train_start"]()
        self.start()

    def start(self) -> None:
        """Start recording into ``<output_folder>/geodiag_watch`` (nnU-Net's on_train_start calls it; the trainer
        must be initialised: network and optimizer built)."""
        trainer = self.trainer
        self.folder = Path(trainer.output_folder) / WATCH_FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.guard.iteration = trainer.current_epoch * trainer.num_iterations_per_epoch
        self._epoch_start = self.guard.iteration
        self.recorder.step(self.guard.iteration, record=True)
        loss = getattr(trainer, "geometric_loss", None)
        if isinstance(loss, GeometricLoss):
            self.recorder.attach_loss(loss)
        self.recorder.attach_network(trainer.network, per_parameter=self.options.per_parameter,
                                     conv_outputs=self.options.conv_outputs)
        self._handles.append(trainer.network.register_forward_hook(self._on_network_output))
        self.progress(f"geodiag watch: {type(trainer).__name__}, histograms every {self.options.every} iterations, "
                      f"non-finite steps: {self.options.on_nonfinite}; writing {self.folder}")

    def _on_network_output(self, module, inputs, output) -> None:
        if module.training and not self._replaying:  # a replay's forward is not a training step
            full = output[0] if isinstance(output, (list, tuple)) else output
            self.recorder.attach_tensor(LOGITS, full)
            if self.checks.active:
                self.checks.on_output(full)

    def _on_train_epoch_end(self, outputs) -> None:
        self._originals["on_train_epoch_end"](outputs)
        self.flush()

    # ------------------------------------------------------------------ per step (StepGuard listener)
    def before_step(self, guard: StepGuard, batch: dict) -> None:
        scaler = getattr(self.trainer, "grad_scaler", None)
        enabled = scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None
        self._pre_step = {"rng": torch.get_rng_state(),
                          "scale": scaler._scale.clone() if enabled else None,
                          "growth": scaler._growth_tracker.clone() if enabled else None}
        if self.recorder.recording:
            self.checks.begin()

    def step_aborted(self, guard: StepGuard) -> None:
        """The trainer's train_step raised: leave the sampled step's taps."""
        self.checks.abort()

    def after_step(self, guard: StepGuard, batch: dict, result) -> None:
        record = guard.record
        row = {"epoch": self.trainer.current_epoch, "iteration": record.iteration,
               "loss": _scalar(result.get("loss")) if isinstance(result, dict) else None,
               "grad_norm": record.grad_norm, "skipped": int(record.skipped),
               "skipped_by_trainer": int(record.skipped_by == "trainer"), "event": record.event or "",
               "scale": record.scale, "state_checked": int(record.state_checked),
               "nonfinite_weight_tensors": record.nonfinite_weights if record.state_checked else "",
               "nonfinite_momentum_tensors": record.nonfinite_momentum if record.state_checked else ""}
        if row["loss"] is None:  # a train_step that returns no loss: the root of its backward (scaled under a scaler)
            row["loss"] = record.loss
        returned = {key: _scalar(value) for key, value in result.items() if key not in row
                    and _scalar(value) is not None} if isinstance(result, dict) else {}
        row.update(returned)
        if self.checks.active:
            found = self.checks.end(torch.tensor(record.loss), batch)
            row.update(self.findings.add_step(found, record.iteration, self.trainer.current_epoch))
        self.rows.append(row)
        if self._tensorboard is not None:
            self._tensorboard.scalars(row)
        self._schedule_histograms(record.iteration, returned)
        if record.iteration % self.options.every == 0 or record.event:
            self.progress(f"geodiag watch: epoch {row['epoch']} iteration {row['iteration']} loss {row['loss']:.4g} "
                          f"grad norm {row['grad_norm']:.4g} {skip_summary(guard.skips)}"
                          + (f" NON-FINITE {record.event}" if record.event else ""))
        if record.event and self.first is None:
            self._explain(guard, batch)
        if record.event in ("loss", "gradient") and self.options.on_nonfinite == "stop":
            self.flush()
            guard.stop(f"{guard.describe_event()}; see {self.folder / first_nonfinite.JSON_FILE}")
        if record.event in ROT_EVENTS:
            self.flush()
        if row.get("masked_nonfinite") and self.options.on_masked == "stop":
            self.flush()
            masked = self.findings.masked[-1]
            guard.stop(f"non-finite values hidden from the loss in step {record.iteration} ({masked['op']} at "
                       f"{masked['site']}); see {self.folder / MASKED_FILE}")

    def _schedule_histograms(self, iteration: int, returned: dict) -> None:
        """Histograms of the next step when it is an ``every``-th step, or the first after a change of the loss's
        composition (a term reported on or off: a warm-up ending); the first step of each epoch is always recorded
        (``_start_epoch``)."""
        if self.recorder.recording:
            self._recorded.append(iteration)
        composition = frozenset(key for key, value in returned.items() if math.isfinite(value) and value != 0.0)
        changed = self._composition is not None and composition != self._composition
        self._composition = composition
        self.recorder.step(iteration + 1, record=True if changed else None)

    def _explain(self, guard: StepGuard, batch: dict) -> None:
        """Save the step and the last good state, replay the step, write first_nonfinite.json/.md.

        Non-finite weights or momentum: the state is not good and there is nothing to replay; the batch alone is
        saved and the last good checkpoint stays the last one nnU-Net wrote."""
        record, trainer = guard.record, self.trainer
        scaler_state = saved_step.scaler_state_dict(trainer.grad_scaler, self._pre_step["scale"],
                                                    self._pre_step["growth"]) \
            if self._pre_step.get("scale") is not None else None
        step_folder = self.folder / f"step_{record.iteration}"
        meta = {"iteration": record.iteration, "epoch": trainer.current_epoch, "event": record.event}
        state_is_good = record.event not in ("weights", "momentum")
        saved_step.save_step(trainer, step_folder, batch, self._pre_step["rng"], scaler_state, meta,
                             with_state=state_is_good)
        replay = None
        if state_is_good:
            saved_step.copy_state(step_folder, self.folder / LAST_GOOD)
            guard.last_good_checkpoint = str(self.folder / LAST_GOOD)
            replay = self._replay(guard, batch, scaler_state)
        action = "skipped and continued" if (self.options.on_nonfinite == "skip" and record.event
                                             in ("loss", "gradient")) else "stopped"
        self.first = first_nonfinite.build(
            record, epoch=trainer.current_epoch, cases=[str(k) for k in batch.get("keys", [])], replay=replay,
            action=action, step_folder=step_folder, last_good=guard.last_good_checkpoint,
            scale_floor=guard.scale_floor)
        path = first_nonfinite.write(self.folder, self.first)
        where = f"{self.first['phase']} {self.first['op'] or ''} at {self.first['site'] or 'unknown site'}"
        self.progress(f"geodiag watch: first non-finite step {record.iteration}: {where}; "
                      f"{replay['classification'] if replay else 'not replayed'}; {path}")

    def _replay(self, guard: StepGuard, batch: dict, scaler_state: Optional[dict]) -> dict:
        """The replay of the step (a replay that fails is classified replay-failed by the replay itself: it never
        ends the run)."""
        self.progress(f"geodiag watch: replaying iteration {guard.record.iteration} under provenance")
        self._replaying = True
        try:
            return replay_train_step(self.trainer, guard.original_train_step, batch,
                                     rng_state=self._pre_step["rng"], scaler_state=scaler_state)
        finally:
            self._replaying = False

    # ------------------------------------------------------------------ files
    def flush(self) -> None:
        """Write this epoch's rows and histograms (also for an epoch cut short by a stop), then start anew."""
        if self.folder is None:
            return
        if getattr(self.trainer, "is_ddp", False):  # every rank records the same names: reduce them in one order
            for _, histogram in sorted(self.recorder.histograms().items(), key=lambda item: item[0]):
                histogram.all_reduce()
        if self.trainer.local_rank != 0:
            self._start_epoch()
            return
        epoch = self.trainer.current_epoch
        self._epoch_lines(epoch)
        if self.rows:
            columns = list(ROW_FIELDS) + sorted({key for row in self.rows for key in row} - set(ROW_FIELDS))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            schema.write_text(self.folder / f"iterations_epoch_{epoch:04d}.csv", buffer.getvalue())
        rows = self.recorder.snapshot()
        layout = self.recorder.layout
        schema.write_json(self.folder / f"histograms_epoch_{epoch:04d}.json", {
            "epoch": epoch, "iterations": [self._epoch_start, self.guard.iteration],
            "recorded_every": self.recorder.every, "recorded_iterations": self._recorded,
            "layout": {"bins_per_decade": layout.bins_per_decade, "log10_min": layout.log10_min,
                       "log10_max": layout.log10_max},
            "eps_grid": list(self.recorder.eps_grid), "rows": rows})
        if self._tensorboard is not None:
            self._tensorboard.histograms(rows, self.recorder.layout.edges(), self.guard.iteration)
        self._start_epoch()

    def _epoch_lines(self, epoch: int) -> None:
        """The epoch's console lines (steps the trainer skipped, an inert prior) and the run-long findings' files."""
        by_trainer = sum(row["skipped_by_trainer"] for row in self.rows)
        if by_trainer:
            self.progress(f"geodiag watch: epoch {epoch}: {by_trainer} of {len(self.rows)} steps skipped by the "
                          "trainer's own code (it returned without an optimizer step)")
        self.findings.end_epoch(self.rows, epoch, self.folder)

    def _start_epoch(self) -> None:
        self.rows = []
        self._recorded = []
        self.recorder.reset()
        self._epoch_start = self.guard.iteration
        self.recorder.step(self.guard.iteration, record=True)  # the first step of every epoch


def _scalar(value) -> Optional[float]:
    """A returned value as a float when it is one number (numpy scalar, 0-d array, float), else None."""
    try:
        return float(value) if getattr(value, "size", 1) == 1 and not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError):
        return None


def check_options(options: WatchOptions) -> None:
    """Refuse bad options before nnU-Net starts (a one-line error naming the option)."""
    if options.every < 1:
        raise ArgumentError("{every} must be at least 1", "every")
    if options.on_masked not in ON_MASKED:
        raise ArgumentError(f"{{on_masked}} must be one of {', '.join(ON_MASKED)}", "on_masked")
    if options.on_nonfinite not in ON_NONFINITE:
        raise ArgumentError(f"{{on_nonfinite}} must be one of {', '.join(ON_NONFINITE)}", "on_nonfinite")
    if options.tensorboard is not None:
        summary_writer_class()


def run_watched(train_args: list[str], options: WatchOptions, progress: Callable[[str], None] = print) -> Watch:
    """Run nnU-Net's ``nnUNetv2_train`` entry point with ``train_args``, watching the trainer it builds; the Watch
    (``stopped`` holds the stop message when the guard stopped training)."""
    import nnunetv2.run.run_training as entry

    check_options(options)
    if any(arg == "-num_gpus" for arg in train_args):
        index = train_args.index("-num_gpus")
        if index + 1 < len(train_args) and train_args[index + 1] not in ("1",):
            raise GeodiagError("geodiag watch runs one process: -num_gpus > 1 (DDP) is not supported")
    get_trainer = entry.get_trainer_from_args
    watches: list[Watch] = []

    prior = load_loss(options.loss, options.loss_input) if options.loss else None

    def watched_trainer(*args, **kwargs):
        trainer = get_trainer(*args, **kwargs)
        watches.append(Watch(trainer, options, progress, prior=prior).attach())
        return trainer

    try:
        with patch(entry, "get_trainer_from_args", watched_trainer), patch(sys, "argv", ["nnUNetv2_train", *train_args]):
            entry.run_training_entry()
    except TrainingStateCorrupted as stop:
        if not watches:
            raise
        watches[0].stopped = str(stop)
    finally:
        for watch in watches:
            watch.detach()
    if not watches:
        raise GeodiagError("nnU-Net built no trainer (was this a validation-only run?)")
    return watches[0]
