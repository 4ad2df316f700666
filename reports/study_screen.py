"""The study report's first screen: was the NaN reproduced, was the seed's 1e-2 clamp justified and what does it
change, is the prior doing anything and why, and what a user runs next on their own run.

Each answer names one pool (the replica's runs, its fp32 sweep rows), gives one number per claim with its unit and
its scope, and points at the section that holds the evidence. Numbers come from ``StudyTables``; the words'
thresholds are ``schema``'s.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from . import seed
from .schema import INERT_SHARE
from .screens import Answer, counted, rule_pick_sentence, scope
from .study_answers import raising
from .study_tables import (StudyTables, analysed_seeds, replica_sweep_table, rows_at, sqrt_sites, switch_on_checkpoint,
                           user_run_names, user_runs)
from .tables import format_eps, format_number, format_percent, setting_label


def _span(values: pd.Series, percent: bool = True) -> str:
    """"a–b" (or one value when they agree after formatting) in the quantity's unit."""
    write = format_percent if percent else format_number
    low, high = write(values.min()), write(values.max())
    return low if low == high else f"{low}–{high}"


def _training_scope(tables: StudyTables, what: str) -> str:
    study, users = tables.study, user_run_names(tables.study)
    steps = tables.runs[tables.runs["run"].isin(users)].groupby("run")["watched_steps"].sum()
    datasets = counted(len(study["datasets"]), "dataset", ", ".join(str(d) for d in study["datasets"]))
    per_run = f"{int(steps.iloc[0])} steps/run" if len(steps) and steps.nunique() == 1 else "steps per run vary"
    return scope(what, datasets, f"{study['image_size']}²", study["device"], "fp32 training", per_run)


def reproduced(tables: StudyTables, analysed_bad: int, analysed: str, section: str) -> Answer:
    """Was the NaN reproduced: the replica's non-finite steps, switch-on gradients and analysed values."""
    users = user_run_names(tables.study)
    runs = tables.runs[tables.runs["run"].isin(users)]
    gradients = tables.gradients[tables.gradients["run"].isin(users)]
    bad_steps = int(runs["nonfinite_steps"].fillna(0).sum())
    bad_gradients = int(((gradients["nonfinite_grad_logits"] + gradients["nonfinite_grad_network"]) > 0).sum())
    first = [(run["run"], run["first_nonfinite"]) for run in user_runs(tables.study) if run.get("first_nonfinite")]
    total = bad_steps + bad_gradients + analysed_bad + len(first)
    word = "No" if total == 0 else "Yes"
    if first:
        word += ": " + "; ".join(f"{run} at iteration {f.get('iteration')} ({f.get('phase')} {f.get('op')} at "
                                 f"{f.get('site')}, {f.get('dtype')})" for run, f in first) + "; in all"
    answer = (f"{word}: {bad_steps} non-finite of {int(runs['watched_steps'].sum())} watched training steps, "
              f"{bad_gradients} of {len(gradients)} switch-on term gradients, {analysed_bad} non-finite elements "
              f"analysed in {analysed} "
              + _training_scope(tables, f"the replica, {len(users)} run{'' if len(users) == 1 else 's'}") + ".")
    return Answer("Was the NaN reproduced?", answer, section)


def precisions(tables: StudyTables, section: str) -> Optional[Answer]:
    """Where the user's loss cannot run at all: the precision, the user's line and the error."""
    raised = raising(tables.precisions)
    if not raised:
        return None
    return Answer("Does the seed's loss run in every precision?",
                  "No: it raises in " + "; ".join(raised) + " (nnU-Net's autocast).", section)


def _fp32_rows(tables: StudyTables) -> tuple[dict, dict[str, str]]:
    table, at_bound = replica_sweep_table(tables.replica_sweep, sqrt_sites(tables.study))
    fp32 = table[table["precision"] == "fp32"].set_index("eps")
    return rows_at(fp32, (seed.V23.eps, seed.V24.eps)), at_bound


