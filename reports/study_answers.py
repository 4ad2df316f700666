"""The study report's answers (questions 1-5): does the seed's design produce a non-finite value, what each term
contributes at the switch-on, where the seed's shares of small s sit among the measured ones, whether V2.4's clamp
is justified for the seed's design, and what differs between the datasets. Question 6 is ``study_causes``.

Each function returns its section and the one-paragraph answer the report's summary lists; the numbers come from
``study_tables``, the seed's own from ``seed``, and the thresholds behind the words are printed beside them. A
configuration run with several seeds states each number as its median and range over seeds, and a verdict that
differs between seeds as seed-dependent, never as a finding.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import pandas as pd

from . import seed
from .html import Section
from .recommendation import VERDICT_KEY
from .schema import DOMINANT_SHARE, INERT_SHARE
from .study_tables import (STEP_NORM_AFTER, StudyTables, below_median_column, clamp_at_bound,
                           dataset_table, gradient_bounds, headline_rows, nonfinite_per_precision, replica_sweep_table,
                           over_seeds, rows_at, run_configurations, run_seeds, seed_unit_shares, state_label,
                           term_shares, user_run_names, user_runs)
from .tables import format_eps, format_number, format_percent, markdown_table, setting_label

# A share of pixels below a clamp within this factor of the seed's is "the seed's regime".
REGIME_FACTOR = 2.0
# Two datasets "differ" in a quantity when the larger value is at least this factor above the smaller.
DIFFER_FACTOR = 1.5


def raising(precisions: Optional[pd.DataFrame]) -> list[str]:
    """"PRECISION at SITE (ERROR) in N of M user runs" for each precision in which a user's loss raised."""
    if precisions is None or precisions.empty:
        return []
    failed = precisions[~precisions["runs"].astype(bool)]
    total = precisions["run"].nunique()
    return [f"{precision} at {site} ({error}) in {len(frame)} of {total} user runs"
            for (precision, site, error), frame in failed.groupby(["precision", "site", "error"], sort=False)]


# -------------------------------------------------------------------------------------------------- seeds
SEED_DEPENDENT = "seed-dependent"


def spread(values: pd.Series, form: Callable[[float], str] = format_number) -> str:
    """One seed's number as is; several seeds' as "median M, L – H over N seeds"."""
    values = values.dropna()
    if len(values) <= 1:
        return form(values.iloc[0]) if len(values) else "–"
    return f"median {form(values.median())}, {form(values.min())} – {form(values.max())} over {len(values)} seeds"


def verdict_over_seeds(verdicts: pd.Series) -> str:
    """The verdict every seed gave, else "seed-dependent (V1 in n1, V2 in n2 of N seeds)"."""
    counts = verdicts.value_counts(sort=False)
    if len(counts) == 1:
        return str(counts.index[0])
    return (f"{SEED_DEPENDENT} (" + ", ".join(f"{verdict} in {count}" for verdict, count in counts.items())
            + f" of {len(verdicts)} seeds)")


def spread_table(per_run: pd.Series, study: dict, name: str) -> str:
    """A Markdown table of ``name`` per configuration over its seeds (median, range, seeds); empty without seeds."""
    table = over_seeds(per_run, study)
    if table.empty or table["seeds"].max() < 2:
        return ""
    return (f"\n\nOver seeds, per configuration: {name}.\n\n"
            + markdown_table(table.rename(columns={"median": f"{name} (median)"})))


def _replica_peak(user: pd.DataFrame, study: dict, active: bool) -> str:
    """The user runs' largest step norm before clipping in the epochs with the geometric term on (``active``) or
    off: per seed (the largest over its runs), spread over seeds."""
    window = user[user["geometric_active"].astype(bool) == active]
    per_seed = window.groupby(window["run"].map(run_seeds(study)).fillna(-1), sort=True)["grad_norm_max"].max()
    return spread(per_seed)


# ---------------------------------------------------------------------------------------------- question 1
def _first_nonfinite_rows(study: dict) -> list[dict]:
    rows = []
    for run in study["runs"]:
        first = run.get("first_nonfinite")
        if not first:
            continue
        replay = first.get("replay") or {}
        rows.append({"run": run["run"], "iteration": first.get("iteration"), "epoch": first.get("epoch"),
                     "phase": first.get("phase"), "op": first.get("op"), "site": first.get("site"),
                     "dtype": first.get("dtype"), "replay": replay.get("classification"),
                     "reaches the weights' gradients": replay.get("reaches_parameter_gradients")})
    return rows


