"""nnUNetTrainerGeometric already under ``geodiag watch``: for runs started with plain ``nnUNetv2_train -tr
nnUNetTrainerGeometricMonitored`` (found through the shim folder ``geodiag/diagnostics/nnunet_ext`` in
``nnUNet_extTrainer``). Each is the geometric trainer with a ``Watch`` attached at construction, so it writes what
``geodiag watch --on-nonfinite skip`` writes, into ``<fold>/geodiag_watch/``: the same rows, histograms, saved
first bad step and its replay; like every geodiag trainer it skips a non-finite step and goes on.

Settings (class attributes): ``monitor_every`` (histograms and the weight/momentum scan every N iterations),
``monitor_per_parameter`` (one gradient histogram per parameter instead of one pooled), ``monitor_conv_outputs``
(also every convolution's output and its gradient).
"""
from __future__ import annotations

import torch

from geodiag.losses.nnunet.trainer import nnUNetTrainerGeometric, nnUNetTrainerGeometricQuick

from .watch import Watch, WatchOptions


class nnUNetTrainerGeometricMonitored(nnUNetTrainerGeometric):
    """nnUNetTrainerGeometric watched as ``geodiag watch --every monitor_every`` would watch it."""

    monitor_every: int = 16
    monitor_per_parameter: bool = False
    monitor_conv_outputs: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # skip, not stop: a geodiag trainer skips non-finite steps; the first is still saved, replayed and explained
        options = WatchOptions(every=self.monitor_every, on_nonfinite="skip", per_parameter=self.monitor_per_parameter,
                               conv_outputs=self.monitor_conv_outputs)
        self.watch = Watch(self, options, progress=self.print_to_log_file).attach()

    def on_train_end(self) -> None:
        self.watch.detach()
        super().on_train_end()


class nnUNetTrainerGeometricMonitoredQuick(nnUNetTrainerGeometricMonitored, nnUNetTrainerGeometricQuick):
    """The monitored trainer at the quick trainer's size (6 epochs of 4 iterations, warm-up 2), recording every
    iteration."""

    monitor_every = 1
