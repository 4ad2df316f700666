"""Where a value lands in a ``LogHistogram``: the log10 bin layout (``BinLayout``), the fp16/bf16/fp32 rounding
boundaries every value is counted against (``MAGNITUDE_PROBES``), and the cell tables that turn a value's fp64 bits
into the positions of every count it adds one to (``segments``).

Kept apart from the accumulator: this is the counting definition, with its numpy reference (``targets``) that the
tables are built from and checked against; ``LogHistogram`` only applies it on the device.
"""
from __future__ import annotations

import decimal
import functools
from dataclasses import dataclass

import numpy as np
import torch


# Where round-to-nearest-even sends |x| across a range boundary (each exact in fp32): the device counts
# |x| against these, and the named counts are differences of them (``_named_counts``).
MAGNITUDE_PROBES = (
    ("bf16_underflow_max", torch.le, 2.0 ** -134),      # ties to even: 2^-134 -> 0
    ("bf16_normal_from", torch.lt, 2.0 ** -126 - 2.0 ** -134),  # ties to even: rounds up to 2^-126
    ("fp32_normal_from", torch.lt, 2.0 ** -126),
    ("fp16_underflow_max", torch.le, 2.0 ** -25),
    ("fp16_normal_from", torch.lt, 2.0 ** -14 - 2.0 ** -25),
    ("fp16_overflow_from", torch.ge, 65520.0),
    ("bf16_overflow_from", torch.ge, (2.0 - 2.0 ** -8) * 2.0 ** 127),
)
# Raw device counts, in buffer order: element count, the direct checks, then the probes.
RAW_COUNTS = ("count", "nan", "posinf", "infinite", "zero", "negative") + tuple(p[0] for p in MAGNITUDE_PROBES)


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
# MAGNITUDE_PROBES, a threshold, zero, inf, NaN. The magnitudes where one of them steps ("cuts", kept as bit
# patterns, whose order is the order of the magnitudes) split each sign into segments, and a value's segment says
# every count it adds one to. Two readings of a value's bits find its segment (``BitFormat``): the torch path
# (any device, any dtype) reads each value as fp64 (exact for fp16, bf16 and fp32); the CPU kernel
# (_cpu_kernels.c) reads fp32 bits as they are. Either way the top bits (sign, exponent, 7 mantissa bits)
# name a cell, and the segment is the cell's first segment plus the number of cuts inside the cell at or below the
# value. A cell spans 1/128 of a binade and a bin 1/4 of a decade, so a normal cell holds at most one cut with the
# default layout and thresholds; that one costs no comparison: with offset[cell] = cut - (first + 1) 2^shift,
# (|bits| - offset[cell]) >> shift is first + 1 from the cut on and first below it (|bits| - cut lies within
# +-2^shift); a cell without a cut has offset = cell start - first 2^shift. Further cuts in a cell (fp32
# subnormals, a threshold next to a bin edge) are counted by comparison (torch) or found by binary search (kernel).
# Then one count per segment, folded into the counts through a fixed map (source -> target).
CELL_SHIFT = 45
CELL_MASK = (1 << 19) - 1
MAGNITUDE = (1 << 63) - 1
INF_BITS = 0x7FF0000000000000


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


def targets(values: np.ndarray, layout: BinLayout, thresholds: tuple) -> list[tuple[int, ...]]:
    """Per value, the positions of LogHistogram._counts it adds one to: the definition update() must match."""
    mag = np.abs(values)
    nan = np.isnan(values)
    with np.errstate(invalid="ignore"):
        flags = [nan, values == np.inf, mag == np.inf, mag == 0, values < 0]
        ops = {torch.le: np.less_equal, torch.lt: np.less, torch.ge: np.greater_equal}
        flags += [ops[compare](mag, bound) for _, compare, bound in MAGNITUDE_PROBES]
        bucket = np.sum([values >= t for t in thresholds], axis=0, dtype=np.int64) + nan * len(thresholds)
    bins = np.where(nan, 0, np.searchsorted(_values(_edge_bits(layout)[1:-1]), mag, side="right"))
    n_raw = len(RAW_COUNTS)
    columns = [np.zeros(len(values), dtype=np.int64)]  # "count": every element
    columns += [np.where(f, i + 1, -1) for i, f in enumerate(flags)]
    columns.append(n_raw + bins)
    if thresholds:
        columns.append(n_raw + layout.n_bins + bucket)
    return [tuple(int(c) for c in row if c >= 0) for row in np.stack(columns, axis=1)]