def _evidence(tables: StudyTables, sites: pd.DataFrame, first: list[dict]) -> tuple[list[str], int]:
    """The lines listing every measurement of non-finite values, and how many of the replica's were."""
    runs, gradients, users = tables.runs, tables.gradients, user_run_names(tables.study)
    watched = runs.groupby("run", sort=False)["watched_steps"].sum()
    bad_steps = runs.groupby("run", sort=False)["nonfinite_steps"].sum()
    bad_runs = [run for run in watched.index if bad_steps.get(run, 0)]
    steps = sorted({int(n) for n in watched})
    lines = ["Training under geodiag watch: " + (", ".join(
        f"{run} {int(bad_steps[run])} non-finite of {int(watched[run])} steps" for run in bad_runs)
        + f"; the other {len(watched) - len(bad_runs)} runs none" if bad_runs else
        f"0 non-finite steps in each of the {len(watched)} runs") + " (of "
        + " or ".join(map(str, steps)) + " watched steps per run)."]
    if first:
        lines.append("First non-finite step per run (watch's first_nonfinite.json):\n\n"
                     + markdown_table(pd.DataFrame(first)))
    bad_gradients = gradients[(gradients["nonfinite_grad_logits"] + gradients["nonfinite_grad_network"]) > 0]
    lines.append(f"Switch-on batches (term_gradients.csv): {len(bad_gradients)} of {len(gradients)} term gradients "
                 "had a non-finite element.")
    raised = raising(tables.precisions)
    if raised:
        lines.append("Precisions: the user's loss raised before producing a value under nnU-Net's autocast in "
                     + "; ".join(raised) + " (loss_precisions.csv); those precisions were not analysed or swept.")
    analysed_bad = 0
    if not sites.empty:
        per = nonfinite_per_precision(sites)
        lines.append("Analysis of the user runs' switch-on checkpoints with `--loss` (every site, training patches "
                     "and whole images), non-finite elements produced per precision (`masked_calls`: calls whose "
                     "non-finite output the loss hid from its final value):\n\n" + markdown_table(per))
        analysed_bad = int(per["forward"].sum() + per["backward"].sum())
    bounds = gradient_bounds(runs, gradients)
    lines.append("What bounds it: per run, the largest gradient norm clip_grad_norm_ returned (before clipping to "
                 f"{seed.CLIP_NORM}; watch's per-step rows), and over the switch-on batches the largest |dL/dlogit| "
                 "each term sends to the full-resolution logits and the largest norm of what it sends to the "
                 "network's weights:\n\n" + markdown_table(bounds)
                 + (spread_table(bounds.set_index("run")[STEP_NORM_AFTER], tables.study, STEP_NORM_AFTER)
                    if len(bounds) else ""))
    replica_bad = int(bad_steps.reindex(users).fillna(0).sum()) + len(
        bad_gradients[bad_gradients["run"].isin(users)]) + analysed_bad
    return lines, replica_bad


def _epochs(runs: pd.DataFrame, active: bool) -> str:
    """The span of epochs with the geometric term on (``active``) or off, as "first–last"."""
    epochs = runs.loc[runs["geometric_active"].astype(bool) == active, "epoch"]
    return "none" if epochs.empty else f"{int(epochs.min())}–{int(epochs.max())}"


