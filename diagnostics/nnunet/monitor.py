"""Live monitoring of an nnU-Net run with the geometric loss: per-iteration losses and training state, per-epoch
histograms of every tap, of the logits' gradient and of the parameter gradients, written as training goes.

Why: nnU-Net logs epoch means, so one NaN iteration hides which iteration, which term and which tensor went
wrong, and a killed run leaves nothing. ``TrainingMonitor`` keeps everything on the device during an epoch
(no host sync added per step) and at each epoch end reads it back once and writes, atomically (temp file then
``os.replace``), into ``<fold>/geodiag_monitor/``:

- ``iterations.csv``: one row per iteration, appended each epoch: epoch, iteration, loss, dc_ce,
  geometric_<term>, grad_norm, skipped, scale, inv_scale_finite, the counts of non-finite weight and momentum
  tensors and the first non-finite weight's name.
- ``histograms_epoch_XXXX.json``: the epoch's ``Recorder.snapshot()`` rows (values and gradients, the sqrt's
  local derivative, fractions below the eps grid), its training-state summary and the bin layout.

Under DDP the histograms are summed over ranks and rank 0 writes; iteration rows are rank 0's; parameter
gradients are each rank's own, before DDP averages them. Gradients are recorded as they arrive, i.e.
multiplied by the GradScaler's scale on CUDA. Set ``nnUNet_compile=f``: hooks
on a compiled network are not guaranteed to fire.

Use it from the trainers below: ``nnUNetv2_train ... -tr nnUNetTrainerGeometricMonitored`` (found through the
shim folder ``geodiag/diagnostics/nnunet_ext`` in ``nnUNet_extTrainer``).
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometric, nnUNetTrainerGeometricQuick
from geodiag.reports import schema

from ..instruments.recorder import Attachment, Recorder
from ..instruments.training_state import TrainingStateRecorder

MONITOR_FOLDER = "geodiag_monitor"
ITERATIONS_FILE = "iterations.csv"
LOGITS = "logits"


class TrainingMonitor:
    """Per-iteration and per-epoch records of a training loop, written to ``folder`` at each ``end_epoch``."""

    def __init__(
        self,
        folder: str | os.PathLike,
        terms: Sequence[str],
        every: int = 1,
        per_parameter: bool = False,
        conv_outputs: bool = False,
        write: bool = True,
        first_iteration: int = 0,
    ) -> None:
        self.folder = Path(folder)
        self.terms = tuple(terms)
        self.per_parameter = per_parameter
        self.conv_outputs = conv_outputs
        self.write = write
        self.recorder = Recorder(every=every)
        self.state = TrainingStateRecorder()
        self._attachments: list[Attachment] = []
        self._iterations: list[torch.Tensor] = []
        self._iteration = first_iteration  # global: a resumed run continues its numbering
        self._epoch_start = first_iteration

    @property
    def columns(self) -> tuple[str, ...]:
        return ("loss", "dc_ce") + tuple(f"geometric_{term}" for term in self.terms)

    def attach(self, network: nn.Module, loss=None) -> None:
        """Record ``loss``'s taps (a Tappable), the network's full-resolution output and parameter gradients."""
        if loss is not None:
            self._attachments.append(self.recorder.attach_loss(loss))
        self._attachments.append(self.recorder.attach_network(network, per_parameter=self.per_parameter,
                                                              conv_outputs=self.conv_outputs))
        self._attachments.append(Attachment([network.register_forward_hook(self._on_network_output)]))

    def detach(self) -> None:
        for attachment in self._attachments:
            attachment.remove()
        self._attachments.clear()

    def _on_network_output(self, module: nn.Module, inputs, output) -> None:
        if module.training:  # validation runs in eval mode; only training steps are recorded
            full_resolution = output[0] if isinstance(output, (list, tuple)) else output
            self.recorder.attach_tensor(LOGITS, full_resolution)

    def on_step_end(self, info: dict, network: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Record one training step from the trainer's ``on_train_step_end`` info (device tensors, no sync)."""
        loss = info["loss"]
        nan = torch.full((), math.nan, dtype=torch.float64, device=loss.device)
        geometric = info.get("geometric", {})
        values = [loss, info.get("dc_ce", nan)] + [geometric.get(term, nan) for term in self.terms]
        self._iterations.append(torch.stack([v.detach().to(torch.float64).reshape(()) for v in values]))
        self.state.record(scaler=info.get("grad_scaler"), found_inf=info.get("skipped"),
                          grad_norm=info.get("grad_norm"), model=network, optimizer=optimizer, step=self._iteration,
                          check_parameters=self.recorder.recording)
        self._iteration += 1
        self.recorder.step()

    def end_epoch(self, epoch: int, distributed: bool = False) -> None:
        """Read the epoch back (one transfer per kind of record), write its files, and start the next epoch."""
        if distributed:  # every rank runs the same code, so records the same names: reduce them in one order
            for _, histogram in sorted(self.recorder.histograms().items(), key=lambda item: item[0]):
                histogram.all_reduce()
        losses = torch.stack(self._iterations).cpu().tolist() if self._iterations else []
        state_rows = self.state.rows()
        histogram_rows = self.recorder.snapshot()
        if self.write:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._append_iterations(epoch, losses, state_rows)
            self._write_histograms(epoch, histogram_rows, self.state.summary(state_rows))
        self._iterations.clear()
        self.state.clear()
        self.recorder.reset()
        self._epoch_start = self._iteration

    def _append_iterations(self, epoch: int, losses: list[list[float]], state_rows: list[dict]) -> None:
        header = ("epoch", "iteration") + self.columns + (
            "grad_norm", "skipped", "scale", "inv_scale_finite", "nonfinite_weight_tensors",
            "nonfinite_momentum_tensors", "first_nonfinite_weight")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        path = self.folder / ITERATIONS_FILE
        if not path.exists():
            writer.writerow(header)
        for values, state in zip(losses, state_rows):
            # weights and momentum are checked on recorded steps only: blank (not 0) where they were not
            checked = state["parameters_checked"]
            writer.writerow([epoch, state["step"], *values, state["grad_norm"], state["skipped"], state["scale"],
                             state["inv_scale_finite"], len(state["nonfinite_weights"]) if checked else "",
                             len(state["nonfinite_momentum"]) if checked else "",
                             next(iter(state["nonfinite_weights"]), "")])
        previous = path.read_text() if path.exists() else ""
        schema.write_text(path, previous + buffer.getvalue())

    def _write_histograms(self, epoch: int, rows: list[dict], state_summary: dict) -> None:
        layout = self.recorder.layout
        document = {
            "epoch": epoch,
            "iterations": [self._epoch_start, self._iteration],
            "recorded_every": self.recorder.every,
            "layout": {"bins_per_decade": layout.bins_per_decade, "log10_min": layout.log10_min,
                       "log10_max": layout.log10_max},
            "eps_grid": list(self.recorder.eps_grid),
            "training_state": state_summary,
            "rows": rows,
        }
        schema.write_json(self.folder / f"histograms_epoch_{epoch:04d}.json", document)


