"""A log-magnitude histogram accumulated on the tensor's device, read back only on demand.

Why: a NaN hunt needs the shape of a distribution over many steps (how many pixels sit near zero, how close
values come to the fp16 range) without the host sync per step that makes Cockpit or TensorBoard histograms
expensive. ``LogHistogram.update`` uses only fixed-shape device ops (no ``.item()``, no boolean indexing,
no ``bincount``, whose CUDA kernel reads the maximum back), so it can run every step; ``packed()`` gives
the whole state as one float64 vector for a single transfer, ``summarize`` turns that host copy into a row.

Counts are exact: NaN, +Inf, -Inf, exact zeros, negatives, fp32 subnormals and what a cast to fp16 / bf16
would do (overflow to inf, underflow to zero, land in the subnormal range) are counted from the cast
itself, so rounding at the boundaries (65519 -> 65504, 65520 -> inf, 2^-25 -> 0) is exactly IEEE's.
``thresholds`` adds exact counts of ``x < t`` (not read off the bins). Non-finite values never enter the
bins, the extrema or the moments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

# Exact per-element counts kept beside the bins, in this order in the count buffer.
SPECIAL_COUNTS = (
    "count",           # every element seen, NaN included
    "nan",
    "posinf",
    "neginf",
    "zero",            # exactly 0 (either sign)
    "negative",        # x < 0, -inf included
    "fp32_subnormal",  # 0 < |x| < 2^-126
    "fp16_overflow",   # finite, but inf once cast to fp16 (|x| >= 65520)
    "fp16_underflow",  # nonzero, but 0 once cast to fp16 (|x| <= 2^-25)
    "fp16_subnormal",  # nonzero fp16 subnormal once cast (|x| < 2^-14 after rounding)
    "bf16_overflow",
    "bf16_underflow",
    "bf16_subnormal",
)
QUANTILES = (0.5, 0.9, 0.99, 0.999)
_CAST_CHECKS = (("fp16", torch.float16), ("bf16", torch.bfloat16))


@dataclass(frozen=True)
class BinLayout:
    """Log10 bins of |x|: ``bins_per_decade`` per decade from 10^log10_min to 10^log10_max.

    The defaults span fp32 from its smallest subnormal (1.4e-45) to its maximum (3.4e38). The first and
    last bins are open-ended, so fp64 values outside that range still land in a bin.
    """

    bins_per_decade: int = 4
    log10_min: int = -46
    log10_max: int = 39

    def __post_init__(self) -> None:
        if self.bins_per_decade < 1 or self.log10_max <= self.log10_min:
            raise ValueError(f"invalid bin layout {self}")

    @property
    def n_bins(self) -> int:
        return self.bins_per_decade * (self.log10_max - self.log10_min)

    def edges(self) -> np.ndarray:
        """The n_bins + 1 bin edges of |x|."""
        return 10.0 ** (self.log10_min + np.arange(self.n_bins + 1) / self.bins_per_decade)


class LogHistogram:
    """Device-side histogram of log10 |x| plus exact special-value counts, extrema and moments."""

    def __init__(
        self,
        layout: BinLayout = BinLayout(),
        thresholds: Sequence[float] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        thresholds = tuple(float(t) for t in thresholds)
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"thresholds must be strictly increasing, got {thresholds}")
        self.layout = layout
        self.thresholds = thresholds
        self.device = torch.device(device)
        n_special = len(SPECIAL_COUNTS)
        # One int64 buffer (special counts | bins | threshold buckets) so merging is one add / one all_reduce.
        self._counts = torch.zeros(n_special + layout.n_bins + len(thresholds) + 1, dtype=torch.int64,
                                   device=self.device)
        self._special = self._counts[:n_special]
        self._bins = self._counts[n_special:n_special + layout.n_bins]
        self._buckets = self._counts[n_special + layout.n_bins:]
        self._moments = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, sum of squares
        self._extrema = torch.full((2,), math.inf, dtype=torch.float64, device=self.device)  # min, -max
        self._threshold_tensor = torch.tensor(thresholds, dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------------ accumulate (no host sync)
    @torch.no_grad()
    def update(self, tensor: torch.Tensor) -> None:
        """Add every element of ``tensor`` (any shape, any float dtype, on this histogram's device)."""
        if tensor.numel() == 0:
            return
        x = tensor.detach().flatten()
        if not x.is_floating_point():
            x = x.to(torch.float64)
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        finite = torch.isfinite(x)
        magnitude = x.abs()
        nonzero = magnitude != 0
        flags = [
            torch.isnan(x),
            x == math.inf,
            x == -math.inf,
            x == 0,
            x < 0,
            nonzero & (magnitude < torch.finfo(torch.float32).tiny),
        ]
        for _, dtype in _CAST_CHECKS:
            cast = magnitude.to(dtype)
            flags += [
                torch.isinf(cast) & finite,
                (cast == 0) & nonzero,
                (cast != 0) & (cast < torch.finfo(dtype).tiny),
            ]
        self._special[0] += x.numel()
        self._special[1:] += torch.stack([f.sum() for f in flags])

        in_bins = finite & nonzero
        safe = torch.where(in_bins, magnitude, torch.ones_like(magnitude))
        index = ((torch.log10(safe) - self.layout.log10_min) * self.layout.bins_per_decade).floor()
        index = index.clamp_(0, self.layout.n_bins - 1).long()
        self._bins.index_add_(0, index, in_bins.long())

        if self.thresholds:
            # bucket j holds t[j-1] <= x < t[j]; NaN goes to the last bucket (below no threshold).
            bucket = torch.bucketize(x.to(torch.float64), self._threshold_tensor, right=True)
            bucket = torch.where(torch.isnan(x), len(self.thresholds), bucket)
            self._buckets.index_add_(0, bucket, torch.ones((), dtype=torch.int64, device=x.device).expand_as(bucket))

        values = torch.where(finite, x, 0).to(torch.float64)
        self._moments += torch.stack([values.sum(), values.square().sum()])
        low = torch.where(finite, x, math.inf).amin().to(torch.float64)
        high = torch.where(finite, x, -math.inf).amax().to(torch.float64)
        torch.minimum(self._extrema, torch.stack([low, -high]), out=self._extrema)

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        """Add ``other``'s counts into this one (same layout and thresholds); returns self."""
        if other.layout != self.layout or other.thresholds != self.thresholds:
            raise ValueError("cannot merge histograms with different layouts or thresholds")
        self._counts += other._counts.to(self.device, non_blocking=True)
        self._moments += other._moments.to(self.device, non_blocking=True)
        torch.minimum(self._extrema, other._extrema.to(self.device, non_blocking=True), out=self._extrema)
        return self

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> "LogHistogram":
        """Merge across the ranks of ``group`` in place (counts and moments summed, extrema min/max)."""
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self._moments, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self._extrema, op=dist.ReduceOp.MIN, group=group)
        return self

    def reset(self) -> None:
        self._counts.zero_()
        self._moments.zero_()
        self._extrema.fill_(math.inf)

    # ------------------------------------------------------------------ read back
    def packed(self) -> torch.Tensor:
        """The whole state as one float64 device vector (counts are exact below 2^53)."""
        return torch.cat([self._counts.to(torch.float64), self._moments, self._extrema])

    @property
    def packed_size(self) -> int:
        return self._counts.numel() + 4

    def summarize(self, packed: np.ndarray) -> dict:
        """A flat row from a host copy of ``packed()``: counts, fractions, extrema, mean, quantiles of |x|."""
        n_special, n_bins = len(SPECIAL_COUNTS), self.layout.n_bins
        special = dict(zip(SPECIAL_COUNTS, (int(v) for v in packed[:n_special])))
        bins = packed[n_special:n_special + n_bins]
        buckets = packed[n_special + n_bins:self._counts.numel()]
        total_sum, total_sq, low, neg_high = packed[self._counts.numel():]
        count = special["count"]
        finite = count - special["nan"] - special["posinf"] - special["neginf"]
        row: dict = dict(special)
        row["finite"] = finite
        row["nonfinite_fraction"] = (count - finite) / count if count else math.nan
        row["zero_fraction"] = special["zero"] / count if count else math.nan
        row["min"] = float(low) if finite else math.nan
        row["max"] = float(-neg_high) if finite else math.nan
        row["mean"] = float(total_sum / finite) if finite else math.nan
        row["rms"] = math.sqrt(float(total_sq) / finite) if finite else math.nan
        row["sum"] = float(total_sum)
        abs_max = max(abs(row["min"]), abs(row["max"])) if finite else math.nan
        for q in QUANTILES:
            row[f"abs_p{q * 100:g}"] = self._quantile(bins, special["zero"], q, abs_max)
        below = np.cumsum(buckets)[:len(self.thresholds)]
        for t, n in zip(self.thresholds, below):
            row[f"below_{t:g}"] = float(n / count) if count else math.nan
        row["bin_counts"] = [int(v) for v in bins]
        return row

    def _quantile(self, bins: np.ndarray, zeros: int, q: float, abs_max: float) -> float:
        """Quantile q of |x| over finite values, interpolated log-linearly inside its bin."""
        total = zeros + bins.sum()
        if total == 0:
            return math.nan
        rank = q * total
        if rank <= zeros:
            return 0.0
        cumulative = zeros + np.cumsum(bins)
        i = int(np.searchsorted(cumulative, rank))
        before = cumulative[i] - bins[i]
        fraction = (rank - before) / bins[i]
        lo = 10.0 ** (self.layout.log10_min + i / self.layout.bins_per_decade)
        value = lo * 10.0 ** (fraction / self.layout.bins_per_decade)
        return float(min(value, abs_max))

    def to_dict(self) -> dict:
        """``summarize`` of this histogram alone (one device-to-host transfer)."""
        return self.summarize(self.packed().cpu().numpy())

    def fraction_below(self) -> dict[float, float]:
        """Exact fraction of all elements (NaN included in the denominator) with x < t, per threshold."""
        row = self.to_dict()
        return {t: row[f"below_{t:g}"] for t in self.thresholds}


def decade_grid(first: int = -8, last: int = -1) -> tuple[float, ...]:
    """(1e-8, 1e-7, ..., 1e-1) by default: the eps values a sqrt stabiliser is tried at."""
    return tuple(10.0 ** k for k in range(first, last + 1))

