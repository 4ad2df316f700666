"""What every ``geodiag bench`` family shares: the sizes (``Scale``), the table row (``Result``), the clock, and
the interleaved medians every ratio is taken from.

Every figure is a ratio of two variants timed in the same run: variants are interleaved within each repeat and
the median over repeats is kept, because the machines this runs on are shared and noisy. On the CPU the clock
is the measuring thread's CPU time (``time.thread_time``, one torch thread; see ``Clock``) and no absolute time
is reported; on CUDA it is wall time between two synchronisations.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Scale:
    """How big and how often: ``quick`` checks that everything runs, ``full`` is what the CPU figures are taken at,
    ``gpu`` the sizes where a GPU matters (2D at the seed's 512^2, batch 12; 3D up to 128^3)."""

    name: str
    step_size: int                 # 2D nnU-Net step: image side
    step_batch: int
    features: tuple[int, ...]      # PlainConvUNet features per stage (nnU-Net's planned 2D net: 32 ... 512)
    repeats: int                   # interleaved repeats (median kept)
    inner: int                     # calls per timed sample
    vector_size: int               # side of the batch-12 images of the vectorisation benchmark
    sweep_cases: int
    histogram_values: int
    memory_2d: tuple[int, ...]
    memory_3d: tuple[int, ...]


SCALES = {
    "quick": Scale("quick", 64, 2, (8, 16, 32, 64), repeats=2, inner=1, vector_size=64, sweep_cases=1,
                   histogram_values=1 << 20, memory_2d=(64, 128), memory_3d=(32,)),
    "full": Scale("full", 128, 2, (32, 64, 128, 256, 512, 512), repeats=7, inner=2, vector_size=128,
                  sweep_cases=3, histogram_values=8_000_000, memory_2d=(64, 256, 1024), memory_3d=(32, 64, 128)),
    "gpu": Scale("gpu", 512, 12, (32, 64, 128, 256, 512, 512, 512), repeats=7, inner=2, vector_size=512,
                 sweep_cases=3, histogram_values=8_000_000, memory_2d=(512, 1024), memory_3d=(64, 128)),
}
SWEEP_SETTINGS = (("clamp", 1e-4), ("clamp", 1e-2), ("additive", 1e-4), ("additive", 1e-2),
                  ("shifted", 1e-10), ("shifted", 1e-6), ("shifted", 1e-2))


@dataclass
class Result:
    """One row of the bench table: ``value`` of ``subject`` relative to (or, for counts and sizes, without)
    ``baseline``."""

    benchmark: str
    subject: str
    baseline: str
    value: float
    unit: str
    target: str = ""
    met: Optional[bool] = None
    method: str = ""


class Clock:
    """CPU time of the measuring thread on the CPU (robust to other processes), synchronised wall time on CUDA.

    Thread, not process, time: after numpy's work (the TensorBoard path) helper threads keep spinning, and process
    time charged that spin to whatever ran next (LogHistogram.update read more process time than wall time).
    torch runs at one thread here and the CPU autograd engine works on the calling thread, so for a training
    step thread, process and wall time agree.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.thread_time()

    @property
    def name(self) -> str:
        return "synchronised wall time" if self.device.type == "cuda" else "thread CPU time, 1 thread"


def interleaved_medians(variants: dict[str, Callable[[], object]], clock: Clock, repeats: int,
                        inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each variant; each repeat runs every variant once (after one warm-up round)."""
    for run in variants.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = clock()
            for _ in range(inner):
                run()
            samples[name].append((clock() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def ratio_row(benchmark: str, subject: str, baseline: str, ratio: float, target: str, met: bool,
               method: str) -> Result:
    return Result(benchmark, subject, baseline, ratio, "x", target, met, method)
