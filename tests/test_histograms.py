"""LogHistogram: exact special-value counts at IEEE boundaries, bins and quantiles against numpy, merging,
and accumulation that never reads a value back to the host; every test on both update paths (the compiled CPU
kernel and the torch ops that CUDA uses)."""
import math
import os

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments.histogram_bins import BinLayout
from geodiag.diagnostics.instruments import histograms, kernels
from geodiag.diagnostics.instruments.histograms import LogHistogram, decade_grid

F32_TINY = 2.0 ** -126
# The kernel's variants exist where it is built, and where CI requires it (there a missing build fails them).
REQUIRED = os.environ.get("GEODIAG_REQUIRE_KERNEL")
KERNEL_PATHS = ("kernel", "kernel_portable") if kernels.compiled is not None or REQUIRED else ()


class _Kernel:
    """The compiled kernel made to take its plain C loops where it would take the AVX2 one (``portable``), or to
    count in pieces of ``max_values``."""

    def __init__(self, kernel, portable: bool = False, max_values: int = 0) -> None:
        self.kernel, self.portable = kernel, portable
        self.make_tables = kernel.make_tables
        self.MAX_VALUES = max_values or kernel.MAX_VALUES
        self.calls = 0

    def count_fp32(self, *args):
        self.calls += 1
        return self.kernel.count_fp32(*args, self.portable)


