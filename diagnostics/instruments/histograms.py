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


# ------------------------------------------------------------------ the lookup tables behind update()
# Every count update() keeps is a function of where x sits among a few hundred cut points: the bin edges
# (found by bisection against the log10 formula below, so values on an edge land where that formula puts them),
# the IEEE rounding boundaries of _MAGNITUDE_PROBES, the thresholds, zero, inf and NaN. update() finds each
# element's segment between consecutive cuts with fixed-shape integer ops on the fp64 bit pattern (exact for
# fp32, whose values fp64 holds exactly): the top bits (sign, exponent, 7 mantissa bits) pick a cell of a
# table, and a cell holds at most one cut per table ("level"), so one subtraction and one shift finish the job:
# segment = (|bits| - G[cell]) >> 45, G = cut - (first segment + 1) * 2^45. A second level takes the cuts that
# share a cell with another (a threshold next to a bin edge). The per-segment counts then fold into the count
# buffer through a fixed index map (_Tables.src/dst).
_CELL_SHIFT = 45                      # fp64: 1 sign + 11 exponent + 7 mantissa bits above it
_CELL_MASK = (1 << 19) - 1            # sign and magnitude cell of (bits >> 45)
_MAGNITUDE = (1 << 63) - 1
_INF_BITS = 0x7FF0000000000000
_CHUNK = 1 << 17                      # elements per pass on the CPU: the scratch buffers stay in cache
_CHUNK_DEVICE = 1 << 22


def _fp64_bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).view(np.int64)


