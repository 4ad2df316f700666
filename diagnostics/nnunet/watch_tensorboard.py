"""``geodiag watch --tensorboard DIR``: the per-step scalars and geodiag's own |x| bins, written through TensorBoard's
``SummaryWriter`` (``add_histogram_raw``: the bins as recorded, no recomputation from values)."""
from __future__ import annotations

import math

from ..instruments.errors import ArgumentError

SCALARS = ("loss", "grad_norm", "scale", "skipped", "prior_share")


def summary_writer_class():
    """TensorBoard's SummaryWriter, or a one-line error naming the option when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ArgumentError("{tensorboard} needs the tensorboard package (pip install tensorboard)",
                            "tensorboard") from None
    return SummaryWriter


class TensorBoardSink:
    """One run's event files in ``folder``."""

    def __init__(self, folder: str) -> None:
        self.writer = summary_writer_class()(folder)

    def scalars(self, row: dict) -> None:
        for key in SCALARS:
            value = row.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(f"watch/{key}", value, row["iteration"])

    def histograms(self, rows: list[dict], edges, step: int) -> None:
        for row in rows:
            counts = row["bin_counts"]
            if not sum(counts):
                continue
            self.writer.add_histogram_raw(
                f"{row['name']}/{row['kind']} |x|", min=float(edges[0]), max=float(edges[-1]), num=int(sum(counts)),
                sum=float(row["sum"]), sum_squares=float(row["rms"]) ** 2 * row["finite"],
                bucket_limits=[float(e) for e in edges[1:len(counts) + 1]], bucket_counts=counts, global_step=step)

    def close(self) -> None:
        self.writer.close()
