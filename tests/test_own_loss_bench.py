"""The autotaps rows of geodiag bench run and say what they compared (no timing is asserted)."""
import math

from geodiag.diagnostics.tools.bench import run_bench


def test_autotaps_rows_compare_each_loss_with_and_without_taps():
    rows = run_bench("cpu", quick=True, only=["autotaps"])
    assert [r.benchmark for r in rows] == ["autotaps"] * 4
    assert {r.subject.split(" fwd")[0] for r in rows} == {"GeometricLoss production", "GeometricLoss v2.3"}
    assert all(math.isfinite(r.value) and r.value > 0 and r.unit == "x" and r.target == "<= 3x" for r in rows)
    assert all(r.met == (r.value <= 3.0) for r in rows)
