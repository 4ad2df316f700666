"""A study: synthetic datasets, nnU-Net runs with a geometric term switching on, then measurements and a report.

The demo and the reference report are two configurations of the same steps. Runs go through nnU-Net's own
``nnUNetv2_train`` entry point, in process and under ``geodiag watch`` when this geodiag has it, with the trainer
nnU-Net resolves: geodiag's, or a user's found through ``nnUNet_extTrainer`` (the seed replica). The study imposes
only its schedule on the instance nnU-Net builds (epochs, iterations, warm-up, a checkpoint per epoch, no final
validation). Every step reuses what an earlier run left in the study folder, so an interrupted study continues.

This module runs the steps in order; each lives in the module of its job: ``preparation`` (datasets, plans),
``training``, ``summary`` (runs.csv, study.json), ``measurements`` (on the checkpoints, and geodiag's tools on them);
``definition`` holds what they share.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..tools.run_record import check_out
from .definition import Study
from .measurements import analyze, loss_precisions, replica_sweep, small_s, sweep, term_gradients
from .preparation import make_data, plan
from .summary import record_time, summarize
from .training import train


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Study], None]


STEPS = (Step("make-data", make_data), Step("plan", plan), Step("train", train), Step("summarize", summarize),
         Step("small-s", small_s), Step("term-gradients", term_gradients),
         Step("loss-precisions", loss_precisions), Step("analyze", analyze),
         Step("sweep", sweep), Step("replica-sweep", replica_sweep))


def run_study(study: Study, steps: tuple[Step, ...] = STEPS, report: Optional[Callable[[Study], Path]] = None) -> Path:
    """Run the steps in order with progress lines, then the study's report; the whole wall time and the load
    into study.json. Returns the report's path."""
    check_out(study.out).mkdir(parents=True, exist_ok=True)
    total = len(steps) + (report is not None)
    began, loads, durations = time.perf_counter(), [os.getloadavg()[0]], {}
    for index, step in enumerate(steps, start=1):
        study.log(f"[{index}/{total}] {step.name}")
        start = time.perf_counter()
        step.run(study)
        durations[step.name] = time.perf_counter() - start
        loads.append(os.getloadavg()[0])
        study.log(f"[{index}/{total}] {step.name} done in {time.perf_counter() - start:.1f} s "
                  f"(load average {loads[-1]:.2f})")
    if report is None:
        record_time(study, time.perf_counter() - began, loads, durations)
        return study.out
    study.log(f"[{total}/{total}] report")
    written = report(study)
    record_time(study, time.perf_counter() - began, loads + [os.getloadavg()[0]], durations)
    return written