def nonfinite_section(tables: StudyTables, sites: pd.DataFrame) -> tuple[Section, str]:
    """Q1: does the seed's design produce a non-finite value, and where; else the numbers that bound it."""
    runs, gradients, users = tables.runs, tables.gradients, user_run_names(tables.study)
    first = _first_nonfinite_rows(tables.study)
    lines, replica_bad = _evidence(tables, sites, first)
    raised = raising(tables.precisions)
    if replica_bad == 0 and not any(r["run"] in users for r in first):
        user = gradients[gradients["run"].isin(users)]
        largest = user["max_abs_grad_logits"].max() if len(user) else math.nan
        mine = runs[runs["run"].isin(users)]
        watched = int(runs.groupby("run", sort=False)["watched_steps"].sum().reindex(users).sum())
        analysed = ", ".join(sorted(sites["precision"].unique())) if not sites.empty else "none"
        answer = (f"No: the seed's design produced no non-finite value in {watched} "
                  f"watched training steps, its switch-on batches or its analysed precisions ({analysed}); its "
                  f"terms sent at most {format_number(largest)} to a logit at the switch-on; the step's norm before "
                  f"clipping peaked at {_replica_peak(mine, tables.study, True)} after the switch-on (epochs "
                  f"{_epochs(mine, True)}) and at {_replica_peak(mine, tables.study, False)} before it (epochs "
                  f"{_epochs(mine, False)})." + (f" Its loss cannot run in {'; '.join(raised)}." if raised
                                                         else ""))
    else:
        where = [r for r in first if r["run"] in users]
        reach = "reaches the weights' gradients"
        answer = ("Yes: " + "; ".join(f"{r['run']} at iteration {r['iteration']} ({r['phase']} {r['op']} at "
                                      f"{r['site']}, {r['dtype']}, {r['replay']}, {reach}: {r[reach]})"
                                      for r in where)
                  if where else f"Yes, in {replica_bad} measured values (see the tables).")
    body = "\n\n".join([answer] + [f"- {line}" if "\n" not in line else line for line in lines])
    return Section("Does the seed's design produce a non-finite value?", body, numbered=True), answer


# ---------------------------------------------------------------------------------------------- question 2
def _share_sentences(table: pd.DataFrame, study: Optional[dict]) -> list[str]:
    """Per configuration, each geometric term's role and median share (over its seeds, when it has several)."""
    configurations = run_configurations(study) if study else {}
    geometric = table[table["term"] != "dice_ce"]
    geometric = geometric.assign(configuration=geometric["run"].map(lambda run: configurations.get(run, run)))
    return [f"{configuration}: " + ", ".join(f"{term} {verdict_over_seeds(terms['role'])} ({spread(terms['share'])})"
                                             for term, terms in frame.groupby("term", sort=False))
            for configuration, frame in geometric.groupby("configuration", sort=False)]


def _share_spread(table: pd.DataFrame, study: Optional[dict]) -> str:
    """A Markdown table: per configuration and term, its share's median and range over seeds and the verdict they
    give; empty when no configuration has several seeds."""
    if not study:
        return ""
    frame = table.assign(configuration=table["run"].map(run_configurations(study)))
    spread_rows = frame.groupby(["configuration", "term"], sort=False).agg(
        seeds=("share", "count"), share_median=("share", "median"), share_low=("share", "min"),
        share_high=("share", "max"), role=("role", verdict_over_seeds)).reset_index()
    if spread_rows["seeds"].max() < 2:
        return ""
    return "\n\nOver seeds, per configuration (each seed's share is its median over batches):\n\n" + markdown_table(
        spread_rows)


def shares_section(gradients: pd.DataFrame, clamps: pd.DataFrame,
                   study: Optional[dict] = None) -> tuple[Section, str]:
    """Q2: each term's share of the step's gradient at the switch-on, inert or dominant, and why; with ``study``,
    per configuration over its seeds."""
    table = term_shares(gradients)
    batches = gradients.groupby(["run", "term"], sort=False)["share_of_step"].agg(["min", "max"])
    shown = table.copy()
    shown.insert(shown.columns.get_loc("share") + 1, "share, range", [
        f"{format_number(batches.loc[(r.run, r.term), 'min'])} to {format_number(batches.loc[(r.run, r.term), 'max'])}"
        for r in table.itertuples()])
    body = ("On training batches of each run's switch-on checkpoint (nnU-Net's own data loader), the gradient each "
            "term sends to the network, as a share of the step's gradient g: <g_term, g>/|g|², a fraction of 1. "
            "On each batch the shares of Dice+CE and the terms sum to 1; `share` is each term's median over batches, "
            "so the medians need not sum to 1, and `share, range` gives the single batches' smallest and largest "
            f"(a term inert by its median may exceed {INERT_SHARE:g} on one batch). \"Inert\": |median share| < "
            f"{INERT_SHARE:g}; \"dominant\": median share > {DOMINANT_SHARE:g}. `value`: the weighted term; "
            "`norm_ratio`: |g_term|/|g|.\n\n" + markdown_table(shown) + _share_spread(table, study))
    sentences = _share_sentences(table, study)
    if not clamps.empty:
        body += ("\n\nWhy, the clamps: share of the elements each sqrt clamp of the replica held at its bound in fp32 "
                 "(they pass zero gradient), from the analysis' sites table:\n\n"
                 + markdown_table(clamp_at_bound(clamps).assign(at_bound_fraction=lambda t: 100 * t["at_bound_fraction"])
                                  .rename(columns={"at_bound_fraction": "held at the bound (%)"})))
    if (table["term"] == "compactness").any():
        body += ("\n\nWhy, the units: in the seed's units the perimeter P is a sum of raw-Sobel magnitudes, "
                 f"{seed.SOBEL_GAIN:g}x the geometric perimeter, so 4πA/P² is at most "
                 f"1/{seed.UNITS_FACTOR:g} of the geometric compactness (a disk gives 1/{seed.UNITS_FACTOR:g}, "
                 "not 1) and the compactness term sits near 1 - 4πA/P² ≈ 1 whatever the shape; the weighted value "
                 "column shows it.")
    answer = "; ".join(sentences) + "."
    return Section("What does each term contribute at the switch-on?", body, numbered=True), answer