@dataclass(frozen=True)
class BitFormat:
    """How a value's bits are read: its magnitude patterns, their cells, and the value of a pattern."""

    name: str
    cell_shift: int
    cells_per_sign: int
    nan_end: int                   # the largest magnitude pattern (a NaN)
    float_type: type

    def values(self, magnitude_bits: np.ndarray) -> np.ndarray:
        """The fp64 values of magnitude patterns of this format."""
        bits = np.asarray(magnitude_bits, dtype=np.int64)
        if self.float_type is np.float64:
            return bits.view(np.float64)
        with np.errstate(invalid="ignore"):  # a signalling NaN pattern stays a NaN
            return bits.astype(np.uint32).view(np.float32).astype(np.float64)

    def cut(self, fp64_cut: int) -> int:
        """The smallest pattern of this format whose magnitude is at or above an fp64 cut's: the same step."""
        if self.float_type is np.float64 or fp64_cut > INF_BITS:  # any NaN pattern: the format's first NaN
            return fp64_cut if self.float_type is np.float64 else _FP32_INF + 1
        value = float(_values(np.array([fp64_cut]))[0])
        with np.errstate(over="ignore"):
            rounded = np.float32(value)  # to nearest; inf above the fp32 range
        if float(rounded) < value:
            rounded = np.nextafter(rounded, np.float32(np.inf))
        return int(np.array(rounded, dtype=np.float32).view(np.uint32))


_FP32_INF = 0x7F800000
FP64 = BitFormat("fp64", CELL_SHIFT, 1 << 18, MAGNITUDE, np.float64)
FP32 = BitFormat("fp32", 16, 1 << 15, (1 << 31) - 1, np.float32)


@dataclass
class _Cuts:
    """The cuts of one (layout, thresholds) in one format, each sign's segments numbered after the other's."""
    by_sign: list              # per sign: the sorted cut patterns
    base: list                 # per sign: its first segment
    count: int                 # number of segments, both signs
    source: list               # segment ...
    target: list               # ... adds its count into this position of LogHistogram._counts


def _cuts(layout: BinLayout, thresholds: tuple, form: BitFormat) -> _Cuts:
    """Where each count steps, in ``form``'s patterns, checked against ``targets`` at both ends of each segment."""
    candidates = [int(b) for b in _edge_bits(layout)[1:-1]] + [1, INF_BITS, INF_BITS + 1]
    candidates += [_fp64_bits(bound) + (compare is torch.le) for _, compare, bound in MAGNITUDE_PROBES]
    found = _Cuts([], [], 0, [], [])
    for sign in (0, 1):  # x < t: for t > 0 the positive side steps at t, for t <= 0 the negative one just above |t|
        side = candidates + [_fp64_bits(abs(t)) + sign for t in thresholds if (t > 0) == (sign == 0)]
        side = np.unique([form.cut(c) for c in side if 0 < c <= MAGNITUDE])
        side = side[(side > 0) & (side <= form.nan_end)]
        low = np.concatenate([[0], side])  # each candidate segment's lowest and highest pattern
        high = np.concatenate([side - 1, [form.nan_end]])
        at_low, at_high = (targets(-form.values(ends) if sign else form.values(ends), layout, thresholds)
                           for ends in (low, high))
        # each count is monotone in |x| on a sign: equal at both ends means constant in between
        assert at_low == at_high, "LogHistogram: a count steps between two cuts"
        keep = [0] + [i for i in range(1, len(low)) if at_low[i] != at_low[i - 1]]
        for segment, i in enumerate(keep):
            found.source += [found.count + segment] * len(at_low[i])
            found.target += list(at_low[i])
        found.by_sign.append(low[keep[1:]].astype(np.int64))
        found.base.append(found.count)
        found.count += len(keep)
    return found


