"""A log-magnitude histogram accumulated on the tensor's device, read back only on demand.

Why: a NaN hunt needs the shape of a distribution over many steps (how many pixels sit near zero, how close
values come to the fp16 range) without the host sync per step that makes Cockpit or TensorBoard histograms
expensive. ``LogHistogram.update`` finds each value's count positions from its bits (``histogram_bins``): when the
values and the histogram are both on the CPU, fp32/fp16/bf16 values go through a compiled kernel that reads each
value once (``_cpu_kernels.c``); elsewhere, and for fp64, a few integer torch ops and one bincount (a
``scatter_add_`` into a fixed-size buffer: torch.bincount on CUDA reads its maximum back), with no ``.item()`` and
no boolean indexing, so it can run every step. ``packed()`` gives the whole state as one float64 vector for a
single transfer, ``summarize`` turns that host copy into a row.

Counts are exact: NaN, +Inf, -Inf, exact zeros, negatives, fp32 subnormals, and what a cast to fp16 / bf16
would do (overflow to inf, underflow to zero, land in the subnormal range), counted against the exact
round-to-nearest-even boundaries of |x| (65519 -> 65504, 65520 -> inf, 2^-25 -> 0). ``thresholds`` adds
exact counts of ``x < t`` (not read off the bins). Non-finite values never enter the bins, the extrema or
the moments. (fp64 input is counted by its exact rounding; torch casts fp64 to bf16 through fp32.)
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import kernels
from .histogram_bins import CELL_MASK, CELL_SHIFT, INF_BITS, MAGNITUDE, RAW_COUNTS, BinLayout, kernel_tables, segments

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
QUANTILES = (0.5, 0.9, 0.99, 0.999)
_EXTREMA = 3  # min, -max, min |x|: the last entries of packed(), merged by minimum


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


_CHUNK = 1 << 16                   # elements per pass on the CPU: the scratch buffers stay in cache
_CHUNK_DEVICE = 1 << 22            # elsewhere few large passes (each op is a kernel launch)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _kernel_tables(layout: BinLayout, thresholds: tuple) -> object:
    """The kernel's own checked copy of the tables (made once per layout and thresholds)."""
    tables = kernel_tables(layout, thresholds)
    return kernels.compiled.make_tables(tables.offset, tables.cuts, tables.n_positive, tables.source, tables.target)


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
        if len({f"{t:g}" for t in thresholds}) < len(thresholds):  # each names a column below_<t:g>
            raise ValueError(f"thresholds must differ in their first 6 significant digits, got {thresholds}")
        self.layout = layout
        self.thresholds = thresholds
        self.device = torch.device(device)
        n_raw = len(RAW_COUNTS)
        # One int64 buffer (raw counts | bins | threshold buckets) so merging is one add / one all_reduce.
        self._counts = torch.zeros(n_raw + layout.n_bins + len(thresholds) + 1, dtype=torch.int64,
                                   device=self.device)
        self._moments = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, sum of squares
        # min, -max, min |x| of the finite values: merged by minimum
        self._extrema = torch.full((_EXTREMA,), math.inf, dtype=torch.float64, device=self.device)
        # The kernel's view of the three (host memory, shared with the tensors, which are only ever changed in place).
        self._host_buffers = (tuple(b.numpy() for b in (self._counts, self._moments, self._extrema))
                              if self.device.type == "cpu" else None)

    # ------------------------------------------------------------------ accumulate (no host sync)
    def update(self, *tensors: torch.Tensor) -> None:
        """Add every element of each tensor (any shape, any float dtype) to this one histogram: several tensors
        (e.g. every parameter's gradient) in one call pay the fixed costs once. A tensor on another device than
        this histogram is copied over piece by piece (a transfer: keep them together); meta tensors (no values,
        shapes only) go only into a histogram on meta, the others never."""
        on_meta = self._counts.is_meta
        for t in tensors:
            if t.is_meta != on_meta:
                raise ValueError(f"LogHistogram on {self._counts.device} cannot count a tensor on {t.device}: a meta "
                                 "tensor holds no values, a meta histogram no counts")
        on_torch = []
        kernel = kernels.compiled is not None and self._host_buffers is not None  # both on the CPU
        for t in tensors:
            if not t.numel():
                continue
            if kernel and t.is_cpu and t.dtype in _KERNEL_DTYPES:
                self._count_on_kernel(t)
            else:
                on_torch.append(t.detach().reshape(-1))
        if on_torch:
            self._update_with_torch(on_torch)

    def _count_on_kernel(self, t: torch.Tensor) -> None:
        """Counted, summed and folded into this histogram's buffers by the kernel, read in place when it is
        contiguous fp32: no torch op, no view."""
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.detach().to(torch.float32).contiguous()  # fp16, bf16 widen exactly
        tables = _kernel_tables(self.layout, self.thresholds)
        kernels.count_fp32(t, tables, *self._host_buffers)

    @torch.no_grad()
    def _update_with_torch(self, flat: list[torch.Tensor]) -> None:
        chunk = min(max(x.numel() for x in flat), _CHUNK if self.device.type == "cpu" else _CHUNK_DEVICE)
        lookup = segments(self.layout, self.thresholds, self.device)
        counts = torch.zeros(lookup.count, dtype=torch.int64, device=self.device)
        wide = torch.empty(chunk, dtype=torch.float64, device=self.device)
        cell, magnitude, segment, scratch = (torch.empty(chunk, dtype=torch.int64, device=self.device)
                                             for _ in range(4))
        above = torch.empty(chunk, dtype=torch.int64, device=self.device)
        ones = torch.ones((), dtype=torch.int64, device=self.device).expand(chunk)
        partials = []  # per piece: sum, sum of squares, min, -max, min |x|
        for x in flat:
            for start in range(0, x.numel(), chunk):
                piece = x[start:start + chunk]
                m = piece.numel()
                value = wide[:m].copy_(piece)  # exact: fp64 holds every fp16, bf16 and fp32 value
                bits = value.view(torch.int64)
                key = torch.bitwise_right_shift(bits, CELL_SHIFT, out=cell[:m]).bitwise_and_(CELL_MASK)
                mag = torch.bitwise_and(bits, MAGNITUDE, out=magnitude[:m])
                found = torch.index_select(lookup.offset, 0, key, out=segment[:m])
                torch.sub(mag, found, out=found).bitwise_right_shift_(CELL_SHIFT)
                for below in lookup.below_cut:
                    found.add_(torch.gt(mag, torch.index_select(below, 0, key, out=scratch[:m]), out=above[:m]))
                counts.scatter_add_(0, found, ones[:m])  # a bincount into a fixed size (torch.bincount syncs on CUDA)
                partials.append(torch.stack(self._statistics(value, mag)))
        self._counts.index_add_(0, lookup.target, counts.index_select(0, lookup.source))
        totals = torch.stack(partials)
        self._moments += totals[:, :2].sum(dim=0)
        torch.minimum(self._extrema, totals[:, 2:].amin(dim=0), out=self._extrema)

    @staticmethod
    def _statistics(value: torch.Tensor, mag: torch.Tensor) -> list[torch.Tensor]:
        """Sum, sum of squares, min, -max and min |x| of ``value`` (fp64, overwritten) with its non-finite entries
        read as 0, ``mag`` its magnitude bits (NaN and Inf have the largest: they win the minimum only when alone).
        A min or max of 0 that a NaN or Inf made is told apart in ``summarize`` (``_extremum``)."""
        smallest = mag.min().clamp_max_(INF_BITS).view(torch.float64)
        value.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return [value.sum(), torch.dot(value, value), value.amin(), -value.amax(), smallest]

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
        return self._counts.numel() + 2 + _EXTREMA

    @staticmethod
    def merge_packed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Host copies of two ``packed()`` states merged: counts and moments add, the extrema take the minimum."""
        merged = a + b
        merged[-_EXTREMA:] = np.minimum(a[-_EXTREMA:], b[-_EXTREMA:])
        return merged

    def summarize(self, packed: np.ndarray) -> dict:
        """A flat row from a host copy of ``packed()``: counts, fractions, signed extrema (min, max), extrema and
        quantiles of |x| (abs_min, abs_p50, ..., abs_max), mean, rms; all over the finite values."""
        return self.summarize_many(packed[None])[0]

    def summarize_many(self, packed: np.ndarray) -> list[dict]:
        """``summarize`` of each row of [N, packed_size]: host copies of the states of N histograms with this one's
        layout and thresholds (a recorder or AutoTaps reads dozens back at once), with one numpy pass for all."""
        n_raw, n_bins, n_counts = len(RAW_COUNTS), self.layout.n_bins, self._counts.numel()
        raw = dict(zip(RAW_COUNTS, packed[:, :n_raw].astype(np.int64).T))
        bins = packed[:, n_raw:n_raw + n_bins].copy()
        bins[:, 0] -= raw["zero"] + raw["nan"]
        bins[:, -1] -= raw["infinite"]
        below = np.cumsum(packed[:, n_raw + n_bins:n_counts], axis=1)[:, :len(self.thresholds)].tolist()
        named = {name: column.tolist() for name, column in _named_counts(raw).items()}
        rows = []
        for r, (total_sum, total_sq, low, neg_high, abs_min) in enumerate(packed[:, n_counts:].tolist()):
            row: dict = {name: column[r] for name, column in named.items()}
            count, zeros = row["count"], row["zero"]
            finite = row["finite"] = count - row["nan"] - row["posinf"] - row["neginf"]
            row["nonfinite_fraction"] = (count - finite) / count if count else math.nan
            row["zero_fraction"] = zeros / count if count else math.nan
            row["min"] = self._extremum(low, zeros, abs_min) if finite else math.nan
            row["max"] = -self._extremum(neg_high, zeros, abs_min) if finite else math.nan
            row["mean"] = total_sum / finite if finite else math.nan
            row["rms"] = math.sqrt(total_sq / finite) if finite else math.nan
            row["sum"] = total_sum
            row["abs_min"] = abs_min if finite else math.nan
            row["abs_max"] = max(abs(row["min"]), abs(row["max"])) if finite else math.nan
            for t, n in zip(self.thresholds, below[r]):
                row[f"below_{t:g}"] = n / count if count else math.nan
            rows.append(row)
        quantiles = self._quantiles(bins, raw["zero"], packed[:, n_counts + 4].tolist(),
                                    [row["abs_max"] for row in rows])
        for row, values, counts in zip(rows, quantiles, bins.astype(np.int64).tolist()):
            for q, value in zip(QUANTILES, values):
                row[f"abs_p{q * 100:g}"] = value
            row["bin_counts"] = counts
        return rows

    @staticmethod
    def _extremum(low: float, zeros: int, abs_min: float) -> float:
        """The finite minimum (or, negated, maximum) from the device's, where NaN and Inf counted as 0: a 0 there
        means no finite value lies below 0, so the minimum is 0 if a finite 0 was seen, else the smallest |x|."""
        return low if low != 0 or zeros else abs_min

    def _quantiles(self, bins: np.ndarray, zeros: np.ndarray, abs_min: list[float],
                   abs_max: list[float]) -> list[list[float]]:
        """Per row, the ``QUANTILES`` of |x| over the finite values: for each q the value of rank floor(q (n - 1))
        (numpy's "lower" method), found in its bin and placed log-linearly inside it by its rank there, between the
        bin's edges narrowed to the smallest and the largest |x| (so it never leaves [abs_min, abs_max] or the
        bin)."""
        cumulative = zeros[:, None] + np.cumsum(bins, axis=1)
        totals = cumulative[:, -1]
        ranks = np.floor(np.array(QUANTILES)[None, :] * (totals[:, None] - 1))  # 0-based
        # the first bin holding more than the rank's values (searchsorted, side="right", row by row)
        found = (cumulative[:, None, :] <= ranks[:, :, None]).sum(axis=2)
        through = np.take_along_axis(cumulative, found, axis=1).tolist()
        in_bin = np.take_along_axis(bins, found, axis=1).tolist()
        values = []
        for r, (total, zero_count) in enumerate(zip(totals.tolist(), zeros.tolist())):
            if total == 0:
                values.append([math.nan] * len(QUANTILES))
                continue
            low_log = math.log10(abs_min[r]) if abs_min[r] > 0 else -math.inf
            high_log = math.log10(abs_max[r]) if abs_max[r] > 0 else -math.inf
            row = []
            for rank, i, upto, count in zip(ranks[r].tolist(), found[r].tolist(), through[r], in_bin[r]):
                if rank < zero_count:
                    row.append(0.0)
                    continue
                fraction = (rank - (upto - count) + 0.5) / count
                edge = self.layout.log10_min + i / self.layout.bins_per_decade
                lo = max(low_log, edge)
                hi = max(min(high_log, edge + 1 / self.layout.bins_per_decade), lo)
                row.append(float(10.0 ** (lo + fraction * (hi - lo))))
            values.append(row)
        return values

    def to_dict(self) -> dict:
        """``summarize`` of this histogram alone (one device-to-host transfer)."""
        return self.summarize(self.packed().cpu().numpy())

    def fraction_below(self) -> dict[float, float]:
        """Exact fraction of all elements (NaN included in the denominator) with x < t, per threshold."""
        row = self.to_dict()
        return {t: row[f"below_{t:g}"] for t in self.thresholds}


def summarize_states(histograms: Sequence[LogHistogram], states: Sequence[np.ndarray]) -> list[dict]:
    """``summarize`` of each histogram from a host copy of its ``packed()`` state, in one numpy pass per group of
    histograms sharing a layout and thresholds."""
    groups: dict[tuple, list[int]] = {}
    for index, histogram in enumerate(histograms):
        groups.setdefault((histogram.layout, histogram.thresholds), []).append(index)
    rows: list[dict] = [{} for _ in histograms]
    for indices in groups.values():
        summaries = histograms[indices[0]].summarize_many(np.stack([states[i] for i in indices]))
        for index, summary in zip(indices, summaries):
            rows[index] = summary
    return rows


def decade_grid(first: int = -8, last: int = -1) -> tuple[float, ...]:
    """(1e-8, 1e-7, ..., 1e-1) by default: the eps values a sqrt stabiliser is tried at."""
    return tuple(10.0 ** k for k in range(first, last + 1))

