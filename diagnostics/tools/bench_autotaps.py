"""The ``autotaps`` row of ``geodiag bench``: a loss's forward + backward under automatic taps against the same
loss alone, interleaved in one run (target: at most 3x, the loss being about 1% of a training step).

Two rows per loss: taps kept over many calls and read back once (``autotap_overhead``: how a pass over many
inputs uses them; the read-back spread over the calls), and a fresh AutoTaps per call read back every time (how
analyze-checkpoint uses them, one per case and pass). Losses: GeometricLoss's production preset (vectorised)
and v2.3 (the seed's arithmetic), on soft predictions of disks.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from geodiag.losses import GeometricLoss

from ..nonfinite.autotaps import AutoTaps

TARGET_RATIO = 3.0


def bench_autotaps(scale, device: torch.device, clock) -> list:
    from .bench_common import Result, interleaved_medians
    from .bench_step import disk_labels, soft_logits

    generator = torch.Generator().manual_seed(12)
    label = disk_labels(2, (scale.vector_size,) * 2, generator).to(device)
    logits = soft_logits(label.cpu(), generator).to(device)
    rows = []
    size = f"the same loss alone, 2x2x{scale.vector_size}^2"
    for preset in ("production", "v2.3"):
        loss = GeometricLoss.from_preset(preset, softmax=True)

        def plain():
            loss(logits.clone().requires_grad_(True), label).backward()

        def tapped():
            taps = AutoTaps()
            taps.run(loss, logits.clone().requires_grad_(True), label).backward()
            taps.result()

        kept = autotap_overhead(loss, logits, label, repeats=3 * scale.repeats)
        rows.append(Result("autotaps", f"GeometricLoss {preset} fwd+bwd + AutoTaps, read back once", size,
                           kept["ratio"], "x", f"<= {TARGET_RATIO:g}x", kept["ratio"] <= TARGET_RATIO,
                           f"{kept['repeats']} alternating calls each, {kept['clock']}"))
        times = interleaved_medians({"plain": plain, "tapped": tapped}, clock, scale.repeats, scale.inner)
        ratio = times["tapped"] / times["plain"]
        rows.append(Result("autotaps", f"GeometricLoss {preset} fwd+bwd + a new AutoTaps read back per call", size,
                           ratio, "x", f"<= {TARGET_RATIO:g}x", ratio <= TARGET_RATIO,
                           f"median of {scale.repeats} interleaved repeats, {clock.name}"))
    return rows


def autotap_overhead(loss: Callable, prediction: torch.Tensor, target: Optional[torch.Tensor] = None,
                     repeats: int = 20) -> dict:
    """Thread CPU time of the loss's forward + backward without and with automatic taps, measured side by side.

    The two variants alternate (plain, tapped, plain, ...) after one warm-up of each, so drift of a shared machine
    falls on both; the tapped time includes its ``result()`` read-back, spread over the ``repeats`` calls.
    On CUDA each timed block ends with a synchronize so queued kernels are paid for by the block that issued them.
    """
    def step(taps: Optional[AutoTaps]) -> None:
        leaf = prediction.detach().clone().requires_grad_(True)
        value = taps.run(loss, leaf, target) if taps is not None else loss(leaf, target)
        value.backward()

    def finish() -> None:
        if prediction.device.type == "cuda":
            torch.cuda.synchronize(prediction.device)

    warm = AutoTaps()
    step(None), step(warm), warm.result(), finish()
    taps, plain, tapped = AutoTaps(), 0.0, 0.0
    for _ in range(repeats):
        start = time.thread_time()
        step(None)
        finish()
        middle = time.thread_time()
        step(taps)
        finish()
        plain, tapped = plain + middle - start, tapped + time.thread_time() - middle
    start = time.thread_time()
    taps.result()
    tapped += time.thread_time() - start
    return {"plain_s": plain / repeats, "tapped_s": tapped / repeats, "ratio": tapped / plain, "repeats": repeats,
            "clock": "thread CPU time"}