# ---------------------------------------------------------------------------------------------- question 3
def _seed_statistics() -> str:
    """The seed's shares below each version's eps as it states them, V2.4's first."""
    return ", ".join(f"{format_percent(seed.BELOW_AT_SWITCH_ON[v.eps])} below {format_eps(v.eps)}"
                     for v in reversed(seed.VERSIONS))


def _regime(share: float) -> str:
    """Where a measured share below V2.4's eps sits relative to the seed's."""
    ratio = share / seed.BELOW_AT_SWITCH_ON[seed.V24.eps]
    if 1 / REGIME_FACTOR <= ratio <= REGIME_FACTOR:
        return "the seed's regime"
    return f"{format_number(ratio if ratio > 1 else 1 / ratio)}x {'above' if ratio > 1 else 'below'} the seed's"


def _regime_side(share: float) -> str:
    """The verdict behind ``_regime`` without its factor: the seed's regime, above or below it."""
    words = _regime(share)
    return words if words == "the seed's regime" else words.split("x ", 1)[1]


def _cell(values: pd.Series) -> str:
    """A table cell of one number per seed: the median, and the range when there are several seeds."""
    values = values.dropna()
    if len(values) <= 1:
        return format_percent(values.iloc[0]) if len(values) else "–"
    return f"{format_percent(values.median())} ({format_percent(values.min())} – {format_percent(values.max())})"


def _against_the_seed(v24: pd.Series) -> str:
    """Where one state's shares below V2.4's eps (one per seed) sit against the seed's, per seed when they
    disagree."""
    v24 = v24.dropna()
    if len(v24) <= 1:
        return _regime(v24.iloc[0]) if len(v24) else "–"
    sides = v24.map(_regime_side)
    return verdict_over_seeds(sides) if sides.nunique() > 1 else f"{_regime(v24.median())} in every seed"


def _per_run_states(small_s: pd.DataFrame, study: dict) -> pd.DataFrame:
    """``seed_unit_shares`` with each run's configuration and each checkpoint's state in words."""
    per_run = seed_unit_shares(small_s)
    runs = {run["run"]: run for run in study["runs"]}
    return per_run.assign(configuration=per_run["run"].map(run_configurations(study)),
                          state=[state_label(checkpoint, runs[run]) for run, checkpoint
                                 in zip(per_run["run"], per_run["checkpoint"])])


