"""The per-tensor table of analyze-checkpoint: signed extrema beside magnitudes, each column what its name says.

Reference: numpy on the same values (fp64). The quantiles of |x| come from the exact histogram, so they can only be
placed within the bin that holds numpy's order statistic; the extrema are exact.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from geodiag.diagnostics.instruments.histograms import BinLayout, LogHistogram
from geodiag.diagnostics.tools.analyze import _summaries
from geodiag.reports import analysis_report, schema


def _values() -> np.ndarray:
    """Magnitudes crowded in [143, 150] (one bin, where a quantile once fell below the minimum), both signs."""
    rng = np.random.default_rng(7)
    magnitudes = rng.uniform(143.0, 150.0, size=4001)
    return magnitudes * np.where(rng.random(magnitudes.size) < 0.5, -1.0, 1.0)


def _table(values: np.ndarray) -> pd.Series:
    histogram = LogHistogram(BinLayout())
    histogram.update(torch.tensor(values, dtype=torch.float32))
    tensors, _, _ = _summaries({"fp32": {"perimeter|value": histogram.packed().numpy()}})
    assert tuple(tensors.columns) == schema.TENSORS_COLUMNS
    return tensors.iloc[0]


def _bin_of(value: float, edges: np.ndarray) -> int:
    return int(np.searchsorted(edges, value, side="right") - 1)


def test_signed_extrema_and_magnitude_quantiles_agree_with_numpy():
    values = _values()
    row = _table(values)
    as_fp32 = values.astype(np.float32).astype(np.float64)
    magnitudes = np.abs(as_fp32)
    assert row["min"] == pytest.approx(as_fp32.min(), rel=0) and row["max"] == pytest.approx(as_fp32.max(), rel=0)
    assert row["abs_min"] == pytest.approx(magnitudes.min(), rel=0)
    assert row["abs_max"] == pytest.approx(magnitudes.max(), rel=0)
    ordered = [row[c] for c in ("abs_min", "abs_p50", "abs_p90", "abs_p99", "abs_p999", "abs_max")]
    assert ordered == sorted(ordered)
    edges = BinLayout().edges()
    for column, q in (("abs_p50", 0.5), ("abs_p90", 0.9), ("abs_p99", 0.99), ("abs_p999", 0.999)):
        expected = np.quantile(magnitudes, q, method="lower")
        assert _bin_of(row[column], edges) == _bin_of(expected, edges), column


def test_report_table_labels_signed_and_magnitude_columns():
    row = _table(_values())
    shown = [c for c in analysis_report.STATE_TENSOR_COLUMNS if c in ("min", "max") or c.startswith("abs_")]
    assert shown == ["min", "max", "abs_min", "abs_p50", "abs_p99", "abs_max"]
    assert row["min"] < 0 < row["abs_min"] <= row["abs_p50"]
