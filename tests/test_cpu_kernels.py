"""The compiled CPU kernels' min/max (what NonFiniteProvenance checks every fp32 CPU output with) against numpy, on
both of its loops; and that CI builds them. (The histogram kernel is held to numpy in test_histograms.)"""
import os

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments import kernels

pytestmark = pytest.mark.skipif(kernels.compiled is None and not os.environ.get("GEODIAG_REQUIRE_KERNEL"),
                                reason="the CPU kernels are not built here (no C compiler at install)")


def test_the_kernels_are_built_where_ci_requires_them():
    """CI sets GEODIAG_REQUIRE_KERNEL: there kernels that failed to build are a failure, not a silent fallback."""
    assert kernels.compiled is not None, "geodiag.diagnostics.instruments._cpu_kernels was not built"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2_where_present", "portable"])
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 33, 1000, 65537])
def test_min_max_matches_numpy_and_turns_nan_on_any_nan(n, portable):
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 10.0 ** rng.uniform(-40, 38, n)).astype(np.float32)
    values[rng.integers(0, n)] = np.inf if n > 2 else values[0]
    values[rng.integers(0, n)] = -np.inf if n > 4 else values[0]

    def min_max(array):
        return kernels.compiled.min_max_fp32(torch.from_numpy(array).data_ptr(), array.size, portable)

    assert min_max(values) == (float(values.min()), float(values.max()))
    for position in {0, n // 2, n - 1}:  # a NaN in the vector body or in the tail
        with_nan = values.copy()
        with_nan[position] = np.nan
        low, high = min_max(with_nan)
        assert np.isnan(low) and np.isnan(high), position


def test_min_max_reads_strided_views_and_declines_other_dtypes():
    x = torch.randn(8, 8)
    x[3, 0] = float("inf")
    assert kernels.min_max(x) == (float(x.min()), float(x.max()))
    assert kernels.min_max(x[:, 1:]) == (float(x[:, 1:].min()), float(x[:, 1:].max()))  # no Inf in that view
    assert kernels.min_max(x.double()) is None
    assert kernels.min_max(x.half()) is None