def state_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per configuration and state (untrained, after an epoch, the switch-on): the share of pixels below each
    version's eps in the seed's units, median over the seeds of each run's median over cases (range over seeds),
    and where V2.4's sits against the seed's. ``per_run``: ``_per_run_states``."""
    rows = []
    for (configuration, state), frame in per_run.groupby(["configuration", "state"], sort=False):
        row = {"configuration": configuration, "state": state, "seeds": len(frame),
               "cases per seed": int(frame["cases"].max())}
        row.update({f"below {format_eps(v.eps)} (median over seeds, range)": _cell(frame[below_median_column(v.eps)])
                    for v in seed.VERSIONS})
        row[f"against the seed's {format_percent(seed.BELOW_AT_SWITCH_ON[seed.V24.eps])}"] = _against_the_seed(
            frame[below_median_column(seed.V24.eps)])
        rows.append(row)
    return pd.DataFrame(rows)


def _range_sentence(per_run: pd.DataFrame) -> Optional[str]:
    """Where the seed's share below V2.4's eps lies among every measured configuration and state (each the median
    over its seeds). ``per_run``: ``_per_run_states``."""
    share = seed.BELOW_AT_SWITCH_ON[seed.V24.eps]
    measured = per_run.groupby(["configuration", "state"], sort=False)[below_median_column(seed.V24.eps)].median()
    measured = measured.dropna()
    if not len(measured):
        return None
    low, high = measured.idxmin(), measured.idxmax()
    ends = (f"{low[0]} {low[1]} ({format_percent(measured.min())})", f"{high[0]} {high[1]} "
            f"({format_percent(measured.max())})")
    if measured.min() <= share <= measured.max():
        return f"The seed's {format_percent(share)} lies inside the measured range, between {ends[0]} and {ends[1]}."
    side = "above" if share > measured.max() else "below"
    return f"The seed's {format_percent(share)} lies {side} every measured state (from {ends[0]} to {ends[1]})."


def seed_statistics_section(small_s: pd.DataFrame, study: dict) -> tuple[Section, str]:
    """Q3: the seed's shares of pixels below V2.3's and V2.4's eps recomputed in its units."""
    per_run = _per_run_states(small_s, study)
    table, regime = state_table(per_run), _range_sentence(per_run)
    body = ("The share of pixels whose s = gx² + gy² (raw Sobel [-1 0 1; -2 0 2; -1 0 1], zero padding: the seed's "
            "units) lies below the seed's two clamps, on the fp32 whole-image predictions of each run untrained "
            "(nnU-Net's initialisation of the same network under the run's seed), after its first epoch and at "
            "its switch-on; per run the median over its cases, then the median over seeds with their range. The "
            "seed reports " + ", ".join(f"{format_percent(v)} below {k:g}" for k, v in seed.BELOW_AT_SWITCH_ON.items())
            + f" at its switch-on ({seed.SWITCH_ON_IMAGES} images of {seed.IMAGE_SIZE}²); within a factor of "
            f"{REGIME_FACTOR:g} of its {format_percent(seed.BELOW_AT_SWITCH_ON[seed.V24.eps])} is \"the seed's "
            "regime\". The whole distribution of s is the figure at the top; every run and case is in "
            "`switch_on_s.csv`, the distribution in `s_distribution.csv`.\n\n" + markdown_table(table)
            + (f"\n\n{regime}" if regime else ""))
    return Section(f"The seed's statistics ({_seed_statistics()}) in its units", body, numbered=True), regime or ""


# ---------------------------------------------------------------------------------------------- question 4
def _replica_sweep_part(tables: StudyTables, sites: dict[str, str]) -> tuple[str, str]:
    """The replica's own clamps swept at their lines: the table, and the answer at V2.3's and V2.4's eps (fp32)."""
    table, at_bound = replica_sweep_table(tables.replica_sweep, sites)
    part = ("The replica's two sqrt clamps replaced at their lines by each eps (`clamp-sweep --loss --site`, the file "
            "untouched), on every user run's switch-on checkpoint, whole images; bias of the loss against the "
            "replica in fp64 at the smallest eps; `max_grad_logits`: largest |dL/dlogit|; `at bound`: median share "
            "of each clamp's elements held at its bound (zero gradient).\n\n" + markdown_table(table))
    rows = rows_at(table[table["precision"] == "fp32"].set_index("eps"), (seed.V23.eps, seed.V24.eps))
    answer = "The replica's clamps were not swept."
    if len(rows) == 2:
        low, high, was = rows[seed.V23.eps], rows[seed.V24.eps], format_eps(seed.V23.eps)
        held = ", ".join(f"{format_percent(high[name])} {name.split(', ')[1]} ({was}: {format_percent(low[name])})"
                         for name in at_bound)
        answer = (f"For the seed's design (fp32): {setting_label(*seed.V24.setting)} biases the loss by a median "
                  f"{format_percent(high['median_abs_loss_bias'])} ({was}: "
                  f"{format_percent(low['median_abs_loss_bias'])}), holds at its bound (zero gradient) the median "
                  f"share {held}, and sends at most {format_number(high['max_grad_logits'])} to a logit ({was}: "
                  f"{format_number(low['max_grad_logits'])}).")
    verdict = (tables.replica_summary.get(VERDICT_KEY) or {}).get("sentence")
    if verdict:  # the sweep's own verdict pools every precision: its own paragraph, its pool named
        pooled = ", ".join(sorted(tables.replica_sweep["precision"].unique()))
        part = f"The sweep's own verdict, every median and maximum pooled over {pooled}: {verdict}\n\n" + part
    return part, answer


