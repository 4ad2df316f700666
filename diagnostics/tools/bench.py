"""`geodiag bench`: what geodiag costs, measured side by side with a plain nnU-Net step and the tools used today.

Every figure is a ratio of two variants timed in the same run: variants are interleaved within each repeat and
the median over repeats is kept, because the machines this runs on are shared and noisy. On the CPU the clock
is the measuring thread's CPU time (``time.thread_time``, one torch thread; see ``Clock``) and no absolute time
is reported; on CUDA
it is wall time between two synchronisations. Memory is measured in a fresh subprocess per size: on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the peak resident set (``VmHWM`` of /proc/self/status, reset
through /proc/self/clear_refs after the inputs exist, glibc's mmap threshold fixed at 64 KiB so freed tensors
leave the resident set), i.e. what the process really touched, allocator overhead included.

The nnU-Net step is the "lightest real" path: PlainConvUNet built directly, nnU-Net's DC_and_CE_loss in its
DeepSupervisionWrapper, SGD (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5), clip_grad_norm_ 12, plus the
production GeometricLoss on the full-resolution output, as ``nnUNetTrainerGeometric`` trains.
"""
from __future__ import annotations

import csv
import io
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from geodiag.losses import GeometricLoss

from ..instruments.errors import GeodiagError
from ..instruments.histograms import LogHistogram, decade_grid
from ..instruments.host_sync import count_host_syncs
from ..instruments.recorder import Recorder
from .bench_autotaps import bench_autotaps

COLUMNS = ("benchmark", "subject", "baseline", "value", "unit", "target", "met", "method")


@dataclass(frozen=True)
class Scale:
    """How big and how often: ``quick`` checks that everything runs, ``full`` is what the CPU figures are taken at,
    ``gpu`` the sizes where a GPU matters (the seed's 2D batch of 12 at 512^2, 3D up to 128^3)."""

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


# ---------------------------------------------------------------------- timing
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


def _ratio_row(benchmark: str, subject: str, baseline: str, ratio: float, target: str, met: bool,
               method: str) -> Result:
    return Result(benchmark, subject, baseline, ratio, "x", target, met, method)


# ---------------------------------------------------------------------- the nnU-Net step
class NnUNetStep:
    """One nnU-Net 2D training step on a fixed synthetic batch (disks in noise), optionally monitored."""

    def __init__(self, scale: Scale, device: torch.device, geometric: bool = True) -> None:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the network's initial weights
        stages = len(scale.features)
        self.network = PlainConvUNet(
            1, stages, scale.features, nn.Conv2d, 3, [1] + [2] * (stages - 1), 2, num_classes=2,
            n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm2d,
            norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
            deep_supervision=True).to(device)
        weights = np.array([1 / 2 ** i for i in range(stages - 1)])
        weights[-1] = 0
        self.dc_ce = DeepSupervisionWrapper(
            DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
            weights / weights.sum())
        self.geometric = GeometricLoss.from_preset("production", softmax=True) if geometric else None
        self.optimizer = torch.optim.SGD(self.network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99,
                                         nesterov=True)
        size, batch = scale.step_size, scale.step_batch
        self.label = disk_labels(batch, (size, size), generator).to(device)
        self.image = (self.label.float() + 0.5 * torch.randn(self.label.shape, generator=generator)).to(device)
        self.targets = [self.label[:, :, ::2 ** i, ::2 ** i] for i in range(stages - 1)]
        self.monitor = None

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.network(self.image)
        dc_ce = self.dc_ce(outputs, self.targets)
        total = dc_ce
        geometric = {}
        if self.geometric is not None:
            geometric["geometric"] = self.geometric(outputs[0], self.label)
            total = total + geometric["geometric"]
        total.backward()
        norm = nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        self.optimizer.step()
        if self.monitor is not None:
            self.monitor.on_step_end({"loss": total.detach(), "dc_ce": dc_ce.detach(), "geometric": geometric,
                                      "grad_norm": norm}, self.network, self.optimizer)
        return total


