"""The overhead benchmarks: geodiag's instruments and tools timed against what they add to (a plain nnU-Net step,
plain inference) or replace (detect_anomaly, a per-image loop), as ratios from one interleaved run."""
from __future__ import annotations

import warnings

import torch

from geodiag.losses import GeometricLoss

from .bench_common import Clock, Result, Scale, interleaved_medians, ratio_row
from .bench_step import NnUNetStep, disk_labels, net_name, soft_logits, step_name

SWEEP_SETTINGS = (("clamp", 1e-4), ("clamp", 1e-2), ("additive", 1e-4), ("additive", 1e-2),
                  ("shifted", 1e-10), ("shifted", 1e-6), ("shifted", 1e-2))


def bench_provenance(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """NonFiniteProvenance (one host sync per step) vs a plain step and vs torch.autograd.detect_anomaly."""
    from ..nonfinite.provenance import NonFiniteProvenance

    step = NnUNetStep(scale, device)

    def provenance():
        with NonFiniteProvenance(step.network, step.geometric) as watch:
            step()
            watch.step_end()

    def anomaly():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
            with torch.autograd.detect_anomaly(check_nan=True):
                step()

    times = interleaved_medians({"plain": step, "provenance": provenance, "detect_anomaly": anomaly}, clock,
                                scale.repeats, scale.inner)
    method = f"{step_name(scale)}; {clock.name}; median of {scale.repeats} interleaved repeats"
    ratio = times["provenance"] / times["plain"]
    return [
        ratio_row("provenance overhead", "NonFiniteProvenance", "plain step", ratio, "<= 1.3x", ratio <= 1.3, method),
        ratio_row("provenance overhead", "detect_anomaly", "plain step", times["detect_anomaly"] / times["plain"],
                   "", None, method),
        ratio_row("provenance overhead", "NonFiniteProvenance", "detect_anomaly",
                   times["provenance"] / times["detect_anomaly"], "", None, method),
    ]


def bench_loss_fraction(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """GeometricLoss forward + backward on the step's output shape, as a fraction of the whole training step."""
    step = NnUNetStep(scale, device)
    loss = step.geometric
    logits = soft_logits(step.label.cpu(), torch.Generator().manual_seed(1)).to(device).requires_grad_(True)

    def loss_only():
        logits.grad = None
        loss(logits, step.label).backward()

    times = interleaved_medians({"step": step, "loss": loss_only}, clock, scale.repeats, scale.inner)
    fraction = times["loss"] / times["step"]
    return [Result("loss share of a step", "GeometricLoss fwd+bwd", "nnU-Net 2D training step", 100 * fraction,
                   "%", "<= 5%", fraction <= 0.05,
                   f"{step_name(scale)}; {clock.name}; median of {scale.repeats} interleaved repeats")]


def bench_vectorised(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """The batched loss vs the same loss called per image in a Python loop, batch 12."""
    generator = torch.Generator().manual_seed(2)
    size = scale.vector_size
    label = disk_labels(12, (size, size), generator).to(device)
    logits = soft_logits(label.cpu(), generator).to(device).requires_grad_(True)
    loss = GeometricLoss.from_preset("production", softmax=True)

    def batched():
        logits.grad = None
        loss(logits, label).backward()

    def per_image():
        logits.grad = None
        torch.stack([loss(logits[i:i + 1], label[i:i + 1]) for i in range(len(label))]).mean().backward()

    times = interleaved_medians({"batched": batched, "loop": per_image}, clock, scale.repeats * 2, scale.inner)
    speedup = times["loop"] / times["batched"]
    return [Result("vectorisation", "batched GeometricLoss fwd+bwd", "per-image Python loop", speedup, "x faster",
                   ">= 5x", speedup >= 5, f"12 x 2 x {size}^2; {clock.name}; median of {scale.repeats * 2} "
                   "interleaved repeats")]


def bench_sweep(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """The clamp sweep (7 settings, fp32) of each case vs plain inference of the same cases."""
    from ..nnunet.cases import Case, predict_logits
    from .sweep import CheckpointSweep, Setting, SweepTiming, sweep_case

    step = NnUNetStep(scale, device)
    network = step.network.eval()
    network.decoder.deep_supervision = False
    generator = torch.Generator().manual_seed(3)
    size = scale.step_size
    labels = disk_labels(scale.sweep_cases, (size, size), generator)
    cases = [Case(f"case{i}", (label.float() + 0.5 * torch.randn(label.shape, generator=generator)), label)
             for i, label in enumerate(labels)]
    settings = [Setting(name, eps) for name, eps in SWEEP_SETTINGS]
    item = CheckpointSweep("bench", checkpoint=None, classes=(1,))  # sweep_case reads only label, classes, meta
    patch = [size, size]

    def inference():
        with torch.no_grad():
            for case in cases:
                predict_logits(network, case.image, patch)

    def sweep():
        for case in cases:
            sweep_case(item, network, case, patch, settings, ("fp32",), "seed", device, SweepTiming())

    times = interleaved_medians({"inference": inference, "sweep": sweep}, clock, scale.repeats)
    ratio = times["sweep"] / times["inference"]
    return [ratio_row("clamp sweep", f"sweep of {len(settings)} settings (incl. its forward)",
                       "plain inference", ratio, "<= 1.3x", ratio <= 1.3,
                       f"{scale.sweep_cases} cases {size}^2, {net_name(scale)}; {clock.name}; median of "
                       f"{scale.repeats} interleaved repeats")]
