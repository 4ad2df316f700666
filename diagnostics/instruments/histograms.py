"""A log-magnitude histogram accumulated on the tensor's device, read back only on demand.

Why: a NaN hunt needs the shape of a distribution over many steps (how many pixels sit near zero, how close
values come to the fp16 range) without the host sync per step that makes Cockpit or TensorBoard histograms
expensive. ``LogHistogram.update`` reads each value's bits in a few integer ops and counts them with one bincount
(a ``scatter_add_`` into a fixed-size buffer: torch.bincount on CUDA reads its maximum back), with no ``.item()``
and no boolean indexing, so it can run every step; ``packed()`` gives
the whole state as one float64 vector for a single transfer, ``summarize`` turns that host copy into a row.

Counts are exact: NaN, +Inf, -Inf, exact zeros, negatives, fp32 subnormals, and what a cast to fp16 / bf16
would do (overflow to inf, underflow to zero, land in the subnormal range), counted against the exact
round-to-nearest-even boundaries of |x| (65519 -> 65504, 65520 -> inf, 2^-25 -> 0). ``thresholds`` adds
exact counts of ``x < t`` (not read off the bins). Non-finite values never enter the bins, the extrema or
the moments. (fp64 input is counted by its exact rounding; torch casts fp64 to bf16 through fp32.)
"""
from __future__ import annotations

import decimal
import functools
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
        """The n_bins + 1 bin edges of |x|: bin k holds edges[k] <= |x| < edges[k + 1] (the ends open)."""
        return _values(_edge_bits(self))


# ------------------------------------------------------------------ from a value's bits to its counts
# Every count update() keeps is a step function of |x| on each sign: a bin, a rounding boundary of
# _MAGNITUDE_PROBES, a threshold, zero, inf, NaN. The magnitudes where one of them steps ("cuts", kept as fp64 bit
# patterns, whose order is the order of the magnitudes) split each sign into segments, and a value's segment says
# every count it adds one to. update() reads each value as fp64 (exact for fp16, bf16 and fp32) and finds its
# segment with integer ops on the bits: the top 19 (sign, exponent, 7 mantissa bits) name a cell, and the segment is
# the cell's first segment plus the number of cuts inside the cell at or below the value. A cell spans 1/128 of a
# binade and a bin 1/4 of a decade, so a cell holds at most one cut with the default layout and thresholds; that
# one costs no comparison: with offset[cell] = cut - (first + 1) 2^45, (|bits| - offset[cell]) >> 45 is first + 1
# from the cut on and first below it (|bits| - cut lies within +-2^45); a cell without a cut has offset =
# cell start - first 2^45. Further cuts in a cell (a threshold next to a bin edge) are counted by comparison.
# Then one bincount of the segments, folded into the counts through a fixed map (_Segments.source -> target).
_CELL_SHIFT = 45
_CELL_MASK = (1 << 19) - 1
_MAGNITUDE = (1 << 63) - 1
_INF_BITS = 0x7FF0000000000000
_NAN_END = _MAGNITUDE              # the largest magnitude pattern (a NaN)
_CHUNK = 1 << 16                   # elements per pass on the CPU: the scratch buffers stay in cache
_CHUNK_DEVICE = 1 << 22            # elsewhere few large passes (each op is a kernel launch)


def _fp64_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float64).view(np.int64))


def _values(magnitude_bits: np.ndarray) -> np.ndarray:
    return np.asarray(magnitude_bits, dtype=np.int64).view(np.float64)


@functools.lru_cache(maxsize=None)
def _edge_bits(layout: BinLayout) -> np.ndarray:
    """The fp64 bits of the bin edges 10^(log10_min + k / bins_per_decade), k = 0 .. n_bins, each rounded to the
    nearest fp64 (decimal arithmetic at 40 digits), as ``10.0 ** e`` would be if it were correctly rounded: a
    threshold written as 1e-7 then falls on the same cut as the bin edge at 10^-7."""
    context = decimal.Context(prec=40)
    exponents = (decimal.Decimal(layout.log10_min * layout.bins_per_decade + k) / layout.bins_per_decade
                 for k in range(layout.n_bins + 1))
    return np.array([_fp64_bits(float(context.power(10, e))) for e in exponents], dtype=np.int64)


def _targets(values: np.ndarray, layout: BinLayout, thresholds: tuple) -> list[tuple[int, ...]]:
    """Per value, the positions of LogHistogram._counts it adds one to: the definition update() must match."""
    mag = np.abs(values)
    nan = np.isnan(values)
    with np.errstate(invalid="ignore"):
        flags = [nan, values == np.inf, mag == np.inf, mag == 0, values < 0]
        ops = {torch.le: np.less_equal, torch.lt: np.less, torch.ge: np.greater_equal}
        flags += [ops[compare](mag, bound) for _, compare, bound in _MAGNITUDE_PROBES]
        bucket = np.sum([values >= t for t in thresholds], axis=0, dtype=np.int64) + nan * len(thresholds)
    bins = np.where(nan, 0, np.searchsorted(_values(_edge_bits(layout)[1:-1]), mag, side="right"))
    n_raw = len(_RAW_COUNTS)
    columns = [np.zeros(len(values), dtype=np.int64)]  # "count": every element
    columns += [np.where(f, i + 1, -1) for i, f in enumerate(flags)]
    columns.append(n_raw + bins)
    if thresholds:
        columns.append(n_raw + layout.n_bins + bucket)
    return [tuple(int(c) for c in row if c >= 0) for row in np.stack(columns, axis=1)]