def clamp_change(tables: StudyTables, section: str) -> Optional[Answer]:
    """What raising the replica's clamps from V2.3's eps to V2.4's changes, in the fp32 rows of its own sweep."""
    if tables.replica_sweep is None or tables.replica_sweep.empty:
        return None
    rows, at_bound = _fp32_rows(tables)
    if len(rows) < 2:
        return None
    low, high = rows[seed.V23.eps], rows[seed.V24.eps]
    old, new = format_eps(seed.V23.eps), format_eps(seed.V24.eps)
    held = "; ".join(f"{name.split(', ')[1]} at its bound {format_percent(low[name])} → {format_percent(high[name])}"
                     for name in at_bound)
    word = "Not needed here" if int(low["nonfinite"]) == 0 else "It removes non-finite values"
    sweep = tables.replica_sweep
    answer = (f"{word}: at {old} the replica gave {int(low['nonfinite'])} non-finite gradient elements; "
              f"{old} → {new} changes the median |loss bias| {format_percent(low['median_abs_loss_bias'])} → "
              f"{format_percent(high['median_abs_loss_bias'])}, the max |dL/dlogit| "
              f"{format_number(low['max_grad_logits'])} → {format_number(high['max_grad_logits'])} (per logit, "
              f"loss units); {held} "
              + scope("the replica's own clamps swept at their lines",
                      counted(sweep["checkpoint"].nunique(), "checkpoint"),
                      counted(sweep["case"].nunique(), "case") + ", whole images", analysed_seeds(tables.study),
                      tables.study["device"], "fp32 rows only")
              + ".")
    return Answer(f"Was {setting_label(*seed.V24.setting)} justified, and what does it change?", answer, section)


def rule_pick(tables: StudyTables, section: str) -> Optional[Answer]:
    """Why the replica sweep's rule picks the eps it picks (its bias reference is the smallest swept eps)."""
    if not tables.replica_summary.get("recommended") or tables.replica_sweep is None:
        return None
    return Answer("Which eps does the sweep's rule pick, and why?",
                  rule_pick_sentence(tables.replica_summary, tables.replica_sweep), section)


def prior_effect(tables: StudyTables, clamps: pd.DataFrame, section: str) -> Answer:
    """Is the prior doing anything: the replica's geometric terms' shares of the step's gradient, and the cause."""
    users = user_run_names(tables.study)
    gradients = tables.gradients[tables.gradients["run"].isin(users) & (tables.gradients["term"] != "dice_ce")]
    medians = gradients.groupby(["run", "term"], sort=False)["share_of_step"].median()
    largest = medians.abs().idxmax()
    inert = bool((medians.abs() < INERT_SHARE).all())
    batches = gradients.groupby(["run", "term"])["batch"].count()
    carrying = int((medians.abs() >= INERT_SHARE).sum())
    verdict = (f"No: every geometric term's median share of the step's gradient is below {INERT_SHARE:g} in magnitude"
               if inert else f"In part: {carrying} of {len(medians)} term-runs have a median share of the step's "
               f"gradient of at least {INERT_SHARE:g} in magnitude, the others are inert")
    answer = (f"{verdict} (largest {format_number(medians[largest])}, {largest[1]} on {largest[0]}; single batches "
              f"{format_number(gradients['share_of_step'].min())} to {format_number(gradients['share_of_step'].max())}"
              f"; shares are fractions of 1) "
              + scope("the replica", f"{int(batches.max())} switch-on batches per run", "fp32") + ".")
    small = tables.small_s[(tables.small_s["units"] == "seed") & tables.small_s["run"].isin(users)
                           & np.isclose(tables.small_s["eps"], seed.V23.eps)]
    switch_on = {run["run"]: switch_on_checkpoint(run) for run in user_runs(tables.study)}
    at_switch = small[small["checkpoint"] == small["run"].map(switch_on)]
    if len(at_switch):
        medians_below = at_switch.groupby("run")["fraction_below"].median()
        fp32 = clamps[clamps["precision"] == "fp32"] if not clamps.empty else clamps
        # a cause only where some term is inert and a clamp holds most of its elements at the bound
        cause = carrying < len(medians) and len(fp32) and fp32["at_bound_fraction"].max() >= 0.5
        answer += (f" {'Why: at' if cause else 'At'} the switch-on {_span(medians_below)} of pixels (median per run) "
                   f"have s below {format_eps(seed.V23.eps)} in the seed's units")
        if len(fp32):
            held = ", ".join(f"the {term} clamp {_span(frame['at_bound_fraction'])}"
                             for term, frame in fp32.groupby("term", sort=False))
            answer += f"; at the bound, where a sqrt clamp passes zero gradient: {held} of its elements (per run)"
        answer += "."
    return Answer("Is the prior doing anything?", answer, section)


def next_run(remaining: int, section: str) -> Answer:
    return Answer("What do I run on my own run?",
                  "`geodiag watch -- nnUNetv2_train …` names the first non-finite op, its line and phase; then "
                  "`geodiag analyze-checkpoint last_good.pth --loss FILE.py:NAME --precision fp32,bf16,fp16` "
                  f"({remaining} candidate causes remain open for a GPU run).", section)
