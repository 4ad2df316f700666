"""The report of a counterfactual sweep of a user's own bound (``clamp-sweep --loss --site``).

Reads DIR/site_sweep.csv; writes DIR/headline.csv, DIR/summary.json, DIR/report.md and DIR/report.html. The
recommendation rule is the built-in sweep's (``recommendation``), applied to the loss's own value: the bias is the
relative change of the loss against the fp64 loss at the smallest swept value, and the share of elements a clamp
holds at its bound stands for the share with zero gradient there (a clamped element passes none). The loss has no
perimeter/compactness/aspect of geodiag's, so those are absent. Rows where the loss raised (``raised`` set) have
nothing to measure: the rule runs without them and the report lists them with the user's line.

The verdict is about the user's own code: the bound their file has at the sites (``current_bound[SITE]``, the value
the calls were made with) against the rule's pick. The seed's V2.4 verdict stays in summary.json only, where the
study reads it for the seed's own loss; a user's eps are in their loss's units, where the seed's 1e-2 means
nothing unless the loss computes what the seed's did.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import seed
from .html import RenderedReport, Section, write_report
from .loss_findings import sweep_findings
from .recommendation import (EpsUnits, Recommendation, RecommendationRule, Verdict, derivative_bound, headline_table,
                             recommend)
from .schema import ReportInputError, write_json
from .screens import Answer, first_screen, hidden_answers, rule_pick_sentence, sweep_answers
from .tables import format_eps, format_number, format_percent, markdown_table, read_table, setting_label, write_table

TITLE = "geodiag sweep of your loss's bound"
ROWS_FILE = "site_sweep.csv"
REQUIRED = ("checkpoint", "case", "precision", "sites", "eps", "ref_eps", "loss", "ref_loss", "bias_loss",
            "grad_max", "grad_l2", "sqrt_deriv_max", "frac_below_eps", "nonfinite_loss", "nonfinite_grad",
            "masked_nonfinite", "stabilizer")
# A row whose evaluation raised: the exception on one line and the user's file:line.
RAISED_COLUMNS = ("raised", "raised_site")
# Per site, the bound(s) the user's calls there were made with, ";"-separated (the value their file has).
CURRENT_BOUND = "current_bound[{site}]"
RULE = RecommendationRule(bias_column="median_abs_bias_loss")
VERDICT_TITLE = "Verdict on your bound"
VERDICT_KEY = "verdict_current_bound"
_TONES = {"justified": "ok", "tied": "ok", "not_justified": "bad", "not_measured": "warn"}


def units_for(sites: str) -> EpsUnits:
    return EpsUnits(f"each eps replaces the bound at {sites} and is in the loss's own units", seed_units=None)


def current_bound(rows: pd.DataFrame, sites: list[str]) -> tuple[Optional[float], str]:
    """(the one bound the user's file has at every site, "") or (None, why there is no single one)."""
    found = {}
    for site in sites:
        column = CURRENT_BOUND.format(site=site)
        recorded = rows[column].dropna() if column in rows else pd.Series(dtype=object)
        if recorded.empty:
            return None, (f"the sweep's rows do not record the bound your file has at {site} (swept by a geodiag "
                          "that did not record it): sweep again to compare")
        found[site] = sorted({float(v) for text in recorded.astype(str) for v in text.split(";")})
    values = sorted({v for bounds in found.values() for v in bounds})
    if len(values) == 1:
        return values[0], ""
    listed = "; ".join(f"{site}: {', '.join(map(format_eps, bounds))}" for site, bounds in found.items())
    return None, (f"your calls were made with different bounds ({listed}), and the sweep sets every site to one "
                  "value, so no swept value is your configuration")


def _your_numbers(row: pd.Series) -> str:
    return (f"median |loss bias| {format_percent(row['median_abs_bias_loss'])}, max |dL/dlogit| "
            f"{format_number(row['max_grad_max'])}, non-finite values {int(row['nonfinite'])}")


def _listed(sites: str) -> str:
    """The rows' comma-joined sites as a reader's list."""
    return ", ".join(sites.split(","))


def bound_verdict(rec: Recommendation, bound: float, sites: str) -> Verdict:
    """The rule's answer about the user's current bound: keep it (the pick, or a tie the pick won only by the
    tie-break), change it (a smaller bias passed, or it fails the rule), or not measured (not swept)."""
    table, yours = rec.candidates, f"your bound {format_eps(bound)} at {_listed(sites)}"
    chosen = None if rec.recommended is None else table[np.isclose(table["eps"], rec.recommended["eps"])].iloc[0]
    pick = "nothing" if chosen is None else setting_label(chosen["stabilizer"], chosen["eps"])
    rows = table[np.isclose(table["eps"], bound, rtol=1e-9, atol=0)]
    numbers = {"current_bound": bound, "recommended": rec.recommended}
    if rows.empty:
        swept = ", ".join(map(format_eps, table["eps"]))
        return Verdict("not_measured", f"Not measured: {yours} (the value your file has) was not swept ({swept}); "
                       f"add it to the swept values to compare it with the rule's pick, {pick}.", numbers)
    row = rows.iloc[0]
    numbers["current"] = {"eps": float(row["eps"]), "median_abs_bias_loss": float(row["median_abs_bias_loss"]),
                          "max_grad_max": float(row["max_grad_max"]), "nonfinite": int(row["nonfinite"])}
    if chosen is not None and np.isclose(chosen["eps"], bound):
        return Verdict("justified", f"Keep {yours}: the rule picks it ({_your_numbers(row)})."
                       + (f" {rec.tie_break}" if rec.tie_break else ""), numbers)
    if chosen is None:
        return Verdict("not_justified", f"Y{yours[1:]} ({_your_numbers(row)}): no swept value passed the "
                       "rule, this one included.", numbers)
    rule = rec.rule
    if row["eligible"] and row[rule.bias_column] <= table.loc[table["eligible"], rule.bias_column].min() \
            + rule.tie_tolerance:
        return Verdict("tied", (
            f"Keep {yours} or move to {pick}: yours passes the rule ({_your_numbers(row)}) and its median |loss "
            f"bias| is within {rule.tolerance_text()} of the smallest, a tie, which the rule breaks towards the "
            f"larger eps, {pick} (median |loss bias| {format_percent(chosen['median_abs_bias_loss'])}): its sqrt's "
            f"local derivative is bounded by {derivative_bound(chosen['eps'])} instead of "
            f"{derivative_bound(bound)}."), numbers)
    if row["eligible"]:
        return Verdict("not_justified", (
            f"Change {yours} to {pick}: it passed the same rule with a smaller median |loss bias|, "
            f"{format_percent(chosen['median_abs_bias_loss'])} vs {format_percent(row['median_abs_bias_loss'])} "
            f"(max |dL/dlogit| {format_number(chosen['max_grad_max'])} vs {format_number(row['max_grad_max'])}, "
            f"non-finite values {int(chosen['nonfinite'])} vs {int(row['nonfinite'])})."), numbers)
    if not row["finite"]:
        why = (f"yours produced {int(row['nonfinite'])} non-finite values (precisions: "
               f"{row['nonfinite_precisions'] or 'n/a'})")
    else:
        why = (f"yours sends max |dL/dlogit| {format_number(row['max_grad_max'])}, above the rule's bound "
               f"B = {format_number(rec.grad_bound)}")
    return Verdict("not_justified", f"Change {yours} to {pick}: {why} ({pick}: {_your_numbers(chosen)}).", numbers)


def _verdict(rec: Recommendation, rows: pd.DataFrame, sites: str) -> Verdict:
    bound, missing = current_bound(rows, sites.split(","))
    if bound is None:
        pick = "nothing" if rec.recommended_setting is None else setting_label(*rec.recommended_setting)
        return Verdict("not_measured", f"Not measured: {missing}. The rule's pick: {pick}.", {"current_bound": None})
    return bound_verdict(rec, bound, sites)


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


def first_screen_answers(rec: Recommendation, rows: pd.DataFrame, verdict: Verdict) -> list[Answer]:
    """The first screen's answers, the verdict on the user's own bound first; a check of its own appends its line to
    this list."""
    answers = [Answer("Is your bound justified?", verdict.sentence, VERDICT_TITLE)]
    answers += sweep_answers(rec, rows, VERDICT_TITLE, judge_seed_clamp=False)
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
    verdict = _verdict(rec, rows, sites)
    findings, facts = sweep_findings(rows.to_dict(orient="records"), ("eps",))
    written = write_table(rec.candidates, directory / "headline.csv")
    summary = write_json(directory / "summary.json", {
        **rec.summary(), VERDICT_KEY: {"status": verdict.status, "sentence": verdict.sentence, **verdict.numbers},
        "sites": sites.split(","), "reference": f"the loss in fp64 at eps {rows['ref_eps'].iloc[0]:g}",
        "raised": raised.to_dict(orient="records"), **facts})
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
        first_screen(first_screen_answers(rec, rows, verdict) + hidden_answers(findings, VERDICT_TITLE)),
        Section(VERDICT_TITLE, "\n\n".join([*findings, verdict.sentence]), tone=_TONES[verdict.status]),
        Section("Recommended value", (f"Recommended: {setting_label(*recommended)}." if recommended else
                                      "No swept value passed the rule.")
                + (f" {rec.tie_break}" if rec.tie_break else "") + "\n\nRule: " + RULE.describe()),
        Section("What was measured", (
            f"Sites: {_listed(sites)}; {rows['checkpoint'].nunique()} checkpoint(s), {rows['case'].nunique()} case(s), "
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
