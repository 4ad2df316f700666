"""The rule that picks a sqrt stabiliser setting from a clamp sweep, and the verdict on the seed's V2.4 clamp.

Why a written rule: the seed raised its sqrt clamp from V2.3's eps to V2.4's (``seed.VERSIONS``) on an argument,
not a measurement. Here the choice is a function of the sweep table, its parameters are printed in the report,
and every sentence about the two clamps is formatted from the numbers it compares, whichever way they fall.

Units: an eps is only the seed's V2.3 / V2.4 clamp when it acts on the seed's quantity. The built-in sweep's eps
act on geodiag's normalised s, 1/``seed.UNITS_FACTOR`` of the seed's raw-Sobel s, so there the same eps is not the
seed's clamp (that sits at eps / ``seed.UNITS_FACTOR``); a counterfactual sweep of the user's own clamp is in the
loss's own units, and on the seed's loss its two eps are V2.3 / V2.4. ``EpsUnits`` carries which, into every
sentence.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd

from . import seed
from .schema import FP16_MAX, GRAD_SCALER_INITIAL_SCALE
from .tables import format_eps, setting_label

SETTING_KEYS = ("stabilizer", "eps")
# summary.json's keys: the verdict on V2.4's clamp, and inside it that setting's numbers ("clamp_1e-2").
CLAMP_KEY = setting_label(*seed.V24.setting).replace(" ", "_")
VERDICT_KEY = f"verdict_{CLAMP_KEY}"
# The title of the verdict's section in the sweep reports.
VERDICT_TITLE = f"Verdict on {setting_label(*seed.V24.setting)}"


@dataclass(frozen=True)
class EpsUnits:
    """What the swept eps act on, and whether the seed's two clamp settings there are its V2.3 / V2.4."""

    description: str
    seed_units: Optional[bool]  # None: the loss's own units, which only its author can map to the seed's

    def name(self, setting: tuple[str, float]) -> str:
        """A setting's label, saying whether it is the seed's own clamp."""
        label = setting_label(*setting)
        version = seed.version_of(setting)
        if version is None:
            return label
        if self.seed_units is None:
            return (f"{label} (in the loss's own units; the seed's {version.name} if the loss computes what the "
                    "seed's did)")
        if self.seed_units:
            return f"{label} (the seed's {version.name})"
        return (f"{label} on normalised s (not the seed's {version.name}, whose clamp is "
                f"{format_eps(version.eps / seed.UNITS_FACTOR)} in these units)")


NORMALISED_S = EpsUnits(
    f"eps acts on geodiag's normalised s = gx² + gy² (Sobel divided by {seed.SOBEL_GAIN}), 1/{seed.UNITS_FACTOR:g} "
    "of the seed's raw-Sobel s: the seed's clamps " + " / ".join(format_eps(v.eps) for v in seed.VERSIONS) + " are "
    + " / ".join(format_eps(v.eps / seed.UNITS_FACTOR, digits=2) for v in seed.VERSIONS) + " here", seed_units=False)


def _nonfinite_rows(sweep: pd.DataFrame) -> pd.Series:
    counted = (sweep["nonfinite_loss"].fillna(0) > 0) | (sweep["nonfinite_grad"].fillna(0) > 0)
    measured = ~np.isfinite(sweep["loss"].to_numpy(dtype=float)) | ~np.isfinite(sweep["grad_max"].to_numpy(dtype=float))
    return counted | measured


