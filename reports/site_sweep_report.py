"""The report of a counterfactual sweep of a user's own bound (``clamp-sweep --loss --site``).

Reads DIR/site_sweep.csv; writes DIR/headline.csv, DIR/summary.json, DIR/report.md and DIR/report.html. The
recommendation rule and the verdict on the seed's V2.4 clamp are the built-in sweep's (``recommendation``), applied
to the loss's own value: the bias is the relative change of the loss against the fp64 loss at the smallest swept
value, and the share of elements a clamp holds at its bound stands for the share with zero gradient there
(a clamped element passes none). The loss has no perimeter/compactness/aspect of geodiag's, so those are absent.
Rows where the loss raised (``raised`` set) have nothing to measure: the rule runs without them and the report
lists them with the user's line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import seed
from .html import RenderedReport, Section, write_report
from .recommendation import VERDICT_TITLE, EpsUnits, Recommendation, RecommendationRule, headline_table, recommend
from .schema import ReportInputError, write_json
from .screens import Answer, first_screen, rule_pick_sentence, sweep_answers
from .tables import format_eps, format_percent, markdown_table, read_table, setting_label, write_table

TITLE = "geodiag sweep of your loss's bound"
ROWS_FILE = "site_sweep.csv"
REQUIRED = ("checkpoint", "case", "precision", "sites", "eps", "ref_eps", "loss", "ref_loss", "bias_loss",
            "grad_max", "grad_l2", "sqrt_deriv_max", "frac_below_eps", "nonfinite_loss", "nonfinite_grad",
            "masked_nonfinite", "stabilizer")
# A row whose evaluation raised: the exception on one line and the user's file:line.
RAISED_COLUMNS = ("raised", "raised_site")
RULE = RecommendationRule(bias_column="median_abs_bias_loss")
_TONES = {"justified": "ok", "not_justified": "bad", "not_measured": "warn"}


def units_for(sites: str) -> EpsUnits:
    return EpsUnits(f"each eps replaces the bound at {sites} and is in the loss's own units", seed_units=None)


def _at_bound_answer(rows: pd.DataFrame) -> Answer | None:
    """Each site's median share of elements held at its bound (zero gradient there), per site, never pooled."""
    at_bound = [c for c in rows.columns if c.startswith("at_bound_fraction[")]
    precision = "fp32" if (rows["precision"] == "fp32").any() else sorted(rows["precision"].unique())[0]
    mine = rows[rows["precision"] == precision]
    eps_values = [e for e in (seed.V23.eps, seed.V24.eps) if np.isclose(mine["eps"], e).any()]
    if not at_bound or not eps_values:
        return None
    medians = {e: mine[np.isclose(mine["eps"], e)][at_bound].median() for e in eps_values}
    per_site = "; ".join(f"{column.removeprefix('at_bound_fraction[').rstrip(']')}: "
                         + " → ".join(f"{format_percent(medians[e][column])} at {format_eps(e)}" for e in eps_values)
                         for column in at_bound)
    return Answer("How much of each clamp sits at its bound (zero gradient)?",
                  f"{per_site} (median over cases, per site, {precision}).", "At-bound fraction per site")


def first_screen_answers(rec: Recommendation, rows: pd.DataFrame) -> list[Answer]:
    """The first screen's answers; a check of its own appends its line to this list."""
    answers = sweep_answers(rec, rows, VERDICT_TITLE)
    if rec.recommended is not None:
        answers.append(Answer("Which eps does the rule pick, and why?", rule_pick_sentence(rec.summary(), rows),
                              "Recommended value"))
    at_bound = _at_bound_answer(rows)
    return answers + ([at_bound] if at_bound else [])


