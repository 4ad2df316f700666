"""The ``autotaps`` row of ``geodiag bench``: a loss's forward + backward under automatic taps against the same
loss alone, interleaved in one run (target: at most 3x, the loss being about 1% of a training step).

Two rows per loss: taps kept over many calls and read back once (``autotap_overhead``: how a pass over many
inputs uses them; the read-back spread over the calls), and a fresh AutoTaps per call read back every time (how
analyze-checkpoint uses them, one per case and pass). Losses: GeometricLoss's production preset (vectorised)
and v2.3 (the seed's arithmetic), on soft predictions of disks.
"""
from __future__ import annotations

import torch

from geodiag.losses import GeometricLoss

from ..nonfinite.autotaps import AutoTaps, autotap_overhead

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