def _production_part(tables: StudyTables) -> str:
    """geodiag's own sweep at the settings that are V2.3's and V2.4's bounds in the seed's units."""
    rows = []
    for version in seed.VERSIONS:
        frame = headline_rows(tables.headline, version.setting)
        if frame.empty:
            continue
        row = frame.iloc[0]
        rows.append({"setting": setting_label(*version.setting),
                     "median |bias P|": format_percent(row["median_abs_bias_perimeter"]),
                     "median |bias C|": format_percent(row["median_abs_bias_compactness"]),
                     "max |dL/dlogit|": row["max_grad_max"],
                     "pixels with zero gradient (median)": format_percent(row["median_frac_zero_grad"])})
    verdict = (tables.sweep_summary.get(VERDICT_KEY) or {}).get("sentence", "")
    return ("geodiag's production loss for contrast (its sweep over clamp eps on normalised s, 1/"
            f"{seed.UNITS_FACTOR:g} of the seed's s):\n\n"
            + (markdown_table(pd.DataFrame(rows)) if rows else "neither setting swept") + "\n\n" + verdict)


def replica_sweep_section(tables: StudyTables, sites: dict[str, str]) -> tuple[Section, str]:
    """Q4: is V2.4's clamp justified for the seed's design: bias and gradient at each clamp, replica and
    production."""
    parts, answer = [], "The replica's clamps were not swept."
    if tables.replica_sweep is not None and len(tables.replica_sweep):
        part, answer = _replica_sweep_part(tables, sites)
        parts.append(part)
    if tables.headline is not None and len(tables.headline):
        parts.append(_production_part(tables))
    body = "\n\n".join([answer] + parts)
    title = f"Is {setting_label(*seed.V24.setting)} justified for the seed's design?"
    return Section(title, body, numbered=True), answer


# ---------------------------------------------------------------------------------------------- question 5
def _differing(frame: pd.DataFrame) -> list[str]:
    """The columns whose values on the datasets (rows) differ by DIFFER_FACTOR or more, with their values."""
    differing = []
    for column in frame.columns:
        if column == "version":
            continue
        values = frame[column].astype(float).dropna()
        if len(values) < 2:
            continue
        low, high = values.abs().min(), values.abs().max()
        if column.endswith("share (median)") and high < INERT_SHARE:
            continue  # inert on both datasets: a ratio of noise
        if (low == 0 and high > 0) or (low > 0 and high / low >= DIFFER_FACTOR):
            differing.append(f"{column} ({', '.join(f'{d}: {format_number(v)}' for d, v in values.items())})")
    return differing


def datasets_section(tables: StudyTables, clamps: pd.DataFrame) -> Optional[tuple[Section, str]]:
    """Q5: the replica on each dataset, per version; None when it ran on fewer than two."""
    datasets = sorted({run["dataset"] for run in user_runs(tables.study)})
    if len(datasets) < 2:
        return None
    table = dataset_table(tables, clamps)
    sentences = []
    for name, frame in table.groupby("version"):
        differing = _differing(frame.set_index("dataset"))
        sentences.append(f"{name}: " + ("; ".join(differing) if differing else
                                        f"no quantity differs by {DIFFER_FACTOR:g}x or more"))
    described = " and ".join(f"{d} ({seed.DATASETS[d]})" if d in seed.DATASETS else str(d) for d in datasets)
    named = " and ".join(map(str, datasets))
    body = (f"The replica on {described} at each version. \"Differ\": a factor of at "
            f"least {DIFFER_FACTOR:g} between the datasets' values (any difference from zero); a share of the step "
            f"below {INERT_SHARE:g} on both datasets is inert on both and not compared.\n\n"
            + markdown_table(table) + "\n\n" + "\n".join(f"- {s}" for s in sentences))
    answer = f"Differing between {named}: " + "; ".join(sentences) + "."
    return Section(f"Do {named} differ for the replica?", body, numbered=True), answer
