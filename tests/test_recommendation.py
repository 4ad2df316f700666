"""The stabiliser rule and the clamp-1e-2 verdict on hand-built sweep tables whose answer is known by hand."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from geodiag.reports.recommendation import EpsUnits, RecommendationRule, headline_table, recommend
from geodiag.reports.schema import SWEEP_COLUMNS


def sweep_rows(settings: dict, precisions=("fp32", "fp16"), cases=("a", "b", "c"), dataset=502, epoch=5) -> pd.DataFrame:
    """One row per setting x case x precision; ``settings`` maps (stabilizer, eps) to the fields that differ.

    Per setting: bias (compactness bias, the same in every row), grad_max, and optionally nan_in (a precision
    whose every row gets 4 non-finite gradient elements).
    """
    rows = []
    for (stabilizer, eps), spec in settings.items():
        for case in cases:
            for precision in precisions:
                bad = spec.get("nan_in") == precision
                rows.append(dict(
                    checkpoint=f"ckpt{epoch}", dataset=dataset, epoch=epoch, geometric_active=True, case=case,
                    stabilizer=stabilizer, eps=eps, precision=precision, loss=1.0, perimeter=1.0, compactness=1.0,
                    aspect=1.0, ref_perimeter=1.0, ref_compactness=1.0, ref_aspect=1.0,
                    bias_perimeter=spec["bias"] / 2, bias_compactness=spec["bias"], bias_aspect=0.0,
                    grad_max=spec["grad_max"], grad_l2=1.0, grad_p999=0.01,
                    sqrt_deriv_max=0.5 / math.sqrt(eps), sqrt_deriv_p99=1.0,
                    frac_below_eps=spec.get("below", 0.0), frac_zero_grad=spec.get("zero", 0.0),
                    nonfinite_loss=0, nonfinite_grad=4 if bad else 0))
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == list(SWEEP_COLUMNS)
    return frame


def test_headline_table_pools_cases_and_precisions_into_medians_maxima_and_counts():
    sweep = sweep_rows({("clamp", 1e-4): dict(bias=0.1, grad_max=0.02, nan_in="fp16")})
    sweep.loc[sweep["case"] == "b", "bias_compactness"] = -0.4   # |bias| values: 0.1, 0.4, 0.1 per precision
    sweep.loc[0, "grad_max"] = 0.5
    row = headline_table(sweep).iloc[0]
    assert row["median_abs_bias_compactness"] == pytest.approx(0.1)
    assert row["max_grad_max"] == pytest.approx(0.5)
    assert row["max_sqrt_deriv_max"] == pytest.approx(50.0)
    assert row["nonfinite"] == 3 * 4 and row["nonfinite_rows"] == 3
    assert row["nonfinite_precisions"] == "fp16"


def test_biased_clamp_1e2_without_gradient_advantage_is_not_justified():
    # Numbers in the spirit of the measured sweep: the gradient barely moves, the bias grows by orders.
    sweep = sweep_rows({
        ("clamp", 1e-4): dict(bias=0.05, grad_max=0.0285, zero=0.0034),
        ("clamp", 1e-2): dict(bias=0.9, grad_max=0.0304, zero=0.29),
        ("shifted", 1e-6): dict(bias=0.002, grad_max=0.0285),
    })
    rec = recommend(headline_table(sweep))
    assert rec.recommended_setting == ("shifted", 1e-6)
    assert rec.clamp_1e2.status == "not_justified"
    assert "90%" in rec.clamp_1e2.sentence and "0.2%" in rec.clamp_1e2.sentence
    assert "0.0304 vs 0.0285" in rec.clamp_1e2.sentence
    seed = " ".join(rec.seed_comparison)
    # normalised s (the built-in sweep): clamp 1e-4 there is not the seed's V2.3, and the text says so
    assert "clamp 1e-4 on normalised s (not the seed's V2.3, whose clamp is 1.563e-6 in these units)" in seed
    assert "not reproduced" not in seed
    in_seed_units = " ".join(recommend(headline_table(sweep), units=EpsUnits("the seed's s", True)).seed_comparison)
    assert "clamp 1e-4 (the seed's V2.3) produced no non-finite" in in_seed_units
    assert "not reproduced" in in_seed_units  # clamp 1e-4 was finite everywhere
    assert "no material change" in seed        # 0.0304 / 0.0285 = 1.07 < 2
    assert "×0.1" in seed                      # the local derivative does fall tenfold, as the seed computed
    assert "0.34% at clamp 1e-4 vs 29% at clamp 1e-2" in seed


def test_nan_in_fp16_at_clamp_1e4_makes_the_rule_pick_a_finite_setting_and_justifies_clamp_1e2():
    sweep = sweep_rows({
        ("clamp", 1e-4): dict(bias=0.01, grad_max=0.03, nan_in="fp16"),
        ("clamp", 1e-2): dict(bias=0.3, grad_max=0.03),
    })
    rec = recommend(headline_table(sweep))
    assert rec.recommended_setting == ("clamp", 1e-2)
    assert rec.clamp_1e2.status == "justified"
    assert rec.clamp_1e2.sentence.startswith("clamp 1e-2 on normalised s (not the seed's V2.4, whose clamp is "
                                             "1.563e-4 in these units) is justified")
    seed = " ".join(rec.seed_comparison)
    assert "produced 12 non-finite values (precisions: fp16)" in seed
    assert "clamp 1e-2 has none" in seed


def test_clamp_1e2_with_nan_is_not_justified_and_the_reason_names_the_precision():
    sweep = sweep_rows({
        ("clamp", 1e-2): dict(bias=0.3, grad_max=0.03, nan_in="fp16"),
        ("shifted", 1e-6): dict(bias=0.02, grad_max=0.03),
    })
    rec = recommend(headline_table(sweep))
    assert rec.recommended_setting == ("shifted", 1e-6)
    assert rec.clamp_1e2.status == "not_justified"
    assert "12 non-finite values in 3 rows (precisions: fp16)" in rec.clamp_1e2.sentence


def test_default_bound_is_fp16_headroom_at_the_initial_loss_scale():
    settings = {("additive", 1e-8): dict(bias=0.001, grad_max=1.5), ("shifted", 1e-4): dict(bias=0.01, grad_max=0.05)}
    rec = recommend(headline_table(sweep_rows(settings)))
    assert rec.grad_bound == pytest.approx(65504 / 65536)
    assert rec.recommended_setting == ("shifted", 1e-4)


def test_relative_bound_excludes_a_setting_a_decade_above_the_smallest_gradient():
    settings = {("additive", 1e-8): dict(bias=0.001, grad_max=1.0), ("shifted", 1e-4): dict(bias=0.01, grad_max=0.05)}
    rec = recommend(headline_table(sweep_rows(settings)), RecommendationRule(grad_bound=None))
    assert rec.grad_bound == pytest.approx(0.5)   # 10 x 0.05
    assert rec.recommended_setting == ("shifted", 1e-4)
    loose = recommend(headline_table(sweep_rows(settings)), RecommendationRule(grad_bound=2.0))
    assert loose.grad_bound == 2.0 and loose.recommended_setting == ("additive", 1e-8)


def test_bias_ties_within_tolerance_go_to_the_larger_eps():
    settings = {("shifted", 1e-6): dict(bias=0.00100, grad_max=0.03),
                ("shifted", 1e-4): dict(bias=0.00105, grad_max=0.03),
                ("shifted", 1e-2): dict(bias=0.00500, grad_max=0.03)}
    assert recommend(headline_table(sweep_rows(settings))).recommended_setting == ("shifted", 1e-4)
    strict = recommend(headline_table(sweep_rows(settings)), RecommendationRule(tie_tolerance=0.0))
    assert strict.recommended_setting == ("shifted", 1e-6)


def test_no_finite_setting_means_no_recommendation():
    sweep = sweep_rows({("clamp", 1e-4): dict(bias=0.01, grad_max=0.03, nan_in="fp16"),
                        ("clamp", 1e-2): dict(bias=0.3, grad_max=0.03, nan_in="fp32")})
    assert recommend(headline_table(sweep), RecommendationRule(grad_bound=None)).grad_bound is None
    rec = recommend(headline_table(sweep))
    assert rec.recommended is None
    assert rec.clamp_1e2.status == "not_justified"
    assert "no setting in the sweep passed the rule" in rec.clamp_1e2.sentence
    assert "clamp 1e-2 still has 12" in " ".join(rec.seed_comparison)


def test_clamp_1e2_absent_from_the_sweep_is_reported_as_not_measured():
    rec = recommend(headline_table(sweep_rows({("shifted", 1e-6): dict(bias=0.002, grad_max=0.03)})))
    assert rec.clamp_1e2.status == "not_measured"
    assert rec.recommended_setting == ("shifted", 1e-6)
    assert any("cannot be made" in s for s in rec.seed_comparison)


def test_summary_holds_rule_recommendation_and_verdict_fields():
    sweep = sweep_rows({("clamp", 1e-2): dict(bias=0.3, grad_max=0.03),
                        ("shifted", 1e-6): dict(bias=0.002, grad_max=0.03)})
    summary = recommend(headline_table(sweep), RecommendationRule(grad_factor=3.0, grad_bound=None)).summary()
    assert summary["rule"]["grad_factor"] == 3.0 and summary["rule"]["grad_bound_used"] == pytest.approx(0.09)
    assert "3 × the smallest" in summary["rule"]["text"]
    assert summary["recommended"]["stabilizer"] == "shifted" and summary["recommended"]["eps"] == 1e-6
    verdict = summary["verdict_clamp_1e-2"]
    assert verdict["status"] == "not_justified"
    assert verdict["clamp_1e-2"]["median_abs_bias_compactness"] == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs", [dict(grad_factor=0.5), dict(grad_bound=0.0), dict(grad_bound=float("inf")),
                                    dict(tie_tolerance=-1.0), dict(material_gradient_ratio=1.0)])
def test_rule_rejects_parameters_that_make_no_sense(kwargs):
    with pytest.raises(ValueError):
        RecommendationRule(**kwargs)
