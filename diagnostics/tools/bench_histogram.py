"""The histogram benchmarks: ``LogHistogram.update`` against the path TensorBoard's ``add_histogram`` takes on the
same values (re-implemented here, so tensorboard need not be installed), and the compiled CPU kernel against
geodiag's own torch path, on the histogram alone and in a watched training step: whether the kernel earns its
build step."""
from __future__ import annotations

import tempfile
from typing import Callable, Sequence

import numpy as np
import torch

from ..instruments import kernels
from ..instruments.histograms import LogHistogram, decade_grid
from .bench_common import Clock, Result, Scale, interleaved_medians, ratio_row
from .bench_step import net_name


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


def _histogram_values(scale: Scale, device: torch.device) -> torch.Tensor:
    """Values spread over 15 decades around 1 (as gradients and taps are), both signs."""
    generator = torch.Generator().manual_seed(4)
    n = scale.histogram_values
    return (torch.randn(n, generator=generator) * 10.0 ** (torch.rand(n, generator=generator) * 9 - 6)).to(device)


def bench_histogram(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """LogHistogram.update (with the eps-grid thresholds) vs TensorBoard's numpy histogram on the same values."""
    values = _histogram_values(scale, device)
    n = values.numel()
    histogram = LogHistogram(thresholds=decade_grid(), device=device)
    bins = tensorboard_default_bins()
    times = interleaved_medians({"tensorboard": lambda: tensorboard_histogram(values, bins),
                                 "geodiag": lambda: histogram.update(values)}, clock, scale.repeats * 2)
    speedup = times["tensorboard"] / times["geodiag"]
    return [Result("histogram", f"LogHistogram.update, {n / 1e6:g}M values", "TensorBoard add_histogram path",
                   speedup, "x faster", ">= 10x", speedup >= 10,
                   f"fp32 on {device.type}; TensorBoard path re-implemented in numpy ({len(bins) - 1} bins); "
                   f"{clock.name}; median of {scale.repeats * 2} interleaved repeats")]


def _on_torch(run: Callable[[], object]) -> Callable[[], None]:
    def forced() -> None:
        with kernels.unused():
            run()
    return forced


def bench_kernel(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """The compiled kernel vs geodiag's torch path (forced with ``kernels.unused``) on the same work:
    LogHistogram.update of the histogram benchmark's values, and nnU-Net's train_step under ``geodiag watch``
    recording every step (the logits' and every parameter's gradient histogrammed), beside the plain step. CPU only
    (the kernel's device); no rows where the kernel is not in use."""
    from ..nnunet.watch import Watch, WatchOptions
    from .bench_watch import disk_batch, nnunet_trainer

    if device.type != "cpu" or kernels.compiled is None:
        return []
    values = _histogram_values(scale, device)
    histogram = LogHistogram(thresholds=decade_grid())

    def update() -> None:
        histogram.update(values)

    on_histogram = interleaved_medians({"kernel": update, "torch": _on_torch(update)}, clock, scale.repeats * 2)
    with tempfile.TemporaryDirectory() as folder:
        plain, watched = (nnunet_trainer(scale, device, f"{folder}/{name}") for name in ("plain", "watched"))
        watch = Watch(watched, WatchOptions(every=1), progress=lambda message: None).attach()
        watch.start()
        batches = {name: disk_batch(trainer, device) for name, trainer in (("plain", plain), ("watched", watched))}

        def watched_step() -> None:
            watched.train_step(batches["watched"])

        try:
            on_step = interleaved_medians({"plain": lambda: plain.train_step(batches["plain"]),
                                           "kernel": watched_step, "torch": _on_torch(watched_step)},
                                          clock, scale.repeats * 2, scale.inner)
        finally:
            watch.detach()
    method = f"{clock.name}; median of {scale.repeats * 2} interleaved repeats"
    baseline = "geodiag's torch path (kernel unused)"
    histogram_speedup = on_histogram["torch"] / on_histogram["kernel"]
    step_speedup = on_step["torch"] / on_step["kernel"]
    step_method = (f"nnUNetTrainer.train_step {scale.step_batch}x1x{scale.step_size}^2, {net_name(scale)}, "
                   f"geodiag watch recording every step; {method}")
    return [
        Result("kernel vs torch path", f"LogHistogram.update, {values.numel() / 1e6:g}M values", baseline,
               histogram_speedup, "x faster", ">= 3x", histogram_speedup >= 3, f"fp32, eps-grid thresholds; {method}"),
        Result("kernel vs torch path", "watched nnU-Net step", baseline, step_speedup, "x faster", ">= 1.05x",
               step_speedup >= 1.05, step_method),
        ratio_row("kernel vs torch path", "watched step, kernel", "plain step", on_step["kernel"] / on_step["plain"],
                  "", None, step_method),
        ratio_row("kernel vs torch path", "watched step, torch path", "plain step",
                  on_step["torch"] / on_step["plain"], "", None, step_method),
    ]
