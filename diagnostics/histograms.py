"""A log-magnitude histogram accumulated on the tensor's device, read back only on demand.

Why: a NaN hunt needs the shape of a distribution over many steps (how many pixels sit near zero, how close
values come to the fp16 range) without the host sync per step that makes Cockpit or TensorBoard histograms
expensive. ``LogHistogram.update`` uses only fixed-shape device ops (no ``.item()``, no boolean indexing,
no ``bincount``, whose CUDA kernel reads the maximum back), so it can run every step; ``packed()`` gives
the whole state as one float64 vector for a single transfer, ``summarize`` turns that host copy into a row.

Counts are exact: NaN, +Inf, -Inf, exact zeros, negatives, fp32 subnormals, and what a cast to fp16 / bf16
would do (overflow to inf, underflow to zero, land in the subnormal range), counted against the exact
round-to-nearest-even boundaries of |x| (65519 -> 65504, 65520 -> inf, 2^-25 -> 0). ``thresholds`` adds
exact counts of ``x < t`` (not read off the bins). Non-finite values never enter the bins, the extrema or
the moments. (fp64 input is counted by its exact rounding; torch casts fp64 to bf16 through fp32.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

# The named counts of a summary row.
SPECIAL_COUNTS = (
    "count",           # every element seen, NaN included
    "nan",
    "posinf",
    "neginf",
    "zero",            # exactly 0 (either sign)
    "negative",        # x < 0, -inf included
    "fp32_subnormal",  # 0 < |x| < 2^-126
    "fp16_overflow",   # finite, but inf once cast to fp16: |x| >= 65520
    "fp16_underflow",  # nonzero, but 0 once cast to fp16: |x| <= 2^-25
    "fp16_subnormal",  # an fp16 subnormal once cast: 2^-25 < |x| < 2^-14 - 2^-25
    "bf16_overflow",   # |x| >= (2 - 2^-8) 2^127, finite
    "bf16_underflow",  # 0 < |x| <= 2^-134
    "bf16_subnormal",  # 2^-134 < |x| < 2^-126 - 2^-134
)
# Where round-to-nearest-even sends |x| across a range boundary (each exact in fp32): the device counts
# |x| against these, and the named counts are differences of them (``_named_counts``).
_MAGNITUDE_PROBES = (
    ("bf16_underflow_max", torch.le, 2.0 ** -134),      # ties to even: 2^-134 -> 0
    ("bf16_normal_from", torch.lt, 2.0 ** -126 - 2.0 ** -134),  # ties to even: rounds up to 2^-126
    ("fp32_normal_from", torch.lt, 2.0 ** -126),
    ("fp16_underflow_max", torch.le, 2.0 ** -25),
    ("fp16_normal_from", torch.lt, 2.0 ** -14 - 2.0 ** -25),
    ("fp16_overflow_from", torch.ge, 65520.0),
    ("bf16_overflow_from", torch.ge, (2.0 - 2.0 ** -8) * 2.0 ** 127),
)
# Raw device counts, in buffer order: element count, the direct checks, then the probes.
_RAW_COUNTS = ("count", "nan", "posinf", "infinite", "zero", "negative") + tuple(p[0] for p in _MAGNITUDE_PROBES)
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _named_counts(raw: dict[str, int]) -> dict[str, int]:
    """The SPECIAL_COUNTS from the raw device counts."""
    zero, infinite = raw["zero"], raw["infinite"]
    return {
        "count": raw["count"], "nan": raw["nan"], "posinf": raw["posinf"], "neginf": infinite - raw["posinf"],
        "zero": zero, "negative": raw["negative"],
        "fp32_subnormal": raw["fp32_normal_from"] - zero,
        "fp16_overflow": raw["fp16_overflow_from"] - infinite,
        "fp16_underflow": raw["fp16_underflow_max"] - zero,
        "fp16_subnormal": raw["fp16_normal_from"] - raw["fp16_underflow_max"],
        "bf16_overflow": raw["bf16_overflow_from"] - infinite,
        "bf16_underflow": raw["bf16_underflow_max"] - zero,
        "bf16_subnormal": raw["bf16_normal_from"] - raw["bf16_underflow_max"],
    }


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
        n_raw = len(_RAW_COUNTS)
        # One int64 buffer (raw counts | bins | threshold buckets) so merging is one add / one all_reduce.
        self._counts = torch.zeros(n_raw + layout.n_bins + len(thresholds) + 1, dtype=torch.int64,
                                   device=self.device)
        self._raw = self._counts[:n_raw]
        self._bins = self._counts[n_raw:n_raw + layout.n_bins]
        self._buckets = self._counts[n_raw + layout.n_bins:]
        self._moments = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, sum of squares
        self._extrema = torch.full((2,), math.inf, dtype=torch.float64, device=self.device)  # min, -max
        self._bounds_fp32: Optional[tuple[float, ...]] = None

    # ------------------------------------------------------------------ accumulate (no host sync)
    @torch.no_grad()
    def update(self, tensor: torch.Tensor) -> None:
        """Add every element of ``tensor`` (any shape, any float dtype, on this histogram's device)."""
        if tensor.numel() == 0:
            return
        x = tensor.detach().flatten()
        if x.dtype != torch.float64:
            x = x.float()  # fp16 / bf16 / integers: every boundary below is exact in fp32
        magnitude = x.abs()
        # One reused bool buffer and count_nonzero: a fresh flag tensor per check (page faults) and summing
        # a bool tensor (through int64) each cost more than the comparison itself on CPU.
        checks = [(torch.ne, x, x), (torch.eq, x, math.inf), (torch.eq, magnitude, math.inf),
                  (torch.eq, magnitude, 0.0), (torch.lt, x, 0.0)]
        checks += [(compare, magnitude, bound) for _, compare, bound in _MAGNITUDE_PROBES]
        checks += [(torch.lt, x, bound) for bound in self._threshold_bounds(x.dtype)]
        flag = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        flags = torch.stack([torch.count_nonzero(compare(a, b, out=flag)) for compare, a, b in checks])
        n_raw = len(_RAW_COUNTS)
        self._raw[0] += x.numel()
        self._raw[1:] += flags[:n_raw - 1]
        if self.thresholds:
            # bucket j holds t[j-1] <= x < t[j]; NaN compares false everywhere and lands in the last bucket.
            below = torch.cat([flags[n_raw - 1:], flags.new_full((1,), x.numel())])
            self._buckets += torch.diff(below, prepend=below.new_zeros(1))
        del flag

        # Zeros (log10 -> -inf) and NaN land in the first bin, infinities in the last: summarize() takes
        # their exact counts back out, which spares a mask here. In place on |x|, int32 indices (a float ->
        # int64 cast costs 13x a float -> int32 cast on CPU).
        index = magnitude.log10_().sub_(self.layout.log10_min).mul_(self.layout.bins_per_decade)
        index = index.nan_to_num_(nan=0.0).floor_().clamp_(0, self.layout.n_bins - 1).to(torch.int32)
        del magnitude
        ones = torch.ones((), dtype=torch.int64, device=x.device)
        self._bins.index_add_(0, index, ones.expand_as(index))
        del index

        scratch = torch.nan_to_num(x, nan=math.inf, posinf=math.inf, neginf=math.inf)
        low = scratch.amin()
        high = torch.nan_to_num(x, nan=-math.inf, posinf=-math.inf, neginf=-math.inf, out=scratch).amax()
        torch.minimum(self._extrema, torch.stack([low, -high]).to(torch.float64), out=self._extrema)
        values = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0, out=scratch).to(torch.float64)
        self._moments += torch.stack([values.sum(), torch.dot(values, values)])

    def _threshold_bounds(self, dtype: torch.dtype) -> tuple[float, ...]:
        """Per threshold t, the bound b in ``dtype`` with x < t exactly when x < b (t rounded up to ``dtype``)."""
        if dtype == torch.float64 or not self.thresholds:
            return self.thresholds
        bounds = self._bounds_fp32
        if bounds is None:
            rounded = np.array(self.thresholds, dtype=np.float32)
            rounded = np.where(rounded.astype(np.float64) < self.thresholds, np.nextafter(rounded, np.float32(np.inf)),
                               rounded)
            bounds = self._bounds_fp32 = tuple(float(b) for b in rounded)
        return bounds

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
        n_raw, n_bins = len(_RAW_COUNTS), self.layout.n_bins
        raw = dict(zip(_RAW_COUNTS, (int(v) for v in packed[:n_raw])))
        special = _named_counts(raw)
        bins = packed[n_raw:n_raw + n_bins].copy()
        bins[0] -= raw["zero"] + raw["nan"]
        bins[-1] -= raw["infinite"]
        buckets = packed[n_raw + n_bins:self._counts.numel()]
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