def headline_table(sweep: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per setting (and per ``by`` columns): bias medians, gradient maxima, pixel fractions, non-finite counts.

    Medians and maxima pool every checkpoint, case and precision of the group; NaN entries (a bias without a
    finite value) are skipped. ``nonfinite`` is the sum of non-finite loss and gradient elements in any
    precision; ``nonfinite_rows`` also counts rows whose loss or grad_max is itself not finite.
    """
    frame = sweep.assign(
        _abs_loss=sweep["bias_loss"].abs() if "bias_loss" in sweep else np.nan,
        _abs_perimeter=sweep["bias_perimeter"].abs(), _abs_compactness=sweep["bias_compactness"].abs(),
        _abs_aspect=sweep["bias_aspect"].abs(), _nonfinite=sweep["nonfinite_loss"].fillna(0) + sweep["nonfinite_grad"].fillna(0),
        _bad_row=_nonfinite_rows(sweep),
        _finite_grad_max=sweep["grad_max"].where(np.isfinite(sweep["grad_max"].to_numpy(dtype=float))),
    )
    keys = list(by) + list(SETTING_KEYS)
    grouped = frame.groupby(keys, sort=True)
    table = grouped.agg(
        rows=("loss", "size"),
        cases=("case", "nunique"),
        median_abs_bias_perimeter=("_abs_perimeter", "median"),
        median_abs_bias_compactness=("_abs_compactness", "median"),
        median_abs_bias_aspect=("_abs_aspect", "median"),
        median_abs_bias_loss=("_abs_loss", "median"),
        max_grad_max=("_finite_grad_max", "max"),
        max_sqrt_deriv_max=("sqrt_deriv_max", "max"),
        median_frac_below_eps=("frac_below_eps", "median"),
        median_frac_zero_grad=("frac_zero_grad", "median"),
        nonfinite=("_nonfinite", "sum"),
        nonfinite_rows=("_bad_row", "sum"),
    ).reset_index()
    bad_precisions = (frame[frame["_bad_row"]].groupby(keys)["precision"]
                      .agg(lambda p: ", ".join(sorted(set(map(str, p))))).rename("nonfinite_precisions"))
    table = table.merge(bad_precisions.reset_index(), on=keys, how="left")
    table["nonfinite_precisions"] = table["nonfinite_precisions"].fillna("")
    table["nonfinite"] = table["nonfinite"].astype("int64")
    table["nonfinite_rows"] = table["nonfinite_rows"].astype("int64")
    return table


# fp16's largest finite value over GradScaler's initial scale.
FP16_GRAD_BOUND = FP16_MAX / GRAD_SCALER_INITIAL_SCALE


@dataclass(frozen=True)
class RecommendationRule:
    """Parameters of the rule; ``describe()`` is the text printed in the report.

    grad_bound: the bound B on max |dL/dlogit|. Default: 65504 / 65536, the largest gradient that is still
        finite in fp16 once GradScaler multiplies it by its initial scale 65536 (nnU-Net's CUDA training).
        A bound relative to the other settings would be set by the most biased one, whose bias flattens its
        gradient. ``grad_bound=None`` uses the relative bound: grad_factor x the smallest max grad_max.
    bias_column: the headline column whose smallest value the rule seeks: the median |relative compactness bias|
        for geodiag's loss, the median |relative loss bias| (``median_abs_bias_loss``) for a user's loss.
    tie_tolerance: median |bias| values within this absolute distance of the smallest are ties
        (default 1e-4, a fraction: 0.01 percentage points in the reports' tables, which print bias in %); ties
        go to the larger eps, since every stabiliser bounds its sqrt's local derivative by 1/(2 sqrt(eps)).
    material_gradient_ratio: a change of max grad_max smaller than this factor is called "no material change"
        when V2.4's clamp is compared with V2.3's (the seed expected 1/(2 sqrt(eps)) to scale the gradient by the
        square root of the ratio of their eps).
    """

    grad_factor: float = 10.0
    grad_bound: Optional[float] = FP16_GRAD_BOUND
    tie_tolerance: float = 1e-4
    material_gradient_ratio: float = 2.0
    bias_column: str = "median_abs_bias_compactness"

    @property
    def bias_name(self) -> str:
        return self.bias_column.removeprefix("median_abs_bias_") + " bias"

    def __post_init__(self) -> None:
        if not (self.grad_factor >= 1.0 and math.isfinite(self.grad_factor)):
            raise ValueError(f"grad_factor must be a finite number >= 1, got {self.grad_factor}")
        if self.grad_bound is not None and not (self.grad_bound > 0 and math.isfinite(self.grad_bound)):
            raise ValueError(f"grad_bound must be a finite positive number, got {self.grad_bound}")
        if not self.tie_tolerance >= 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {self.tie_tolerance}")
        if not self.material_gradient_ratio > 1.0:
            raise ValueError(f"material_gradient_ratio must be > 1, got {self.material_gradient_ratio}")

    def bound_text(self) -> str:
        if self.grad_bound is not None:
            if self.grad_bound == FP16_GRAD_BOUND:
                return (f"B = {self.grad_bound:.4g} = {FP16_MAX:g} / {GRAD_SCALER_INITIAL_SCALE:g} (a larger gradient overflows fp16 once "
                        "GradScaler multiplies it by its initial scale)")
            return f"B = {self.grad_bound:.3g} (absolute bound)"
        return f"B = {self.grad_factor:g} × the smallest max |dL/dlogit| among finite settings"

    def tolerance_text(self) -> str:
        """The tie tolerance in the unit of the tables beside it: percentage points of a bias printed in %."""
        return f"{100 * self.tie_tolerance:.3g} percentage points"

    def describe(self) -> str:
        return (
            "Among the settings (stabiliser, eps) with zero non-finite loss or gradient values in every measured "
            f"precision and case, and with max |dL/dlogit| ≤ {self.bound_text()}, pick the one with the smallest "
            f"median |relative {self.bias_name}| against the fp64 reference (eps→0 for geodiag's loss, the smallest "
            f"swept value for a user's clamp). Medians within {self.tolerance_text()} of the smallest are ties "
            "(the tables print |bias| in %), and a tie goes to the larger eps: every stabiliser bounds its sqrt's "
            "local derivative by 1/(2√eps), so among biases the rule does not tell apart it takes the one with "
            "the most headroom for inputs near zero."
        )


@dataclass(frozen=True)
class Verdict:
    """What the table says about one named setting, as a status, a sentence and the numbers behind it."""

    status: str  # justified | tied (passes the rule, loses only the tie-break) | not_justified | not_measured
    sentence: str
    numbers: dict[str, Any]


@dataclass(frozen=True)
class Recommendation:
    """The rule applied to a headline table: the candidates, the bound used, the pick and the verdicts."""

    rule: RecommendationRule
    candidates: pd.DataFrame  # the headline table plus finite / within_bound / eligible columns
    grad_bound: Optional[float]
    recommended: Optional[dict[str, Any]]
    clamp_1e2: Verdict
    seed_comparison: list[str]
    units: EpsUnits = NORMALISED_S
    tie_break: Optional[str] = None  # why the pick is not the least-biased eligible setting, when a tie decided

    @property
    def recommended_setting(self) -> Optional[tuple[str, float]]:
        if self.recommended is None:
            return None
        return self.recommended["stabilizer"], float(self.recommended["eps"])

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary: rule, recommended setting and verdict fields."""
        return {
            "rule": {"text": self.rule.describe(), **asdict(self.rule), "grad_bound_used": self.grad_bound},
            "eps_units": {"description": self.units.description, "seed_units": self.units.seed_units},
            "recommended": self.recommended,
            VERDICT_KEY: {"status": self.clamp_1e2.status, "sentence": self.clamp_1e2.sentence,
                                   **self.clamp_1e2.numbers},
            "seed_comparison": self.seed_comparison,
            "tie_break": self.tie_break,
            "settings_measured": int(len(self.candidates)),
            "settings_eligible": int(self.candidates["eligible"].sum()),
        }


def _find(table: pd.DataFrame, setting: tuple[str, float]) -> Optional[pd.Series]:
    rows = table[(table["stabilizer"] == setting[0]) & np.isclose(table["eps"], setting[1], rtol=1e-9, atol=0)]
    return None if rows.empty else rows.iloc[0]


def _percent(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.3g}%"


def _number(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _row_numbers(row: pd.Series) -> dict[str, Any]:
    return {
        "stabilizer": str(row["stabilizer"]), "eps": float(row["eps"]),
        "median_abs_bias_loss": float(row.get("median_abs_bias_loss", math.nan)),
        "median_abs_bias_compactness": float(row["median_abs_bias_compactness"]),
        "median_abs_bias_perimeter": float(row["median_abs_bias_perimeter"]),
        "median_abs_bias_aspect": float(row["median_abs_bias_aspect"]),
        "max_grad_max": float(row["max_grad_max"]), "max_sqrt_deriv_max": float(row["max_sqrt_deriv_max"]),
        "median_frac_below_eps": float(row["median_frac_below_eps"]),
        "median_frac_zero_grad": float(row["median_frac_zero_grad"]),
        "nonfinite": int(row["nonfinite"]), "nonfinite_rows": int(row["nonfinite_rows"]),
        "nonfinite_precisions": str(row["nonfinite_precisions"]),
    }


def _pick(candidates: pd.DataFrame, tolerance: float, bias: str) -> Optional[pd.Series]:
    eligible = candidates[candidates["eligible"] & candidates[bias].notna()]
    if eligible.empty:
        return None
    best = eligible[bias].min()
    tied = eligible[eligible[bias] <= best + tolerance]
    return tied.sort_values(["eps", bias, "stabilizer"], ascending=[False, True, True]).iloc[0]


def _clamp_1e2_verdict(candidates: pd.DataFrame, chosen: Optional[pd.Series], bound: Optional[float],
                       rule: RecommendationRule, units: EpsUnits) -> Verdict:
    tolerance, bias, bias_name = rule.tie_tolerance, rule.bias_column, rule.bias_name
    row = _find(candidates, seed.V24.setting)
    name = units.name(seed.V24.setting)
    if row is None:
        return Verdict("not_measured", f"{name} was not part of this sweep, so the table says nothing about it.", {})
    numbers = {CLAMP_KEY: _row_numbers(row), "recommended": None if chosen is None else _row_numbers(chosen),
               "grad_bound": bound}
    own = (f"median |{bias_name}| {_percent(row[bias])}, "
           f"max |dL/dlogit| {_number(row['max_grad_max'])}, non-finite values {int(row['nonfinite'])}")
    if chosen is not None and chosen["stabilizer"] == seed.STABILIZER and np.isclose(chosen["eps"], seed.V24.eps):
        return Verdict("justified", f"{name} is justified by this sweep: the rule picks it ({own}).", numbers)
    reasons = []
    if not row["finite"]:
        reasons.append(f"it produced {int(row['nonfinite'])} non-finite values in {int(row['nonfinite_rows'])} "
                       f"rows (precisions: {row['nonfinite_precisions'] or 'n/a'})")
    if bound is not None and not row["within_bound"]:
        reasons.append(f"its max |dL/dlogit| {_number(row['max_grad_max'])} exceeds the bound B = {_number(bound)}")
    if chosen is None:
        reasons.append("no setting in the sweep passed the rule")
        return Verdict("not_justified", f"{name} is not justified by this sweep: " + "; ".join(reasons) + ".", numbers)
    if row["finite"] and row["within_bound"]:
        tied = row[bias] <= chosen[bias] + tolerance
        reasons.append(f"its median |{bias_name}| ties with the recommended one (within {rule.tolerance_text()}) "
                       "and the tie-break prefers the larger eps" if tied
                       else f"a setting with a smaller median |{bias_name}| passed the same rule")
    sentence = (
        f"{name} is not justified by this sweep: its median |{bias_name}| is "
        f"{_percent(row[bias])} vs {_percent(chosen[bias])} for the "
        f"recommended setting ({setting_label(chosen['stabilizer'], chosen['eps'])}); its max |dL/dlogit| is "
        f"{_number(row['max_grad_max'])} vs {_number(chosen['max_grad_max'])}; non-finite values: "
        f"{int(row['nonfinite'])} vs {int(chosen['nonfinite'])}. Reason: " + "; ".join(reasons) + "."
    )
    return Verdict("not_justified", sentence, numbers)


def derivative_bound(eps: float) -> str:
    """1/(2 sqrt(eps)), the bound every stabiliser puts on its sqrt's local derivative, as printed."""
    return "inf" if eps <= 0 else _number(0.5 / math.sqrt(eps))


def _tie_break(candidates: pd.DataFrame, chosen: Optional[pd.Series], rule: RecommendationRule) -> Optional[str]:
    """Why the pick is not the eligible setting of least bias, with the numbers (None when it is that setting)."""
    bias, bias_name = rule.bias_column, rule.bias_name
    eligible = candidates[candidates["eligible"] & candidates[bias].notna()]
    if chosen is None or eligible.empty or chosen[bias] <= eligible[bias].min():
        return None
    least = eligible.sort_values([bias, "eps"], ascending=[True, False]).iloc[0]
    picked, other = setting_label(chosen["stabilizer"], chosen["eps"]), setting_label(least["stabilizer"], least["eps"])
    sentence = (f"The tie-break decided: {other} has the smallest median |{bias_name}|, {_percent(least[bias])}; "
                f"{picked}'s {_percent(chosen[bias])} is within {rule.tolerance_text()} of it, and its larger eps "
                f"bounds the sqrt's local derivative by {derivative_bound(chosen['eps'])} instead of "
                f"{derivative_bound(least['eps'])}")
    measured = (chosen["max_sqrt_deriv_max"], least["max_sqrt_deriv_max"])
    if all(math.isfinite(v) for v in measured):
        sentence += f" (largest measured: {_number(measured[0])} vs {_number(measured[1])})"
    zero = (chosen["median_frac_zero_grad"], least["median_frac_zero_grad"])
    if all(math.isfinite(v) for v in zero):
        sentence += (f"; elements with zero gradient at the clamped quantity (median): "
                     f"{_percent(zero[0])} vs {_percent(zero[1])}")
    return sentence + "."


def _seed_comparison(candidates: pd.DataFrame, rule: RecommendationRule, units: EpsUnits) -> list[str]:
    """Sentences testing the seed's story (V2.3's clamp -> NaN, V2.4's -> smaller gradients) on the table."""
    old, new = seed.V23, seed.V24
    v23, v24 = _find(candidates, old.setting), _find(candidates, new.setting)
    name23, name24 = setting_label(*old.setting), setting_label(*new.setting)
    bias, bias_name = rule.bias_column, rule.bias_name
    sentences = [f"Units: {units.description}."]
    if v23 is not None:
        blamed = (f": the NaN the seed attributes to its {old.name} is not reproduced by this sweep"
                  if units.seed_units else "")
        if v23["finite"]:
            sentences.append(f"{units.name(old.setting)} produced no non-finite loss or gradient in any measured "
                             f"precision and case{blamed}.")
        else:
            sentences.append(f"{units.name(old.setting)} produced {int(v23['nonfinite'])} non-finite values "
                             f"(precisions: {v23['nonfinite_precisions'] or 'n/a'}).")
    if v23 is None or v24 is None:
        missing = ", ".join(n for n, r in ((name23, v23), (name24, v24)) if r is None)
        sentences.append(f"Not in the sweep: {missing}; the seed's {format_eps(old.eps)} → {format_eps(new.eps)} "
                         "comparison cannot be made.")
        return sentences
    deriv_ratio = v24["max_sqrt_deriv_max"] / v23["max_sqrt_deriv_max"]
    grad_ratio = v24["max_grad_max"] / v23["max_grad_max"]
    material = (math.isfinite(grad_ratio) and grad_ratio > 0
                and max(grad_ratio, 1 / grad_ratio) >= rule.material_gradient_ratio)
    direction = "reduction" if grad_ratio < 1 else "increase"
    change = (f"a material {direction}" if material else
              f"no material change (threshold: a factor of {rule.material_gradient_ratio:g} either way)")
    derivative = (f"the largest local sqrt derivative from {_number(v23['max_sqrt_deriv_max'])} to "
                  f"{_number(v24['max_sqrt_deriv_max'])} (×{_number(deriv_ratio)}; the seed's 1/(2√eps) predicts "
                  f"×{math.sqrt(old.eps / new.eps):g}), and " if math.isfinite(deriv_ratio) else "")
    sentences.append(
        f"Raising the clamp from {format_eps(old.eps)} to {format_eps(new.eps)} changes {derivative}the largest "
        f"|dL/dlogit| that training sees from {_number(v23['max_grad_max'])} to {_number(v24['max_grad_max'])} "
        f"(×{_number(grad_ratio)}): {change}.")
    zero = "" if units.seed_units is None else (
        f"Elements with zero gradient at the clamped quantity (median): {_percent(v23['median_frac_zero_grad'])} at "
        f"{name23} vs {_percent(v24['median_frac_zero_grad'])} at {name24}; ")
    # a user's sweep clamps at several sites: their shares are per site in its report, never pooled here
    biases = f"edian |{bias_name}|: {_percent(v23[bias])} vs {_percent(v24[bias])}."
    sentences.append(f"{zero}m{biases}" if zero else f"M{biases}")
    if not v23["finite"]:
        outcome = "has none in this sweep" if v24["finite"] else f"still has {int(v24['nonfinite'])}"
        sentences.append(f"Where {name23} had {int(v23['nonfinite'])} non-finite values, {name24} {outcome}.")
    return sentences


def recommend(headline: pd.DataFrame, rule: RecommendationRule = RecommendationRule(),
              units: EpsUnits = NORMALISED_S) -> Recommendation:
    """Apply ``rule`` to a headline table (``headline_table`` without ``by``) and judge V2.4's clamp, named in
    ``units`` (the built-in sweep's normalised s by default)."""
    candidates = headline.copy()
    candidates["finite"] = (candidates["nonfinite"] == 0) & (candidates["nonfinite_rows"] == 0)
    finite_grads = candidates.loc[candidates["finite"], "max_grad_max"].dropna()
    if rule.grad_bound is not None:
        bound: Optional[float] = rule.grad_bound
    elif not finite_grads.empty:
        bound = float(finite_grads.min()) * rule.grad_factor
    else:
        bound = None
    candidates["within_bound"] = candidates["max_grad_max"] <= bound if bound is not None else False
    candidates["eligible"] = candidates["finite"] & candidates["within_bound"]
    chosen = _pick(candidates, rule.tie_tolerance, rule.bias_column)
    return Recommendation(
        rule=rule, candidates=candidates, grad_bound=bound,
        recommended=None if chosen is None else _row_numbers(chosen),
        clamp_1e2=_clamp_1e2_verdict(candidates, chosen, bound, rule, units),
        seed_comparison=_seed_comparison(candidates, rule, units), units=units,
        tie_break=_tie_break(candidates, chosen, rule),
    )