def _cells(cuts: _Cuts, form: BitFormat) -> tuple[np.ndarray, np.ndarray, dict[int, list[int]]]:
    """Per cell (sign bit first): the offset that places a value of a cell holding at most one cut, the cell's
    lowest pattern, and the cuts strictly inside each cell that holds any."""
    half = form.cells_per_sign
    cell_start = (np.arange(2 * half, dtype=np.int64) % half) << form.cell_shift
    first = np.zeros(2 * half, dtype=np.int64)
    inside: dict[int, list[int]] = {}
    for sign, (side, base) in enumerate(zip(cuts.by_sign, cuts.base)):
        cells = slice(sign * half, (sign + 1) * half)
        first[cells] = base + np.searchsorted(side, cell_start[cells], side="right")
        for cut in side:
            cell = int(cut >> form.cell_shift) + sign * half
            if cut > cell_start[cell]:
                inside.setdefault(cell, []).append(int(cut))
    offsets = cell_start - (first << form.cell_shift)
    for cell, (cut, *_) in inside.items():
        offsets[cell] = cut - ((first[cell] + 1) << form.cell_shift)
    return offsets, cell_start, inside


@dataclass
class _Segments:
    """The fp64 lookup of one (layout, thresholds) on one device, for the torch path; see the comment above."""
    offset: torch.Tensor       # per cell, see the comment above
    below_cut: list            # per further cut inside a cell, per cell: the pattern just below it
    count: int                 # number of segments, both signs
    source: torch.Tensor       # segment ...
    target: torch.Tensor       # ... adds its count into this position of LogHistogram._counts


@dataclass
class KernelTables:
    """The fp32 lookup of one (layout, thresholds) for the CPU kernel, the arguments of its ``make_tables``."""
    offset: np.ndarray         # uint32 per cell, the sign folded in; cells holding several cuts -> the spill
    cuts: np.ndarray           # uint32 patterns: the positive side's cuts, then the negative side's
    n_positive: int
    source: np.ndarray         # int64: segment ...
    target: np.ndarray         # ... adds its count into this position of LogHistogram._counts


_CACHE: dict = {}


def segments(layout: BinLayout, thresholds: tuple, device: torch.device) -> _Segments:
    """Build (once per layout, thresholds and device) the fp64 cuts, the cell tables and the fold map."""
    key = (layout, thresholds, device)
    if key in _CACHE:
        return _CACHE[key]
    cuts = _cuts(layout, thresholds, FP64)
    offsets, _, inside = _cells(cuts, FP64)
    below_cut = np.full((max(map(len, inside.values()), default=1) - 1, 2 * FP64.cells_per_sign), FP64.nan_end,
                        dtype=np.int64)
    for cell, (_, *further) in inside.items():
        below_cut[:len(further), cell] = np.array(further, dtype=np.int64) - 1
    built = _Segments(offset=torch.from_numpy(offsets).to(device),
                      below_cut=[torch.from_numpy(level).to(device) for level in below_cut], count=cuts.count,
                      source=torch.tensor(cuts.source, dtype=torch.int64, device=device),
                      target=torch.tensor(cuts.target, dtype=torch.int64, device=device))
    _CACHE[key] = built
    return built


def kernel_tables(layout: BinLayout, thresholds: tuple) -> KernelTables:
    """Build (once per layout and thresholds) the fp32 tables of the CPU kernel."""
    key = (layout, thresholds, "kernel")
    if key in _CACHE:
        return _CACHE[key]
    cuts = _cuts(layout, thresholds, FP32)
    offsets, cell_start, inside = _cells(cuts, FP32)
    for cell, found in inside.items():
        if len(found) > 1:  # the kernel places these by search: send them to the spill segment, number `count`
            offsets[cell] = cell_start[cell] - (cuts.count << FP32.cell_shift)
    # the kernel subtracts from the whole pattern, sign bit included: (u - offset) mod 2^32
    signed = offsets + (np.arange(2 * FP32.cells_per_sign) >= FP32.cells_per_sign).astype(np.int64) * (1 << 31)
    built = KernelTables(offset=(signed % (1 << 32)).astype(np.uint32),
                         cuts=np.concatenate(cuts.by_sign).astype(np.uint32), n_positive=len(cuts.by_sign[0]),
                         source=np.array(cuts.source, dtype=np.int64), target=np.array(cuts.target, dtype=np.int64))
    _CACHE[key] = built
    return built