# ---------------------------------------------------------------------- trainers
class nnUNetTrainerGeometricMonitored(nnUNetTrainerGeometric):
    """nnUNetTrainerGeometric plus a TrainingMonitor writing into ``<fold>/geodiag_monitor/``.

    Settings (class attributes): ``monitor_every`` (histograms and the weight / momentum check every N-th
    iteration, per-iteration losses and state always; default 16: what each costs is in the README's table from
    ``geodiag bench``), ``monitor_per_parameter`` (one gradient histogram per parameter instead of one pooled),
    ``monitor_conv_outputs`` (also every convolution's output and its gradient).
    """

    monitor_every: int = 16
    monitor_per_parameter: bool = False
    monitor_conv_outputs: bool = False

    def on_train_start(self) -> None:
        super().on_train_start()
        self.monitor = TrainingMonitor(
            Path(self.output_folder) / MONITOR_FOLDER, terms=tuple(self.geometric_weights), every=self.monitor_every,
            per_parameter=self.monitor_per_parameter, conv_outputs=self.monitor_conv_outputs,
            write=self.local_rank == 0, first_iteration=self.current_epoch * self.num_iterations_per_epoch)
        self.monitor.attach(self.network, self.geometric_loss)

    def on_train_step_end(self, info: dict) -> None:
        super().on_train_step_end(info)
        self.monitor.on_step_end(info, self.network, self.optimizer)

    def on_train_epoch_end(self, train_outputs: List[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        self.monitor.end_epoch(self.current_epoch, distributed=self.is_ddp)

    def on_train_end(self) -> None:
        self.monitor.detach()
        super().on_train_end()


class nnUNetTrainerGeometricMonitoredQuick(nnUNetTrainerGeometricMonitored, nnUNetTrainerGeometricQuick):
    """The monitored trainer at the quick trainer's size (6 epochs of 4 iterations, warm-up 2), recording every
    iteration."""

    monitor_every = 1