@pytest.fixture(autouse=True, params=KERNEL_PATHS + ("torch",))
def update_path(request, monkeypatch):
    """Each test through the compiled kernel (CPU fp32/fp16/bf16) on both of its loops, and through the torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "compiled", None)
        return request.param
    assert kernels.compiled is not None, kernels.state()
    if request.param == "kernel_portable":
        monkeypatch.setattr(kernels, "compiled", _Kernel(kernels.compiled, portable=True))
    return request.param


def _with_fp32_neighbours(values: np.ndarray, steps: int) -> list[np.ndarray]:
    """``values`` (fp32), then their ``steps`` nearest fp32 neighbours below, then above."""
    found = [values]
    for direction in (-np.inf, np.inf):
        current = values
        for _ in range(steps):
            current = np.nextafter(current, np.float32(direction))
            found.append(current)
    return found


def _histogram(values, dtype=torch.float32, thresholds=()) -> dict:
    h = LogHistogram(thresholds=thresholds)
    h.update(torch.tensor(values, dtype=dtype))
    return h.to_dict()


def test_special_values_are_counted_exactly():
    values = [math.nan, math.nan, math.inf, -math.inf, -math.inf, 0.0, -0.0, -2.5, -1e-3, 3.0, 2.0 ** -130]
    row = _histogram(values)
    assert (row["count"], row["nan"], row["posinf"], row["neginf"], row["zero"]) == (11, 2, 1, 2, 2)
    assert row["negative"] == 4  # -inf, -inf, -2.5, -1e-3 (-0.0 is not below zero)
    assert row["fp32_subnormal"] == 1
    assert row["finite"] == 6
    assert sum(row["bin_counts"]) == 4  # finite and nonzero only


def test_fp16_boundaries_follow_ieee_round_to_nearest_even():
    values = [
        65504.0,                   # fp16 max: fits
        65519.0,                   # rounds down to 65504
        65520.0,                   # halfway to 65536: rounds to inf -> overflow
        1e6,                       # overflow
        2.0 ** -25,                # halfway between 0 and 2^-24: ties to even -> 0 -> underflow
        2.0 ** -25 * (1 + 2 ** -10),  # rounds up to 2^-24: subnormal
        2.0 ** -24,                # smallest fp16 subnormal
        2.0 ** -15,                # subnormal
        2.0 ** -14 - 2.0 ** -26,   # rounds up to 2^-14: normal
        2.0 ** -14,                # smallest normal
        1e-9,                      # underflow
    ]
    row = _histogram(values)
    assert row["fp16_overflow"] == 2
    assert row["fp16_underflow"] == 2
    assert row["fp16_subnormal"] == 3


def test_bf16_boundaries_follow_ieee_round_to_nearest_even():
    bf16_max = (2 - 2.0 ** -7) * 2.0 ** 127
    values = [
        bf16_max,                       # fits
        3.3961e38,                      # just below the halfway point (2 - 2^-8) 2^127: rounds to max
        3.4e38,                         # above the halfway point: inf
        2.0 ** -134,                    # halfway to the smallest subnormal 2^-133: ties to even -> 0
        2.0 ** -140,                    # underflow
        2.0 ** -133,                    # smallest bf16 subnormal
        2.0 ** -127,                    # subnormal
        F32_TINY,                       # smallest normal
    ]
    assert 3.3961e38 < (2 - 2.0 ** -8) * 2.0 ** 127 < 3.4e38
    row = _histogram(values)
    assert row["bf16_overflow"] == 1
    assert row["bf16_underflow"] == 2
    assert row["bf16_subnormal"] == 2
    assert row["fp32_subnormal"] == 4  # 2^-134, 2^-140, 2^-133, 2^-127


def test_cast_counts_agree_with_torchs_own_fp32_casts_near_every_boundary():
    # fp32 is what autocast casts from. (torch casts fp64 to bf16 through fp32, a double rounding that can differ
    # from the exact boundary within 2^-24 relative of it; the histogram counts the exact rounding.)
    boundaries = [2.0 ** -134, 2.0 ** -133, 2.0 ** -126, 2.0 ** -25, 2.0 ** -24, 2.0 ** -14, 65504.0, 65520.0,
                  3.38e38, 3.3961e38]
    generator = torch.Generator().manual_seed(3)
    values = torch.cat([b * (1 + 1e-3 * torch.randn(400, generator=generator, dtype=torch.float64))
                        for b in boundaries]).float()
    values = values[torch.isfinite(values)]
    values = torch.cat([values, -values])
    h = LogHistogram()
    h.update(values)
    row = h.to_dict()
    for name, target in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        cast = values.to(target)
        tiny = torch.finfo(target).tiny
        assert row[f"{name}_overflow"] == int((cast.isinf() & values.isfinite()).sum()) > 0
        assert row[f"{name}_underflow"] == int(((cast == 0) & (values != 0)).sum()) > 0
        assert row[f"{name}_subnormal"] == int(((cast != 0) & (cast.abs() < tiny)).sum()) > 0


def test_nan_and_inf_do_not_poison_extrema_moments_or_quantiles():
    row = _histogram([math.nan, math.inf, -math.inf, -2.0, 1.0, 4.0])
    assert (row["min"], row["max"]) == (-2.0, 4.0)
    assert row["mean"] == pytest.approx(1.0)
    assert row["rms"] == pytest.approx(math.sqrt(21.0 / 3.0))
    assert math.isfinite(row["abs_p99.9"]) and row["abs_p99.9"] <= 4.0


def test_each_value_lands_in_the_bin_numpy_assigns_its_log10_magnitude():
    rng = np.random.default_rng(0)
    values = np.concatenate([10.0 ** rng.uniform(-44, 38, 5000), -(10.0 ** rng.uniform(-30, 30, 5000))])
    layout = BinLayout()
    expected, _ = np.histogram(np.log10(np.abs(values)), bins=layout.log10_min
                               + np.arange(layout.n_bins + 1) / layout.bins_per_decade)
    row = _histogram(values, dtype=torch.float64)
    # fp64 log10 at a bin edge may differ from numpy's by one ulp: allow a handful of neighbour swaps.
    assert np.abs(np.array(row["bin_counts"]) - expected).sum() <= 4
    assert sum(row["bin_counts"]) == values.size


def test_fp64_values_beyond_the_fp32_range_land_in_the_end_bins():
    row = _histogram([1e-300, 1e300], dtype=torch.float64)
    assert row["bin_counts"][0] == 1 and row["bin_counts"][-1] == 1


def test_quantiles_of_magnitude_are_within_one_bin_of_the_exact_ones():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(20000) * 10.0 ** rng.uniform(-6, 3, 20000)
    values[:500] = 0.0
    row = _histogram(values, dtype=torch.float64)
    bin_ratio = 10 ** (1 / BinLayout().bins_per_decade)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = np.quantile(np.abs(values), q)
        assert exact / bin_ratio <= row[f"abs_p{q * 100:g}"] <= exact * bin_ratio


def test_quantile_falls_on_zero_when_zeros_are_the_majority():
    row = _histogram([0.0] * 9 + [1.0])
    assert row["abs_p50"] == 0.0


def test_fraction_below_counts_exactly_including_values_equal_to_a_threshold():
    grid = decade_grid()
    rng = np.random.default_rng(2)
    values = np.concatenate([10.0 ** rng.uniform(-10, 0, 3000), np.array(grid), [math.nan, -1.0]])
    h = LogHistogram(thresholds=grid)
    h.update(torch.tensor(values, dtype=torch.float64))
    fractions = h.fraction_below()
    with np.errstate(invalid="ignore"):
        for t in grid:
            assert fractions[t] == np.sum(values < t) / values.size


def test_merge_equals_the_histogram_of_the_concatenated_data():
    a = torch.randn(1000) * 1e-3
    b = torch.cat([torch.randn(500) * 1e4, torch.tensor([math.nan, math.inf, 0.0])])
    left, right, whole = (LogHistogram(thresholds=decade_grid()) for _ in range(3))
    left.update(a)
    right.update(b)
    whole.update(torch.cat([a, b]))
    merged, reference = left.merge(right).to_dict(), whole.to_dict()
    assert merged.pop("sum") == pytest.approx(reference.pop("sum"))
    for key in ("mean", "rms"):
        assert merged.pop(key) == pytest.approx(reference.pop(key))
    assert merged == reference


def test_merge_rejects_a_different_layout():
    with pytest.raises(ValueError):
        LogHistogram().merge(LogHistogram(BinLayout(bins_per_decade=2)))


def test_reset_forgets_everything():
    h = LogHistogram()
    h.update(torch.tensor([1.0, math.nan]))
    h.reset()
    h.update(torch.tensor([-3.0]))
    row = h.to_dict()
    assert (row["count"], row["nan"], row["min"], row["max"]) == (1, 0, -3.0, -3.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_update_never_reads_a_value_back_to_the_host(dtype):
    # On the meta device there is no data: .item(), bool(tensor), nonzero, boolean indexing or a copy to
    # the CPU would raise. Accumulating must still work, as it must on CUDA without a sync.
    h = LogHistogram(thresholds=decade_grid(), device="meta")
    h.update(torch.empty(4, 64, 64, dtype=dtype, device="meta"))
    assert h.packed().device.type == "meta"
    with pytest.raises(Exception):
        torch.empty(3, device="meta").sum().item()


def test_bad_thresholds_are_rejected():
    with pytest.raises(ValueError):
        LogHistogram(thresholds=(1e-2, 1e-3))
    with pytest.raises(ValueError, match="6 significant digits"):  # both would be the column below_0.001
        LogHistogram(thresholds=(1e-3, 1.0000001e-3))


def _numpy_reference(values: np.ndarray, thresholds) -> dict:
    """Every special count, bin and threshold fraction of fp32 values, computed independently in numpy fp64."""
    with np.errstate(invalid="ignore"):
        x = values.astype(np.float64)
    mag = np.abs(x)
    finite = np.isfinite(x)
    nonzero = finite & (mag > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # The bin is where fp32 log10 puts the value; away from an edge (checked below) numpy's fp64 agrees.
        log = np.log10(mag[nonzero])
    layout = BinLayout()
    bins = np.clip(np.floor((log - layout.log10_min) * layout.bins_per_decade), 0, layout.n_bins - 1).astype(int)
    return {
        "count": x.size, "nan": int(np.isnan(x).sum()), "posinf": int((x == np.inf).sum()),
        "neginf": int((x == -np.inf).sum()), "zero": int((x == 0).sum()), "negative": int((x < 0).sum()),
        "fp32_subnormal": int(((mag > 0) & (mag < 2.0 ** -126)).sum()),
        "fp16_overflow": int((finite & (mag >= 65520.0)).sum()),
        "fp16_underflow": int(((mag > 0) & (mag <= 2.0 ** -25)).sum()),
        "fp16_subnormal": int(((mag > 2.0 ** -25) & (mag < 2.0 ** -14 - 2.0 ** -25)).sum()),
        "bf16_overflow": int((finite & (mag >= (2 - 2.0 ** -8) * 2.0 ** 127)).sum()),
        "bf16_underflow": int(((mag > 0) & (mag <= 2.0 ** -134)).sum()),
        "bf16_subnormal": int(((mag > 2.0 ** -134) & (mag < 2.0 ** -126 - 2.0 ** -134)).sum()),
        "bin_counts": np.bincount(bins, minlength=layout.n_bins).tolist(),
        "below": {t: float(np.sum(x < t) / x.size) for t in thresholds},
        "min": float(x[finite].min()), "max": float(x[finite].max()),
        "sum": float(x[finite].sum()), "sum_squares": float(np.dot(x[finite], x[finite])),
    }


def test_update_matches_an_independent_numpy_computation_on_adversarial_values():
    # Every IEEE boundary and its fp32 neighbours, subnormals, signed zeros, infinities, NaNs (quiet and signalling
    # payloads), thresholds and their neighbours, random values over the whole fp32 range; both signs.
    boundaries = [2.0 ** -149, 2.0 ** -134, 2.0 ** -133, 2.0 ** -127, 2.0 ** -126 - 2.0 ** -134, 2.0 ** -126,
                  2.0 ** -25, 2.0 ** -24, 2.0 ** -14 - 2.0 ** -25, 2.0 ** -14, 65504.0, 65519.0, 65520.0,
                  (2 - 2.0 ** -8) * 2.0 ** 127, (2 - 2.0 ** -7) * 2.0 ** 127, *decade_grid(), 0.5, 1.0, 3.0]
    steps = _with_fp32_neighbours(np.array(boundaries, dtype=np.float32), 3)
    rng = np.random.default_rng(7)
    random = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-44, 38, 20000)).astype(np.float32)
    subnormal = np.arange(0, 4096, dtype=np.int32).view(np.float32)
    special = np.array([0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF], dtype=np.int32).view(np.float32)
    values = np.concatenate(steps + [random, subnormal, special])
    values = np.concatenate([values, -values])
    thresholds = decade_grid() + (0.5, 1.0)

    h = LogHistogram(thresholds=thresholds)
    h.update(torch.from_numpy(values))
    row = h.to_dict()
    expected = _numpy_reference(values, thresholds)
    for name in ("count", "nan", "posinf", "neginf", "zero", "negative", "fp32_subnormal", "fp16_overflow",
                 "fp16_underflow", "fp16_subnormal", "bf16_overflow", "bf16_underflow", "bf16_subnormal"):
        assert row[name] == expected[name], name
    for t in thresholds:
        assert row[f"below_{t:g}"] == expected["below"][t]
    assert (row["min"], row["max"]) == (expected["min"], expected["max"])
    finite = row["finite"]
    scale = float(np.abs(values[np.isfinite(values)].astype(np.float64)).sum())
    assert row["sum"] == pytest.approx(expected["sum"], rel=1e-12, abs=1e-12 * scale)
    assert row["rms"] ** 2 * finite == pytest.approx(expected["sum_squares"], rel=1e-12)
    # Bins: numpy's fp64 log10 may put a value within 1e-4 of a bin edge on the other side than fp32's does.
    layout = BinLayout()
    with np.errstate(divide="ignore", invalid="ignore"):
        position = (np.log10(np.abs(values.astype(np.float64))) - layout.log10_min) * layout.bins_per_decade
    near_edge = int(np.sum(np.isfinite(position) & (np.abs(position - np.round(position)) < 1e-4)))
    got, want = np.array(row["bin_counts"]), np.array(expected["bin_counts"])
    assert got.sum() == want.sum() == row["finite"] - row["zero"]
    assert np.abs(got - want).sum() <= 2 * near_edge < 0.05 * values.size


def _bin_of(value: float, layout: BinLayout) -> int:
    return int(np.searchsorted(layout.edges(), value, side="right")) - 1


@pytest.mark.parametrize("case", ["one_bin_above_its_edge", "negative", "zeros_tiny_huge_nonfinite", "lognormal"])
def test_quantiles_of_magnitude_lie_in_numpys_bin_and_between_the_exact_extrema(case):
    rng = np.random.default_rng(11)
    if case == "one_bin_above_its_edge":  # every value in [143, 150]: the bin is [133.4, 237.1)
        values = rng.uniform(143.0, 150.0, 5000)
    elif case == "negative":
        values = -(10.0 ** rng.uniform(-3, 2, 5000))
    elif case == "zeros_tiny_huge_nonfinite":
        values = np.concatenate([np.zeros(700), 10.0 ** rng.uniform(-40, -30, 300), 10.0 ** rng.uniform(20, 30, 50),
                                 -(10.0 ** rng.uniform(-2, 0, 3000)), [math.nan, math.inf, -math.inf]])
    else:
        values = rng.lognormal(0.0, 3.0, 20000) * rng.choice([-1.0, 1.0], 20000)
    row = _histogram(values, dtype=torch.float64)
    magnitude = np.abs(values[np.isfinite(values)])
    layout = BinLayout()
    assert (row["abs_min"], row["abs_max"]) == (magnitude.min(), magnitude.max())
    quantiles = [row[f"abs_p{q * 100:g}"] for q in (0.5, 0.9, 0.99, 0.999)]
    assert magnitude.min() <= quantiles[0] <= quantiles[1] <= quantiles[2] <= quantiles[3] <= magnitude.max()
    edges = layout.edges()
    for q, estimate in zip((0.5, 0.9, 0.99, 0.999), quantiles):
        exact = np.quantile(magnitude, q, method="lower")  # an element of the data: the value of rank floor(q(n-1))
        if exact == 0:
            assert estimate == 0
            continue
        i = _bin_of(exact, layout)
        assert edges[i] * (1 - 1e-12) <= estimate <= edges[i + 1] * (1 + 1e-12), (q, exact, estimate)


@pytest.mark.parametrize("values, low, high", [
    ([math.nan, math.inf, 3.0, 5.0], 3.0, 5.0),          # finite values all positive, a NaN / Inf beside them
    ([math.nan, -math.inf, -3.0, -5.0], -5.0, -3.0),
    ([math.inf, 0.0, 2.0], 0.0, 2.0),
    ([-math.inf, -0.0, -2.0], -2.0, 0.0),
])
def test_signed_extrema_ignore_nan_and_inf_whatever_the_signs(values, low, high):
    row = _histogram(values)
    assert (row["min"], row["max"]) == (low, high)


def test_extrema_and_moments_span_chunks_of_a_large_update():
    rng = np.random.default_rng(12)
    values = rng.uniform(1.0, 2.0, 300_000)
    values[5] = math.nan  # in the first chunk only; the others hold positive values only
    row = _histogram(values, dtype=torch.float64)
    finite = values[np.isfinite(values)]
    assert (row["min"], row["max"]) == (finite.min(), finite.max())
    assert row["sum"] == pytest.approx(finite.sum(), rel=1e-12)


def test_one_update_of_several_tensors_equals_one_update_each():
    rng = np.random.default_rng(13)
    tensors = [torch.from_numpy(rng.standard_normal(n)).float() * 10.0 ** k for n, k in ((1000, -3), (70000, 2), (5, 0))]
    together, apart = LogHistogram(), LogHistogram()
    together.update(*tensors)
    for t in tensors:
        apart.update(t)
    a, b = together.to_dict(), apart.to_dict()
    assert a.pop("sum") == pytest.approx(b.pop("sum"))
    for key in ("mean", "rms"):
        assert a.pop(key) == pytest.approx(b.pop(key))
    assert a == b


def _state(values: torch.Tensor, thresholds) -> np.ndarray:
    h = LogHistogram(thresholds=thresholds)
    h.update(values)
    return h.packed().numpy()


@pytest.mark.parametrize("update_path", KERNEL_PATHS, indirect=True)
@pytest.mark.parametrize("thresholds", [decade_grid(), (-1e-3, -1.00001e-3, 0.0, 1.0001e-2, 1.0002e-2, 3e-40)],
                         ids=["eps_grid", "cuts_sharing_cells"])
def test_kernel_and_torch_paths_give_the_same_state_bit_for_bit(update_path, thresholds):
    # The two paths read the bits differently (fp32 cells with binary search where a cell holds several cuts; fp64
    # cells with comparisons): every count and extremum must agree exactly, the sums to rounding. The second set
    # puts several cuts in one cell, in the normal range and among the subnormals. (A kernel-only test: the fixture
    # runs it on the kernel's variants alone.)
    thresholds = tuple(sorted(thresholds))
    rng = np.random.default_rng(21)
    around = np.array([t for t in thresholds if t] + [1e-3, 1e-2, 3e-40], dtype=np.float32)
    random = (rng.standard_normal(50000) * 10.0 ** rng.uniform(-45, 38, 50000)).astype(np.float32)
    values = np.concatenate(_with_fp32_neighbours(around, 4) + [
        random, np.arange(0, 70000, 7, dtype=np.int32).view(np.float32),
        np.array([0x7F800000, 0x7FC00001], dtype=np.int32).view(np.float32)])
    values = torch.from_numpy(np.concatenate([values, -values]))
    kernel = _state(values, thresholds)
    with kernels.unused():
        reference = _state(values, thresholds)
    extrema = 3
    np.testing.assert_array_equal(kernel[:-extrema - 2], reference[:-extrema - 2])  # every count
    np.testing.assert_array_equal(kernel[-extrema:], reference[-extrema:])
    finite = values[torch.isfinite(values)].double()
    assert kernel[-extrema - 2] == pytest.approx(reference[-extrema - 2], abs=1e-12 * float(finite.abs().sum()))
    assert kernel[-extrema - 1] == pytest.approx(reference[-extrema - 1], rel=1e-12)
    below = {t: float(np.sum(values.numpy().astype(np.float64) < t)) / values.numel() for t in thresholds}
    h = LogHistogram(thresholds=thresholds)
    assert [h.summarize(kernel)[f"below_{t:g}"] for t in thresholds] == [below[t] for t in thresholds]


def test_states_summarised_together_give_each_histogram_its_own_row():
    """One numpy pass over many states (AutoTaps and the recorder read dozens back at once) is row by row the same
    as each alone: empty, all-NaN, only zeros, signed values, and two threshold sets side by side; the single
    rows are the ones the numpy-oracle tests above check."""
    contents = [[], [math.nan] * 3, [0.0, -0.0], [-3.0, 1e-6, 2.5, math.inf], [5e-5, 2e-3, -7.0],
                list(np.geomspace(1e-9, 1e3, 500))]
    built = []
    for index, values in enumerate(contents):
        h = LogHistogram(thresholds=decade_grid() if index % 2 else ())
        if values:
            h.update(torch.tensor(values, dtype=torch.float32))
        built.append(h)
    states = [h.packed().numpy() for h in built]
    together = histograms.summarize_states(built, states)
    for h, state, row in zip(built, states, together):
        alone = h.summarize(state)
        assert row.keys() == alone.keys()
        for key, value in alone.items():
            assert row[key] == value or (isinstance(value, float) and math.isnan(value) and math.isnan(row[key])), key
    assert together[5]["count"] == 500 and together[5]["below_1e-08"] == pytest.approx(np.mean(
        np.geomspace(1e-9, 1e3, 500).astype(np.float32) < np.float32(1e-8)))
    assert together[1]["nan"] == 3 and math.isnan(together[1]["abs_p50"])


@pytest.mark.parametrize("update_path", KERNEL_PATHS, indirect=True)
def test_a_tensor_counted_in_pieces_gives_the_counts_of_one_pass(update_path, monkeypatch):
    """The kernel takes at most MAX_VALUES values per call (its lane counts are 32-bit): pieces of 7 values, each
    read at its own address, count and bound the same values as one call."""
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(1000, generator=generator) * 10.0 ** (torch.rand(1000, generator=generator) * 8 - 4)
    values[::97] = math.nan
    whole = LogHistogram(thresholds=decade_grid())
    whole.update(values)
    compiled = getattr(kernels.compiled, "kernel", kernels.compiled)
    in_pieces = _Kernel(compiled, update_path == "kernel_portable", max_values=7)
    monkeypatch.setattr(kernels, "compiled", in_pieces)
    pieces = LogHistogram(thresholds=decade_grid())
    pieces.update(values)
    assert in_pieces.calls == math.ceil(1000 / 7)
    a, b = whole.to_dict(), pieces.to_dict()
    for key in ("count", "nan", "zero", "negative", "bin_counts", "below_0.0001", "min", "max", "abs_min"):
        assert a[key] == b[key], key
    assert a["sum"] == pytest.approx(b["sum"], rel=1e-12)


def test_a_strided_fp16_view_counts_as_its_contiguous_copy():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(1000, generator=generator) * 10.0 ** (torch.rand(1000, generator=generator) * 8 - 4)
    strided = values.to(torch.float16).reshape(100, 10).t()  # non-contiguous, widened to fp32 first on the kernel
    view, copy = LogHistogram(), LogHistogram()
    view.update(strided)
    copy.update(strided.contiguous().reshape(-1))
    assert view.to_dict()["bin_counts"] == copy.to_dict()["bin_counts"]
