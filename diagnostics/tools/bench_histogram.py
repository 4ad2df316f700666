"""The histogram benchmark: ``LogHistogram.update`` against the path TensorBoard's ``add_histogram`` takes on the
same values (re-implemented here, so tensorboard need not be installed)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..instruments.histograms import LogHistogram, decade_grid
from .bench_common import Clock, Result, Scale, interleaved_medians


def tensorboard_histogram(values: torch.Tensor, bins: Sequence[float]) -> dict:
    """What TensorBoard's ``add_histogram`` computes (torch.utils.tensorboard.summary.histogram and
    make_histogram): tensor -> numpy float64 -> np.histogram on the given edges, then min, max, sum and sum of
    squares. Re-implemented here (tensorboard need not be installed); protobuf and file writing are left out."""
    array = values.detach().cpu().numpy().astype(float).reshape(-1)
    counts, limits = np.histogram(array, bins=bins)
    return {"counts": counts, "limits": limits, "min": array.min(), "max": array.max(), "num": array.size,
            "sum": array.sum(), "sum_squares": array.dot(array)}


def tensorboard_default_bins() -> list[float]:
    """TensorBoard's default ('tensorflow') edges: +-1e-12 * 1.1^k up to 1e20, and 0 (SummaryWriter)."""
    edges, value = [], 1e-12
    while value < 1e20:
        edges.append(value)
        value *= 1.1
    return [-v for v in reversed(edges)] + [0.0] + edges


def bench_histogram(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """LogHistogram.update (with the eps-grid thresholds) vs TensorBoard's numpy histogram on the same values."""
    generator = torch.Generator().manual_seed(4)
    n = scale.histogram_values
    values = (torch.randn(n, generator=generator) * 10.0 ** (torch.rand(n, generator=generator) * 9 - 6)).to(device)
    histogram = LogHistogram(thresholds=decade_grid(), device=device)
    bins = tensorboard_default_bins()
    times = interleaved_medians({"tensorboard": lambda: tensorboard_histogram(values, bins),
                                 "geodiag": lambda: histogram.update(values)}, clock, scale.repeats * 2)
    speedup = times["tensorboard"] / times["geodiag"]
    return [Result("histogram", f"LogHistogram.update, {n / 1e6:g}M values", "TensorBoard add_histogram path",
                   speedup, "x faster", ">= 10x", speedup >= 10,
                   f"fp32 on {device.type}; TensorBoard path re-implemented in numpy ({len(bins) - 1} bins); "
                   f"{clock.name}; median of {scale.repeats * 2} interleaved repeats")]