def disk_labels(batch: int, spatial: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """[B, 1, *S] label maps, one disk (ball) of random centre and radius per image."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij")
    labels = []
    for _ in range(batch):
        centre = [n * (0.35 + 0.3 * float(torch.rand((), generator=generator))) for n in spatial]
        radius = min(spatial) * (0.15 + 0.15 * float(torch.rand((), generator=generator)))
        distance = sum((g - c) ** 2 for g, c in zip(grids, centre))
        labels.append((distance < radius ** 2).long())
    return torch.stack(labels)[:, None]


def soft_logits(label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two-class logits [B, 2, *S] that agree with ``label`` up to noise: an uncertain, realistic prediction."""
    foreground = (2.0 * label.float() - 1.0) * 3.0 + torch.randn(label.shape, generator=generator)
    return torch.cat([-foreground, foreground], dim=1)


# ---------------------------------------------------------------------- benchmarks
def bench_monitor(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """The live monitor (every tap, the logits' and the parameters' gradients histogrammed) vs a plain step."""
    from ..nnunet.monitor import TrainingMonitor

    steps = {"plain": NnUNetStep(scale, device)}
    for every in (1, 16):
        step = steps[f"every {every}"] = NnUNetStep(scale, device)  # same seed: same weights and batch
        step.monitor = TrainingMonitor(".", terms=("geometric",), every=every, write=False)
        step.monitor.attach(step.network, step.geometric)

    times = interleaved_medians(steps, clock, scale.repeats * 4, scale.inner)
    method = f"{_step_name(scale)}; {clock.name}; median of {scale.repeats * 4} interleaved repeats"
    targets = {1: 1.15, 16: 1.05}
    return [_ratio_row("monitor overhead", f"TrainingMonitor every {every}", "plain step",
                       times[f"every {every}"] / times["plain"], f"<= {targets[every]}x",
                       times[f"every {every}"] / times["plain"] <= targets[every], method) for every in (1, 16)]


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
    method = f"{_step_name(scale)}; {clock.name}; median of {scale.repeats} interleaved repeats"
    ratio = times["provenance"] / times["plain"]
    return [
        _ratio_row("provenance overhead", "NonFiniteProvenance", "plain step", ratio, "<= 1.3x", ratio <= 1.3, method),
        _ratio_row("provenance overhead", "detect_anomaly", "plain step", times["detect_anomaly"] / times["plain"],
                   "", None, method),
        _ratio_row("provenance overhead", "NonFiniteProvenance", "detect_anomaly",
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
                   f"{_step_name(scale)}; {clock.name}; median of {scale.repeats} interleaved repeats")]


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
    return [_ratio_row("clamp sweep", f"sweep of {len(settings)} settings (incl. its forward)",
                       "plain inference", ratio, "<= 1.3x", ratio <= 1.3,
                       f"{scale.sweep_cases} cases {size}^2, {_net_name(scale)}; {clock.name}; median of "
                       f"{scale.repeats} interleaved repeats")]


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


# ---------------------------------------------------------------------- host syncs
def bench_host_syncs(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    generator = torch.Generator().manual_seed(5)
    label = disk_labels(2, (scale.vector_size,) * 2, generator).to(device)
    logits = soft_logits(label.cpu(), generator).to(device)
    rows = []
    for preset in ("production", "v2.3"):
        for recorded in (False, True):
            loss = GeometricLoss.from_preset(preset, softmax=True)
            recorder = Recorder()
            if recorded:
                recorder.attach_loss(loss)

            def run():
                leaf = logits.clone().requires_grad_(True)
                recorder.attach_tensor("logits", leaf) if recorded else None
                loss(leaf, label).backward()

            count, note = count_host_syncs(run, device)
            subject = f"GeometricLoss {preset} fwd+bwd" + (" + Recorder (all taps)" if recorded else "")
            rows.append(Result("host syncs", subject, "", count, "syncs", "0", count == 0, note))
            recorder.detach()
    return rows


# ---------------------------------------------------------------------- memory
MEMORY_SUBJECTS = ("loss", "loss+recorder")


def memory_probe(subject: str, spatial: Sequence[int], device: str) -> int:
    """Peak bytes of one GeometricLoss forward + backward on [2, 2, *spatial] softmax logits (with every tap
    recorded for ``loss+recorder``), above what the inputs already hold. Run in a fresh process."""
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(6)
    loss = GeometricLoss.from_preset("production", softmax=True)
    recorder = Recorder()
    if subject == "loss+recorder":
        recorder.attach_loss(loss)

    def inputs(shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        label = disk_labels(2, shape, generator).to(dev)
        logits = soft_logits(label.cpu(), generator).to(dev).requires_grad_(True)
        if subject == "loss+recorder":
            recorder.attach_tensor("logits", logits)
        return logits, label

    # One small step first: lazy initialisation (autograd engine, kernels, histogram buffers) is not the loss's.
    loss(*inputs([8] * len(spatial))).backward()
    logits, label = inputs(spatial)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        loss(logits, label).backward()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - before
    before = _resident_bytes(reset_peak=True)
    loss(logits, label).backward()
    return _peak_resident_bytes() - before


def _resident_bytes(reset_peak: bool) -> int:
    if reset_peak:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _status_bytes("VmRSS")


def _peak_resident_bytes() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise GeodiagError(f"/proc/self/status has no {key}: peak memory cannot be measured on this system")


def _probe_in_subprocess(subject: str, spatial: Sequence[int], device: torch.device) -> int:
    code = ("import sys, torch; torch.set_num_threads(1); from geodiag.diagnostics.tools.bench import memory_probe; "
            f"print(memory_probe({subject!r}, {tuple(spatial)!r}, {str(device)!r}))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise GeodiagError(f"memory probe {subject} {tuple(spatial)} failed: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return int(done.stdout.strip().splitlines()[-1])


def bench_memory(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """Peak memory of the loss and of the recorder's extra, per image size (batch 2, 2 channels)."""
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise GeodiagError("peak memory on the CPU needs Linux /proc/self/clear_refs; run with --device cuda")
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "peak RSS (VmHWM after clear_refs, glibc mmap threshold 64 KiB), fresh process per size")
    rows = []
    shapes = [(s, s) for s in scale.memory_2d] + [(s, s, s) for s in scale.memory_3d]
    for spatial in shapes:
        voxels = 2 * math.prod(spatial)
        peaks = {subject: _probe_in_subprocess(subject, spatial, device) for subject in MEMORY_SUBJECTS}
        size = "x".join(map(str, spatial))
        extra = peaks["loss+recorder"] - peaks["loss"]
        for subject, value in (("GeometricLoss fwd+bwd", peaks["loss"]), ("Recorder (all taps), extra", extra)):
            rows.append(Result("peak memory", f"{subject}, 2x2x{size}", "", value / 2 ** 20, "MiB", "", None,
                               f"{value / voxels:.1f} bytes per voxel; {method}"))
    return rows


def _net_name(scale: Scale) -> str:
    return f"PlainConvUNet {len(scale.features)} stages {scale.features[0]}-{scale.features[-1]}"


def _step_name(scale: Scale) -> str:
    return f"nnU-Net 2D step {scale.step_batch}x1x{scale.step_size}^2, {_net_name(scale)}"


BENCHMARKS: dict[str, Callable[[Scale, torch.device, Clock], list[Result]]] = {
    "monitor": bench_monitor,
    "provenance": bench_provenance,
    "loss-share": bench_loss_fraction,
    "vectorisation": bench_vectorised,
    "sweep": bench_sweep,
    "histogram": bench_histogram,
    "host-syncs": bench_host_syncs,
    "memory": bench_memory,
    "autotaps": bench_autotaps,
}


# ---------------------------------------------------------------------- run and write
def run_bench(device: str = "cpu", quick: bool = False, only: Optional[Iterable[str]] = None,
              progress: Optional[Callable[[str], None]] = None, scale_name: Optional[str] = None) -> list[Result]:
    """Run the selected benchmarks (all by default) at ``scale_name`` (default: quick or full) and return their
    rows."""
    names = list(only) if only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise GeodiagError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    scale_name = scale_name or ("quick" if quick else "full")
    if scale_name not in SCALES:
        raise GeodiagError(f"unknown bench scale {scale_name!r}; choose from {', '.join(SCALES)}")
    dev = torch.device(device)
    scale = SCALES[scale_name]
    clock = Clock(dev)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        results: list[Result] = []
        for name in names:
            if progress:
                progress(f"bench {name} ({scale.name})")
            results += BENCHMARKS[name](scale, dev, clock)
        return results
    finally:
        torch.set_num_threads(threads)


def environment_line(device: str) -> str:
    """What the figures depend on besides the code: library versions, the device, the threads the run used."""
    dev = torch.device(device)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
             f"CPU ({os.cpu_count()} cores; torch set to 1 thread, {torch.get_num_threads()} by default here)")
    return f"torch {torch.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}; {where}"


def to_markdown(results: Sequence[Result], header: str) -> str:
    lines = ["# geodiag bench", "", header, "",
             "| benchmark | subject | vs | value | target | met | method |", "|---|---|---|---|---|---|---|"]
    for r in results:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.benchmark} | {r.subject} | {r.baseline} | {_format(r.value)} {r.unit} | {r.target} "
                     f"| {met} | {r.method} |")
    return "\n".join(lines) + "\n"


def to_csv(results: Sequence[Result]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({**asdict(r), "met": "" if r.met is None else str(r.met).lower()})
    return buffer.getvalue()


def readme_table(results: Sequence[Result]) -> str:
    """The rows with a target, as the README's "What it costs" table (paste it there)."""
    lines = ["| measured | vs | value | target | met |", "|---|---|---|---|---|"]
    for r in results:
        if r.target:
            lines.append(f"| {r.benchmark}: {r.subject} | {r.baseline} | {_format(r.value)} {r.unit} | {r.target} "
                         f"| {'yes' if r.met else '**no**'} |")
    return "\n".join(lines) + "\n"


def missed_targets(results: Sequence[Result]) -> list[str]:
    """One line per missed target."""
    return [f"missed: {r.benchmark}: {r.subject} vs {r.baseline or 'nothing'}: {_format(r.value)} {r.unit}, "
            f"target {r.target}" for r in results if r.met is False]


def write_results(results: Sequence[Result], out: Path, header: str) -> tuple[Path, Path]:
    """DIR/bench.csv, DIR/bench.md and DIR/readme_table.md."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        csv_path, md_path = out / "bench.csv", out / "bench.md"
        csv_path.write_text(to_csv(results))
        md_path.write_text(to_markdown(results, header))
        (out / "readme_table.md").write_text(header + "\n\n" + readme_table(results))
    except OSError as exc:
        raise GeodiagError(f"cannot write the bench results into {out}: {exc.strerror or exc}") from None
    return csv_path, md_path


def _format(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