def _bin_of(values: np.ndarray, layout: BinLayout, dtype: torch.dtype) -> np.ndarray:
    """The bin update() assigns, by the formula of log10 |x| in ``dtype`` (zero and NaN in the first bin,
    infinities in the last), evaluated with torch's vectorised CPU kernels (padded to whole vectors)."""
    n = len(values)
    padded = np.ones(-(-max(n, 1) // 256) * 256, dtype=np.float64)
    padded[:n] = np.abs(values)
    x = torch.from_numpy(padded).to(dtype)
    index = x.log10_().sub_(layout.log10_min).mul_(layout.bins_per_decade).nan_to_num_(nan=0.0).floor_()
    return index.clamp_(0, layout.n_bins - 1).to(torch.int64).numpy()[:n]


def _bin_edges_bits(layout: BinLayout, dtype: torch.dtype) -> np.ndarray:
    """Per bin k >= 1, the bits of the smallest |x| (representable in ``dtype``) that _bin_of puts in bin >= k."""
    np_type, int_type = (np.float32, np.int32) if dtype == torch.float32 else (np.float64, np.int64)
    inf = np.array(np.inf, dtype=np_type).view(int_type).astype(np.int64)
    k = np.arange(1, layout.n_bins, dtype=np.int64)
    lo, hi = np.zeros_like(k), np.full_like(k, inf)  # bin(lo) < k <= bin(hi)
    while np.any(hi - lo > 1):
        mid = lo + (hi - lo) // 2
        above = _bin_of(mid.astype(int_type).view(np_type).astype(np.float64), layout, dtype) >= k
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    return hi  # in dtype's own bit pattern


@dataclass
class _Tables:
    """The cut tables of one (layout, thresholds, dtype) on one device; see the comment above."""
    offsets: list            # per level, a (2^19,) int64 G table
    strides: list            # per level, its multiplier in the combined segment index
    size: int                # number of combined indices
    src: torch.Tensor        # combined index ...
    dst: torch.Tensor        # ... added into this position of LogHistogram._counts


_TABLES: dict = {}


def _signature(values: np.ndarray, sign: np.ndarray, layout: BinLayout, thresholds: tuple, bounds: tuple,
               dtype: torch.dtype) -> np.ndarray:
    """Per value (given as magnitude and sign), the positions of LogHistogram._counts it adds one to."""
    x = np.where(sign, -values, values)
    mag = np.abs(x)
    with np.errstate(invalid="ignore"):
        flags = [x != x, x == np.inf, mag == np.inf, mag == 0, x < 0]
        ops = {torch.le: np.less_equal, torch.lt: np.less, torch.ge: np.greater_equal}
        flags += [ops[compare](mag, bound) for _, compare, bound in _MAGNITUDE_PROBES]
        below = [x < b for b in bounds]
    n_raw = len(_RAW_COUNTS)
    columns = [np.zeros(len(x), dtype=np.int64)]  # "count": every element
    columns += [np.where(f, i + 1, -1) for i, f in enumerate(flags)]
    columns.append(n_raw + _bin_of(x, layout, dtype))
    if thresholds:
        columns.append(n_raw + layout.n_bins + (len(bounds) - np.sum(below, axis=0)))
    return np.stack(columns, axis=1)


def _tables(layout: BinLayout, thresholds: tuple, bounds: tuple, dtype: torch.dtype,
            device: torch.device) -> _Tables:
    key = (layout, thresholds, dtype, device)
    tables = _TABLES.get(key)
    if tables is not None:
        return tables
    np_type, int_type = (np.float32, np.int32) if dtype == torch.float32 else (np.float64, np.int64)

    def as_fp64_bits(own_bits) -> np.ndarray:  # a dtype bit pattern (magnitude) -> the fp64 bits of its value
        return _fp64_bits(np.asarray(own_bits, dtype=np.int64).astype(int_type).view(np_type).astype(np.float64))

    # Candidate cuts (fp64 magnitude bits where a count may change), per sign; kept where one really does.
    edges = as_fp64_bits(_bin_edges_bits(layout, dtype))
    specials = [1, _INF_BITS, _INF_BITS + 1]  # nonzero, inf, NaN (fp32 NaN converts to some fp64 NaN)
    for _, compare, bound in _MAGNITUDE_PROBES:
        bits = int(_fp64_bits(np.array([bound]))[0])
        specials.append(bits + 1 if compare is torch.le else bits)
    cuts_by_sign = []
    for sign in (0, 1):
        candidates = [int(c) for c in edges] + specials
        for b in bounds:  # x < b: b > 0 cuts the positive side at b, b <= 0 the negative side just above |b|
            if (b > 0) == (sign == 0) and not math.isnan(b):
                bits = int(_fp64_bits(np.array([abs(b)]))[0])
                candidates.append(bits if sign == 0 else bits + 1)
        candidates = np.unique(np.array([c for c in candidates if 0 < c <= _INF_BITS + 1], dtype=np.int64))
        # The value at and just below each cut, both representable in dtype.
        at = _represent(candidates, np_type)
        before = _represent(candidates - 1, np_type, down=True)
        signs = np.full(len(candidates), sign, dtype=bool)
        changes = np.any(_signature(at, signs, layout, thresholds, bounds, dtype)
                         != _signature(before, signs, layout, thresholds, bounds, dtype), axis=1)
        cuts_by_sign.append(candidates[changes])

    # Levels: the k-th cut of a cell goes to table k.
    n_levels = 1
    level_cuts = []  # [sign][level] -> sorted cuts
    for cuts in cuts_by_sign:
        cells = cuts >> _CELL_SHIFT
        rank = np.zeros(len(cuts), dtype=np.int64)
        for i in range(1, len(cuts)):
            rank[i] = rank[i - 1] + 1 if cells[i] == cells[i - 1] else 0
        n_levels = max(n_levels, int(rank.max(initial=0)) + 1)
        level_cuts.append([cuts[rank == level] for level in range(int(rank.max(initial=0)) + 1)])
    cell_start = np.arange(1 << 18, dtype=np.int64) << _CELL_SHIFT
    offsets, strides, stride = [], [], 1
    for level in range(n_levels):
        table = np.zeros(1 << 19, dtype=np.int64)
        first = 0
        for sign in (0, 1):
            cuts = level_cuts[sign][level] if level < len(level_cuts[sign]) else np.zeros(0, dtype=np.int64)
            # segment of the cell's start, and the cut inside the cell (if any)
            segment = first + np.searchsorted(cuts, cell_start, side="right")
            inside = np.full(1 << 18, -1, dtype=np.int64)
            inside[cuts >> _CELL_SHIFT] = cuts
            has_cut = (inside > cell_start)
            g = np.where(has_cut, inside - ((segment + 1) << _CELL_SHIFT), cell_start - (segment << _CELL_SHIFT))
            table[sign << 18:(sign + 1) << 18] = g
            first += len(cuts) + 1 if level == 0 else 0
        n_ids = first if level == 0 else max(len(level_cuts[s][level]) if level < len(level_cuts[s]) else 0
                                              for s in (0, 1)) + 1
        offsets.append(table)
        strides.append(stride)
        stride *= n_ids

    # Fold map: each segment's combined index, checked to be unambiguous.
    src, dst, seen = [], [], {}
    for sign in (0, 1):
        starts = np.concatenate([[0], cuts_by_sign[sign]])
        combined = np.zeros(len(starts), dtype=np.int64)
        cell = (starts >> _CELL_SHIFT) + (sign << 18)
        for table, s in zip(offsets, strides):
            combined += ((starts - table[cell]) >> _CELL_SHIFT) * s
        signature = _signature(_represent(starts, np_type), np.full(len(starts), sign, dtype=bool), layout,
                               thresholds, bounds, dtype)
        for c, row in zip(combined.tolist(), signature):
            row = tuple(int(r) for r in row if r >= 0)
            if seen.setdefault(c, row) != row:
                raise AssertionError("LogHistogram: two segments share one index")
    for c, row in seen.items():
        src += [c] * len(row)
        dst += list(row)
    assert 0 <= min(seen) and max(seen) < stride
    tables = _Tables(offsets=[torch.from_numpy(t).to(device) for t in offsets], strides=strides, size=stride,
                     src=torch.tensor(src, dtype=torch.int64).to(device),
                     dst=torch.tensor(dst, dtype=torch.int64).to(device))
    _TABLES[key] = tables
    return tables


def _represent(fp64_bits: np.ndarray, np_type, down: bool = False) -> np.ndarray:
    """The dtype value at fp64 magnitude bits (rounded up, or down), as float64."""
    values = np.asarray(fp64_bits, dtype=np.int64).view(np.float64)
    if np_type is np.float64:
        return values.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = values.astype(np.float32)
        off = rounded.astype(np.float64) < values if not down else rounded.astype(np.float64) > values
        target = np.float32(-np.inf) if down else np.float32(np.inf)
        rounded = np.where(off, np.nextafter(rounded, target), rounded)
    return rounded.astype(np.float64)


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
        x = tensor.detach().reshape(-1)
        if x.dtype != torch.float64:
            x = x.float()  # fp16 / bf16 / integers: fp32 holds them exactly
        tables = _tables(self.layout, self.thresholds, self._threshold_bounds(x.dtype), x.dtype, self.device)
        n, device = x.numel(), x.device
        # On the CPU, passes over cache-sized pieces (fresh full-size temporaries cost more in page faults than
        # the arithmetic); elsewhere few large ones (each op is a kernel launch).
        chunk = min(n, _CHUNK if device.type == "cpu" else _CHUNK_DEVICE)
        wide = torch.empty(chunk, dtype=torch.float64, device=device)
        cell, magnitude, index = (torch.empty(chunk, dtype=torch.int64, device=device) for _ in range(3))
        part = torch.empty(chunk, dtype=torch.int64, device=device) if len(tables.offsets) > 1 else None
        narrow = torch.empty((2, chunk), dtype=x.dtype, device=device)
        segments = torch.zeros(tables.size, dtype=torch.int64, device=device)
        ones = torch.ones((), dtype=torch.int64, device=device).expand(chunk)
        partial = []
        for start in range(0, n, chunk):
            piece = x[start:start + chunk]
            m = piece.numel()
            value = wide[:m]
            value.copy_(piece)  # exact: every fp32 value is an fp64 value
            bits = value.view(torch.int64)
            key = torch.bitwise_right_shift(bits, _CELL_SHIFT, out=cell[:m]).bitwise_and_(_CELL_MASK)
            above = torch.bitwise_and(bits, _MAGNITUDE, out=magnitude[:m])
            segment = index[:m]
            for level, (table, stride) in enumerate(zip(tables.offsets, tables.strides)):
                out = segment if level == 0 else part[:m]
                torch.index_select(table, 0, key, out=out)
                torch.sub(above, out, out=out).bitwise_right_shift_(_CELL_SHIFT)
                if level:
                    segment.add_(out, alpha=stride)
            segments.index_add_(0, segment, ones[:m])
            # Finite values only in the moments and extrema: +-inf and NaN become 0, then +inf / -inf.
            value.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            partial += [value.sum(), torch.dot(value, value)]
            scratch = narrow[:, :m]
            torch.nan_to_num(piece, nan=math.inf, posinf=math.inf, neginf=math.inf, out=scratch[0])
            torch.nan_to_num(piece, nan=-math.inf, posinf=-math.inf, neginf=-math.inf, out=scratch[1]).neg_()
            partial.append(scratch.amin(dim=1).to(torch.float64))
        self._counts.index_add_(0, tables.dst, segments.index_select(0, tables.src))
        if len(partial) == 3:
            self._moments += torch.stack(partial[:2])
            torch.minimum(self._extrema, partial[2], out=self._extrema)
        else:
            self._moments += torch.stack([torch.stack(partial[0::3]).sum(), torch.stack(partial[1::3]).sum()])
            torch.minimum(self._extrema, torch.stack(partial[2::3]).amin(dim=0), out=self._extrema)

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