@dataclass
class _Segments:
    """The lookup of one (layout, thresholds) on one device; see the comment above."""
    offset: torch.Tensor       # per cell, see the comment above
    below_cut: list            # per further cut inside a cell, per cell: the pattern just below it
    count: int                 # number of segments, both signs
    source: torch.Tensor       # segment ...
    target: torch.Tensor       # ... adds its count into this position of LogHistogram._counts


_SEGMENTS: dict = {}


def _segments(layout: BinLayout, thresholds: tuple, device: torch.device) -> _Segments:
    """Build (once per layout, thresholds and device) the cuts, the cell tables and the fold map."""
    key = (layout, thresholds, device)
    if key in _SEGMENTS:
        return _SEGMENTS[key]
    candidates = [int(b) for b in _edge_bits(layout)[1:-1]] + [1, _INF_BITS, _INF_BITS + 1]
    candidates += [_fp64_bits(bound) + (compare is torch.le) for _, compare, bound in _MAGNITUDE_PROBES]
    half = 1 << 18  # cells per sign
    cell_start = (np.arange(2 * half, dtype=np.int64) % half) << _CELL_SHIFT
    first = np.zeros(2 * half, dtype=np.int64)
    inside: dict[int, list[int]] = {}
    source, target, offset = [], [], 0
    for sign in (0, 1):  # x < t: for t > 0 the positive side steps at t, for t <= 0 the negative one just above |t|
        side = candidates + [_fp64_bits(abs(t)) + sign for t in thresholds if (t > 0) == (sign == 0)]
        side = np.unique([c for c in side if 0 < c <= _NAN_END])
        low = np.concatenate([[0], side])  # each candidate segment's lowest and highest pattern
        high = np.concatenate([side - 1, [_NAN_END]])
        at_low, at_high = (_targets(-_values(ends) if sign else _values(ends), layout, thresholds)
                           for ends in (low, high))
        # each count is monotone in |x| on a sign: equal at both ends means constant in between
        assert at_low == at_high, "LogHistogram: a count steps between two cuts"
        keep = [0] + [i for i in range(1, len(low)) if at_low[i] != at_low[i - 1]]
        cuts = low[keep[1:]]
        for segment, i in enumerate(keep):
            source += [offset + segment] * len(at_low[i])
            target += list(at_low[i])
        cells = slice(sign * half, (sign + 1) * half)
        first[cells] = offset + np.searchsorted(cuts, cell_start[cells], side="right")
        for cut in cuts:
            cell = int(cut >> _CELL_SHIFT) + sign * half
            if cut > cell_start[cell]:
                inside.setdefault(cell, []).append(int(cut))
        offset += len(cuts) + 1
    offsets = cell_start - (first << _CELL_SHIFT)
    below_cut = np.full((max(map(len, inside.values()), default=1) - 1, 2 * half), _NAN_END, dtype=np.int64)
    for cell, (cut, *further) in inside.items():
        offsets[cell] = cut - ((first[cell] + 1) << _CELL_SHIFT)
        below_cut[:len(further), cell] = np.array(further, dtype=np.int64) - 1
    segments = _Segments(offset=torch.from_numpy(offsets).to(device),
                         below_cut=[torch.from_numpy(level).to(device) for level in below_cut], count=offset,
                         source=torch.tensor(source, dtype=torch.int64, device=device),
                         target=torch.tensor(target, dtype=torch.int64, device=device))
    _SEGMENTS[key] = segments
    return segments


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
        # min, -max, min |x| of the finite values: merged by minimum
        self._extrema = torch.full((_EXTREMA,), math.inf, dtype=torch.float64, device=self.device)

    # ------------------------------------------------------------------ accumulate (no host sync)
    @torch.no_grad()
    def update(self, *tensors: torch.Tensor) -> None:
        """Add every element of each tensor (any shape, any float dtype, on this histogram's device) to this one
        histogram: several tensors (e.g. every parameter's gradient) in one call pay the fixed costs once."""
        flat = [t.detach().reshape(-1) for t in tensors if t.numel()]
        if not flat:
            return
        chunk = min(max(x.numel() for x in flat), _CHUNK if self.device.type == "cpu" else _CHUNK_DEVICE)
        lookup = _segments(self.layout, self.thresholds, self.device)
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
                key = torch.bitwise_right_shift(bits, _CELL_SHIFT, out=cell[:m]).bitwise_and_(_CELL_MASK)
                mag = torch.bitwise_and(bits, _MAGNITUDE, out=magnitude[:m])
                found = torch.index_select(lookup.offset, 0, key, out=segment[:m])
                torch.sub(mag, found, out=found).bitwise_right_shift_(_CELL_SHIFT)
                for below in lookup.below_cut:
                    found.add_(torch.gt(mag, torch.index_select(below, 0, key, out=scratch[:m]), out=above[:m]))
                counts.scatter_add_(0, found, ones[:m])  # a bincount into a fixed size (torch.bincount syncs on CUDA)
                partials.append(self._statistics(value, mag))
        self._counts.index_add_(0, lookup.target, counts.index_select(0, lookup.source))
        totals = torch.stack([torch.stack(p) for p in partials])
        self._moments += totals[:, :2].sum(dim=0)
        torch.minimum(self._extrema, totals[:, 2:].amin(dim=0), out=self._extrema)

    @staticmethod
    def _statistics(value: torch.Tensor, mag: torch.Tensor) -> list[torch.Tensor]:
        """Sum, sum of squares, min, -max and min |x| of ``value`` (fp64, overwritten) with its non-finite entries
        read as 0, ``mag`` its magnitude bits (NaN and Inf have the largest: they win the minimum only when alone).
        A min or max of 0 that a NaN or Inf made is told apart in ``summarize`` (``_extremum``)."""
        smallest = mag.min().clamp_max_(_INF_BITS).view(torch.float64)
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
        n_raw, n_bins = len(_RAW_COUNTS), self.layout.n_bins
        raw = dict(zip(_RAW_COUNTS, (int(v) for v in packed[:n_raw])))
        special = _named_counts(raw)
        bins = packed[n_raw:n_raw + n_bins].copy()
        bins[0] -= raw["zero"] + raw["nan"]
        bins[-1] -= raw["infinite"]
        buckets = packed[n_raw + n_bins:self._counts.numel()]
        total_sum, total_sq, low, neg_high, abs_min = (float(v) for v in packed[self._counts.numel():])
        count = special["count"]
        finite = count - special["nan"] - special["posinf"] - special["neginf"]
        row: dict = dict(special)
        row["finite"] = finite
        row["nonfinite_fraction"] = (count - finite) / count if count else math.nan
        row["zero_fraction"] = special["zero"] / count if count else math.nan
        row["min"] = self._extremum(low, special["zero"], abs_min) if finite else math.nan
        row["max"] = -self._extremum(neg_high, special["zero"], abs_min) if finite else math.nan
        row["mean"] = float(total_sum / finite) if finite else math.nan
        row["rms"] = math.sqrt(float(total_sq) / finite) if finite else math.nan
        row["sum"] = float(total_sum)
        row["abs_min"] = abs_min if finite else math.nan
        row["abs_max"] = max(abs(row["min"]), abs(row["max"])) if finite else math.nan
        for q in QUANTILES:
            row[f"abs_p{q * 100:g}"] = self._quantile(bins, special["zero"], q, abs_min, row["abs_max"])
        below = np.cumsum(buckets)[:len(self.thresholds)]
        for t, n in zip(self.thresholds, below):
            row[f"below_{t:g}"] = float(n / count) if count else math.nan
        row["bin_counts"] = [int(v) for v in bins]
        return row

    @staticmethod
    def _extremum(low: float, zeros: int, abs_min: float) -> float:
        """The finite minimum (or, negated, maximum) from the device's, where NaN and Inf counted as 0: a 0 there
        means no finite value lies below 0, so the minimum is 0 if a finite 0 was seen, else the smallest |x|."""
        return low if low != 0 or zeros else abs_min

    def _quantile(self, bins: np.ndarray, zeros: int, q: float, abs_min: float, abs_max: float) -> float:
        """Quantile q of |x| over the finite values: the value of rank floor(q (n - 1)) (numpy's "lower" method),
        found in its bin and placed log-linearly inside it by its rank there, between the bin's edges narrowed to
        the smallest and the largest |x| (so it never leaves [abs_min, abs_max] or the bin)."""
        total = int(zeros + bins.sum())
        if total == 0:
            return math.nan
        rank = math.floor(q * (total - 1))  # 0-based
        if rank < zeros:
            return 0.0
        cumulative = zeros + np.cumsum(bins)
        i = int(np.searchsorted(cumulative, rank, side="right"))  # first bin holding more than `rank` values
        before = cumulative[i] - bins[i]
        fraction = (rank - before + 0.5) / bins[i]
        edges = self.layout.log10_min + np.array([i, i + 1]) / self.layout.bins_per_decade
        lo = max(math.log10(abs_min), edges[0]) if abs_min > 0 else edges[0]
        hi = max(min(math.log10(abs_max), edges[1]), lo)
        return float(10.0 ** (lo + fraction * (hi - lo)))

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