def render(directory: str | Path) -> RenderedReport:
    directory = Path(directory)
    every = read_table(directory / ROWS_FILE, REQUIRED)
    if every.empty:
        raise ReportInputError(f"{directory / ROWS_FILE} has no rows")
    did_raise = every["raised"].notna() if "raised" in every else pd.Series(False, index=every.index)
    rows, raised = every[~did_raise], every[did_raise].reindex(columns=["checkpoint", "case", "precision", "eps",
                                                                         *RAISED_COLUMNS])
    if rows.empty:
        raise ReportInputError(f"{directory / ROWS_FILE}: the loss raised on every row, first "
                               f"{raised['raised'].iloc[0]} at {raised['raised_site'].iloc[0]}")
    sites = str(rows["sites"].iloc[0])
    sweep = rows.assign(bias_perimeter=np.nan, bias_compactness=np.nan, bias_aspect=np.nan,
                        frac_zero_grad=rows["frac_below_eps"])
    rec = recommend(headline_table(sweep), RULE, units_for(sites))
    written = write_table(rec.candidates, directory / "headline.csv")
    summary = write_json(directory / "summary.json", {
        **rec.summary(), "sites": sites.split(","), "reference": f"the loss in fp64 at eps {rows['ref_eps'].iloc[0]:g}",
        "raised": raised.to_dict(orient="records")})
    display = pd.DataFrame({
        "setting": [setting_label(s, e) for s, e in zip(rec.candidates["stabilizer"], rec.candidates["eps"])],
        "median abs loss bias (%)": 100 * rec.candidates["median_abs_bias_loss"],
        "max grad_max": rec.candidates["max_grad_max"],
        "max sqrt_deriv_max": rec.candidates["max_sqrt_deriv_max"],
        "non-finite": rec.candidates["nonfinite"],
        "eligible": rec.candidates["eligible"],
    })
    at_bound = [c for c in rows.columns if c.startswith("at_bound_fraction[")]
    for column in at_bound:  # per site, never pooled across sites
        medians = rows.groupby("eps")[column].median()
        site = column.removeprefix("at_bound_fraction[")[:-1]
        display.insert(len(display.columns) - 2, f"at bound (median, %), {site}",
                       100 * rec.candidates["eps"].map(medians).to_numpy())
    per_site = rows.groupby(["precision", "eps"])[at_bound + ["masked_nonfinite"]].median().reset_index()
    recommended = rec.recommended_setting
    sections = [
        first_screen(first_screen_answers(rec, rows)),
        Section(VERDICT_TITLE, "\n\n".join([rec.clamp_1e2.sentence, "\n".join(
            f"- {s}" for s in rec.seed_comparison)]), tone=_TONES[rec.clamp_1e2.status]),
        Section("Recommended value", (f"Recommended: {setting_label(*recommended)}" if recommended else
                                      "No swept value passed the rule.") + "\n\nRule: " + RULE.describe()),
        Section("What was measured", (
            f"Sites: {sites}; {rows['checkpoint'].nunique()} checkpoint(s), {rows['case'].nunique()} case(s), "
            f"precisions {', '.join(sorted(rows['precision'].unique()))}. Each case is predicted whole as nnU-Net "
            "predicts it (no gradient into the network); every gradient here is the loss's gradient at those "
            "logits. Reference: the same loss in fp64 at the smallest swept value. Units: the eps are the bound "
            "at the site in the loss's own units.")),
        *([Section("Where the loss raised", (
            f"{len(raised)} row(s) produced no loss: the loss raised at the line shown. They are left out of the "
            "rule, the headline table and the per-site table.\n\n" + markdown_table(raised)), tone="bad")]
          if len(raised) else []),
        Section("Headline table", "Per swept value, pooled over checkpoints, cases and precisions. at bound: "
                "share of each site clamp's elements moved to a bound (zero gradient there), per site.\n\n"
                + markdown_table(display)),
        Section("At-bound fraction per site", "Median over cases; masked_nonfinite: op outputs that held NaN/Inf "
                "in calls whose final value was finite.\n\n" + markdown_table(per_site)),
    ]
    return write_report(directory, TITLE, sections, data=[summary, *written])
