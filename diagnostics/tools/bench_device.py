"""What the loss costs besides time: host syncs of its forward + backward (with and without every tap recorded),
and its peak memory per image size.

Memory is measured in a fresh subprocess per size: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
peak resident set (``VmHWM`` of /proc/self/status, reset through /proc/self/clear_refs after the inputs exist,
glibc's mmap threshold fixed at 64 KiB so freed tensors leave the resident set), i.e. what the process really
touched, allocator overhead included.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from geodiag.losses import GeometricLoss

from ..instruments.errors import ArgumentError, GeodiagError
from ..instruments.host_sync import count_host_syncs
from ..instruments.recorder import Recorder
from .bench_common import Clock, Result, Scale
from .bench_step import disk_labels, soft_logits


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
    code = ("import sys, torch; torch.set_num_threads(1); from geodiag.diagnostics.tools.bench_device import memory_probe; "
            f"print(memory_probe({subject!r}, {tuple(spatial)!r}, {str(device)!r}))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise GeodiagError(f"memory probe {subject} {tuple(spatial)} failed: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return int(done.stdout.strip().splitlines()[-1])


# Bytes: twice the largest spread of the CPU peak over five identical probes on the project's machine (160 KiB):
# a smaller difference of two peaks is noise, either way.
EXTRA_RESOLUTION = 320 * 1024


def bench_memory(scale: Scale, device: torch.device, clock: Clock) -> list[Result]:
    """Peak memory of the loss and of the recorder's extra, per image size (batch 2, 2 channels)."""
    if device.type == "cpu" and not Path("/proc/self/clear_refs").exists():
        raise ArgumentError("peak memory on the CPU needs Linux /proc/self/clear_refs; set {device} to cuda",
                            "device")
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "peak RSS (VmHWM after clear_refs, glibc mmap threshold 64 KiB), fresh process per size")
    rows = []
    shapes = [(s, s) for s in scale.memory_2d] + [(s, s, s) for s in scale.memory_3d]
    for spatial in shapes:
        voxels = 2 * math.prod(spatial)
        peaks = {subject: _probe_in_subprocess(subject, spatial, device) for subject in MEMORY_SUBJECTS}
        size = "x".join(map(str, spatial))
        extra = peaks["loss+recorder"] - peaks["loss"]
        rows.append(Result("peak memory", f"GeometricLoss fwd+bwd, 2x2x{size}", "", peaks["loss"] / 2 ** 20, "MiB",
                           "", None, f"{peaks['loss'] / voxels:.1f} bytes per voxel; {method}"))
        # A difference of two processes' peaks: on the CPU it moves by a few pages from run to run, either way.
        resolution = 0 if device.type == "cuda" else EXTRA_RESOLUTION
        shown = extra if abs(extra) > resolution else 0
        note = (f"{extra / voxels:.1f} bytes per voxel" if shown else
                f"within +-{resolution // 1024} KiB of 0 (measured {extra / 1024:+.0f} KiB)")
        rows.append(Result("peak memory", f"Recorder (all taps), extra, 2x2x{size}", "", shown / 2 ** 20, "MiB", "",
                           None, f"{note}; the difference of two such peaks; {method}"))
    return rows
