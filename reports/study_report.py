"""The study report: the seed's design (its loss and trainer, replayed as a user's code) beside geodiag's production
loss, and the seed's questions answered from the study's own tables.

Inputs (written by ``geodiag.diagnostics.study``): DIR/study.json (settings, runs, watch's first_nonfinite.json of
each run), DIR/runs.csv, DIR/switch_on_s.csv, DIR/term_gradients.csv, DIR/analysis/<run>/summary.json, and the
sweeps when present: DIR/sweep/ (geodiag's loss at each clamp eps) and DIR/replica_sweep/ (the replica's own
sqrt clamps replaced at their lines). Every number in the report is read or computed from those tables; the
thresholds behind words such as "inert" or "differ" are printed beside them.

Units: the seed computes s = gx^2 + gy^2 with the raw Sobel kernel and zero padding, 64x geodiag's normalised s
(2D), and its perimeter is 8x the geometric one. Shares of pixels below the seed's thresholds are compared with the
seed's in its units (switch_on_s.csv); geodiag's sweep eps act on the normalised s.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import figures
from .html import Figure, RenderedReport, Section, write_report
from .recommendation import SEED_V23, SEED_V24
from .schema import (DOMINANT_SHARE, INERT_SHARE, LOSS_PRECISION_COLUMNS, REPLICA_SWEEP_COLUMNS, RUN_COLUMNS,
                     SWEEP_COLUMNS, SWITCH_ON_S_COLUMNS, TERM_GRADIENT_COLUMNS, read_json, share_role)
from .tables import format_number, markdown_table, read_optional_table, read_table, setting_label

# The sweep's headline table (sweep/headline.csv) columns the bias section reads.
HEADLINE_COLUMNS = ("stabilizer", "eps", "median_abs_bias_perimeter", "median_abs_bias_compactness", "max_grad_max",
                    "median_frac_zero_grad")
# What the seed reports at its switch-on (8 images of 512^2, epoch 5): shares of pixels with s below each
# threshold, s in the seed's units (raw Sobel, zero padding).
SEED_BELOW = {1e-4: 0.003, 1e-2: 0.283}
# The seed's run: image side, batch size, iterations per epoch, epochs, warm-up.
SEED_RUN = {"image_size": 512, "batch_size": 8, "iterations": 250, "epochs": 100, "warmup": 5}
# The seed's s over geodiag's normalised s, inside the image (2D): the raw Sobel kernel's gain 8, squared.
SEED_UNITS_FACTOR = 64.0
# Two datasets "differ" in a quantity when the larger value is at least this factor above the smaller.
DIFFER_FACTOR = 1.5
# A share of pixels below a clamp within this factor of the seed's is "the seed's regime".
REGIME_FACTOR = 2.0


def _percent(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.3g}%"


def _number(value) -> str:
    return format_number(value)


# ----------------------------------------------------------------------------------------------- sections
def setup_section(study: dict, runs: pd.DataFrame) -> Section:
    """What ran, at which size, relative to the seed's run."""
    rows = []
    for run in study["runs"]:
        loss = run["loss"]
        if run["code"] == "user":
            what, eps = f"`{Path(loss.rsplit(':', 1)[0]).name}:{loss.rsplit(':', 1)[1]}`", None
        else:
            what, eps = (f"GeometricLoss {loss['geometric_preset']} ({loss['stabilizer']})", loss["eps"]) \
                if loss else ("GeometricLoss", None)
        frame = runs[runs["run"] == run["run"]]
        rows.append({"run": run["run"], "code": run["code"], "trainer": run["trainer"], "loss": what,
                     "GeometricLoss eps": eps, "epochs trained": len(frame), "iterations/epoch": run["iterations"],
                     "switch-on epoch": run["warmup"], "batch": run["batch_size"],
                     "patch": "×".join(str(p) for p in run["patch_size"]),
                     "under geodiag watch": run["watched"]})
    first = study["runs"][0]
    size, batch, iterations = study["image_size"], first["batch_size"], first["iterations"]
    seed = SEED_RUN
    body = (f"{study['images']} synthetic images of {size}² per dataset, nnU-Net's `2d_tiny` configuration, "
            f"{study['device']}. Relative to the seed's run ({seed['image_size']}², batch {seed['batch_size']}, "
            f"{seed['iterations']} iterations per epoch, {seed['epochs']} epochs, switch-on at epoch "
            f"{seed['warmup']}): {(seed['image_size'] / size) ** 2:.3g}x fewer pixels per image, batch {batch} "
            f"(the seed's: {seed['batch_size']}; the replica's loss sees the first "
            f"{min(batch, first.get('samples') or batch)} samples, the seed's 4), {iterations} instead of "
            f"{seed['iterations']} iterations per epoch ({seed['iterations'] * seed['warmup']} steps before the "
            f"seed's switch-on, {iterations * first['warmup']} here). Runs whose code is `user` are the seed "
            "replica: a trainer nnU-Net found through `nnUNet_extTrainer`, its loss read through `--loss`; "
            "geodiag imports nothing from it."
            + (" The CUDA regime (the seed's own size, nnU-Net's default AMP path) needs a GPU and was not run."
               if study["device"] == "cpu" else "")
            + "\n\n" + markdown_table(pd.DataFrame(rows)))
    return Section("What ran", body)


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


def _user_sites(analyses: dict[str, dict], study: dict) -> pd.DataFrame:
    """The analysed sites of the user runs' losses (every precision and pass), with the run and dataset."""
    frames = []
    for run in study["runs"]:
        summary = analyses.get(run["run"])
        if run["code"] != "user" or not summary or not summary.get("sites"):
            continue
        frame = pd.DataFrame(summary["sites"])
        frames.append(frame.assign(run=run["run"], dataset=run["dataset"],
                                   masked=len(summary.get("masked_nonfinite") or [])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _sqrt_sites(study: dict) -> dict[str, str]:
    """term -> "file.py:LINE" of the user runs' sqrt clamps (the same file for every user run)."""
    return next((run["sqrt_clamp_sites"] for run in study["runs"] if run.get("sqrt_clamp_sites")), {})


def _sqrt_clamp_rows(sites: pd.DataFrame, study: dict) -> pd.DataFrame:
    """The analysed rows of each user run's two sqrt clamps (term named)."""
    if sites.empty:
        return sites
    rows = []
    for run in study["runs"]:
        for term, site in (run.get("sqrt_clamp_sites") or {}).items():
            line = int(site.rsplit(":", 1)[1])
            mine = sites[(sites["run"] == run["run"]) & (sites["op"] == "clamp")
                         & sites["site"].map(lambda s, line=line: str(s).endswith(f":{line}"))]
            rows.append(mine.assign(term=term))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _raising(precisions: Optional[pd.DataFrame]) -> list[str]:
    """"PRECISION at SITE (ERROR) in N of M user runs" for each precision in which a user's loss raised."""
    if precisions is None or precisions.empty:
        return []
    failed = precisions[~precisions["runs"].astype(bool)]
    total = precisions["run"].nunique()
    return [f"{precision} at {site} ({error}) in {len(frame)} of {total} user runs"
            for (precision, site, error), frame in failed.groupby(["precision", "site", "error"], sort=False)]


def nonfinite_section(study: dict, runs: pd.DataFrame, gradients: pd.DataFrame, sites: pd.DataFrame,
                      precisions: Optional[pd.DataFrame]) -> tuple[Section, str]:
    """Q1: does the seed's design produce a non-finite value, and where; else the numbers that bound it."""
    lines = []
    first = _first_nonfinite_rows(study)
    watched = runs.groupby("run", sort=False)["watched_steps"].sum()
    bad_steps = runs.groupby("run", sort=False)["nonfinite_steps"].sum()
    user_runs = [r["run"] for r in study["runs"] if r["code"] == "user"]
    lines.append("Training under geodiag watch: " + ", ".join(
        f"{run} {int(bad_steps.get(run, 0) or 0)} non-finite of {int(watched.get(run, 0))} steps"
        for run in watched.index) + ".")
    if first:
        lines.append("First non-finite step per run (watch's first_nonfinite.json):\n\n"
                     + markdown_table(pd.DataFrame(first)))
    bad_gradients = gradients[(gradients["nonfinite_grad_logits"] + gradients["nonfinite_grad_network"]) > 0]
    lines.append(f"Switch-on batches (term_gradients.csv): {len(bad_gradients)} of {len(gradients)} term gradients "
                 "had a non-finite element.")
    raising = _raising(precisions)
    if raising:
        lines.append("Precisions: the user's loss raised before producing a value under nnU-Net's autocast in "
                     + "; ".join(raising) + " (loss_precisions.csv); those precisions were not analysed or swept.")
    if not sites.empty:
        per = sites.groupby(["run", "precision"], sort=False).agg(
            forward=("nonfinite_forward", "sum"), backward=("nonfinite_backward", "sum"),
            masked_calls=("masked_calls", "sum")).reset_index()
        lines.append("Analysis of the user runs' switch-on checkpoints with `--loss` (every site, training patches "
                     "and whole images), non-finite elements produced per precision (`masked_calls`: calls whose "
                     "non-finite output the loss hid from its final value):\n\n" + markdown_table(per))
        analysed_bad = int(per["forward"].sum() + per["backward"].sum())
    else:
        analysed_bad = 0
    user = gradients[gradients["run"].isin(user_runs)]
    bound_rows = []
    for run, frame in gradients.groupby("run", sort=False):
        after = runs[(runs["run"] == run) & runs["geometric_active"].astype(bool)]
        row = {"run": run, "largest step norm before clipping, after switch-on": after["grad_norm_max"].max(),
               "largest, whole run": runs.loc[runs["run"] == run, "grad_norm_max"].max()}
        for term, values in frame.groupby("term", sort=False):
            row[f"{term}: max |dL/dlogit|"] = values["max_abs_grad_logits"].max()
            row[f"{term}: max |grad θ|"] = values["grad_norm_network"].max()
        bound_rows.append(row)
    bounds = pd.DataFrame(bound_rows)
    lines.append("What bounds it: per run, the largest gradient norm clip_grad_norm_ returned (before clipping to "
                 "12; watch's per-step rows), and over the switch-on batches the largest |dL/dlogit| each term sends "
                 "to the full-resolution logits and the largest norm of what it sends to the network's weights:"
                 "\n\n" + markdown_table(bounds))
    replica_bad = int(bad_steps.reindex(user_runs).fillna(0).sum()) + len(
        bad_gradients[bad_gradients["run"].isin(user_runs)]) + analysed_bad
    if replica_bad == 0 and not any(r["run"] in user_runs for r in first):
        largest = user["max_abs_grad_logits"].max() if len(user) else math.nan
        norm = runs.loc[runs["run"].isin(user_runs), "grad_norm_max"].max()
        analysed = ", ".join(sorted(sites["precision"].unique())) if not sites.empty else "none"
        answer = (f"No: the seed's design produced no non-finite value in {int(watched.reindex(user_runs).sum())} "
                  f"watched training steps, its switch-on batches or its analysed precisions ({analysed}); its "
                  f"terms sent at most {_number(largest)} to a logit and the step's norm before clipping peaked at "
                  f"{_number(norm)}." + (f" Its loss cannot run in {'; '.join(raising)}." if raising else ""))
    else:
        where = [r for r in first if r["run"] in user_runs]
        reach = "reaches the weights' gradients"
        answer = ("Yes: " + "; ".join(f"{r['run']} at iteration {r['iteration']} ({r['phase']} {r['op']} at "
                                      f"{r['site']}, {r['dtype']}, {r['replay']}, {reach}: {r[reach]})"
                                      for r in where)
                  if where else f"Yes, in {replica_bad} measured values (see the tables).")
    body = "\n\n".join([answer] + [f"- {line}" if "\n" not in line else line for line in lines])
    return Section("Does the seed's design produce a non-finite value?", body, numbered=True), answer


def shares_section(gradients: pd.DataFrame, clamps: pd.DataFrame) -> tuple[Section, str]:
    """Q2: each term's share of the step's gradient at the switch-on, inert or dominant, and why."""
    table = gradients.groupby(["run", "term"], sort=False).agg(
        batches=("batch", "count"), value=("value", "median"), share=("share_of_step", "median"),
        norm_ratio=("norm_ratio", "median"), max_grad_logits=("max_abs_grad_logits", "max")).reset_index()
    table["role"] = table["share"].map(share_role)
    body = ("On training batches of each run's switch-on checkpoint (nnU-Net's own data loader), the gradient each "
            "term sends to the network, as a share of the step's gradient g: <g_term, g>/|g|² (the shares of "
            f"Dice+CE and the terms sum to 1; medians over batches). \"Inert\": |share| < {INERT_SHARE:g}; "
            f"\"dominant\": share > {DOMINANT_SHARE:g}. `value`: the weighted term; `norm_ratio`: |g_term|/|g|."
            "\n\n" + markdown_table(table))
    sentences = []
    for run, frame in table.groupby("run", sort=False):
        geometric = frame[frame["term"] != "dice_ce"]
        words = ", ".join(f"{t.term} {t.role} ({_number(t.share)})" for t in geometric.itertuples())
        sentences.append(f"{run}: {words}")
    if not clamps.empty:
        fp32 = clamps[clamps["precision"] == "fp32"]
        at_bound = fp32.groupby(["run", "term"], sort=False)["at_bound_fraction"].max().reset_index()
        body += ("\n\nWhy, the clamps: share of the elements each sqrt clamp of the replica held at its bound in fp32 "
                 "(they pass zero gradient), from the analysis' sites table:\n\n" + markdown_table(at_bound))
    compactness = table[(table["term"] == "compactness")]
    if len(compactness):
        body += ("\n\nWhy, the units: in the seed's units the perimeter P is a sum of raw-Sobel magnitudes, "
                 f"{SEED_UNITS_FACTOR ** 0.5:g}x the geometric perimeter, so 4πA/P² is at most "
                 f"1/{SEED_UNITS_FACTOR:g} of the geometric compactness (a disk gives 1/{SEED_UNITS_FACTOR:g}, "
                 "not 1) and the compactness term sits near 1 - 4πA/P² ≈ 1 whatever the shape; the weighted value "
                 "column shows it.")
    body += "\n\n" + "\n".join(f"- {s}" for s in sentences)
    answer = "; ".join(sentences) + "."
    return Section("What does each term contribute at the switch-on?", body, numbered=True), answer


def seed_statistics_section(small_s: pd.DataFrame, study: dict) -> tuple[Section, str]:
    """Q3: the seed's shares of pixels below 1e-4 and 1e-2 recomputed in its units."""
    seed_units = small_s[small_s["units"] == "seed"]
    warmups = {r["run"]: r["warmup"] for r in study["runs"]}
    rows = []
    for (run, checkpoint), frame in seed_units.groupby(["run", "checkpoint"], sort=False):
        row = {"run": run, "checkpoint": checkpoint, "cases": frame["case"].nunique()}
        for eps, seed in SEED_BELOW.items():
            values = frame.loc[frame["eps"] == eps, "fraction_below"]
            row[f"below {eps:g} (median)"] = values.median()
            row[f"below {eps:g} (range)"] = f"{_percent(values.min())} – {_percent(values.max())}"
        rows.append(row)
    table = pd.DataFrame(rows)
    shown = table.copy()
    for eps in SEED_BELOW:
        shown[f"below {eps:g} (median)"] = shown[f"below {eps:g} (median)"].map(_percent)
    body = ("The share of pixels whose s = gx² + gy² (raw Sobel [-1 0 1; -2 0 2; -1 0 1], zero padding: the seed's "
            "units) lies below the seed's two clamps, on the fp32 whole-image predictions of each run's first "
            "checkpoint (epoch 0, uncertain) and its switch-on checkpoint; the seed reports "
            + ", ".join(f"{_percent(v)} below {k:g}" for k, v in SEED_BELOW.items())
            + f" at its switch-on (8 images of {SEED_RUN['image_size']}²).\n\n" + markdown_table(shown))
    sentences = []
    for run, frame in table.groupby("run", sort=False):
        parts = []
        for row in frame.to_dict("records"):
            below4, below2 = row["below 0.0001 (median)"], row["below 0.01 (median)"]
            ratio = below2 / SEED_BELOW[1e-2]
            regime = ("the seed's regime" if 1 / REGIME_FACTOR <= ratio <= REGIME_FACTOR
                      else f"{_number(ratio if ratio > 1 else 1 / ratio)}x {'above' if ratio > 1 else 'below'} "
                           "the seed's")
            parts.append(f"{row['checkpoint']}: {_percent(below4)} below 1e-4, {_percent(below2)} below 1e-2 "
                         f"({regime})")
        sentences.append(f"{run} (switch-on epoch {warmups.get(run)}): " + "; ".join(parts))
    seed = SEED_BELOW[1e-2]
    measured = table.set_index(["run", "checkpoint"])["below 0.01 (median)"].dropna()
    if len(measured):
        low, high = measured.idxmin(), measured.idxmax()
        if measured.min() <= seed <= measured.max():
            regime = (f"The seed's {_percent(seed)} lies inside the measured range, between {low[0]} "
                      f"{low[1]} ({_percent(measured.min())}) and {high[0]} {high[1]} ({_percent(measured.max())}).")
        else:
            side = "above" if seed > measured.max() else "below"
            regime = (f"The seed's {_percent(seed)} lies {side} every measured checkpoint (range "
                      f"{_percent(measured.min())} at {low[0]} {low[1]} to {_percent(measured.max())} at {high[0]} "
                      f"{high[1]}).")
        sentences.append(regime)
    body += ("\n\n" + f"Words: within a factor of {REGIME_FACTOR:g} of the seed's 28.3% is \"the seed's regime\"."
             "\n\n" + "\n".join(f"- {s}" for s in sentences))
    answer = "; ".join(s for s in sentences[:-1] if "Replica" in s) + ". " + sentences[-1] if len(sentences) > 1 \
        else "; ".join(sentences)
    return Section("The seed's statistics (28.3% below 1e-2, 0.3% below 1e-4) in its units", body,
                   numbered=True), answer


def replica_sweep_section(replica_sweep: Optional[pd.DataFrame], replica_summary: dict, sweep_summary: dict,
                          headline: Optional[pd.DataFrame], sites: dict[str, str]) -> tuple[Section, str]:
    """Q4: is 1e-2 justified for the seed's design: bias and gradient at each clamp, replica and production."""
    parts, answer = [], "The replica's clamps were not swept."
    if replica_sweep is not None and len(replica_sweep):
        at_bound = {f"at bound, {term} clamp": f"at_bound_fraction[{site}]" for term, site in sites.items()
                    if f"at_bound_fraction[{site}]" in replica_sweep}
        table = replica_sweep.groupby(["eps", "precision"], sort=True).agg(
            evaluations=("case", "count"), median_abs_loss_bias=("bias_loss", lambda b: b.abs().median()),
            max_abs_loss_bias=("bias_loss", lambda b: b.abs().max()), max_grad_logits=("grad_max", "max"),
            **{name: (column, "median") for name, column in at_bound.items()},
            nonfinite=("nonfinite_grad", "sum"), masked=("masked_nonfinite", "sum")).reset_index()
        parts.append("The replica's two sqrt clamps replaced at their lines by each eps (`clamp-sweep --loss "
                     "--site`, the file untouched), on every user run's switch-on checkpoint, whole images; bias of "
                     "the loss against the replica in fp64 at the smallest eps; `max_grad_logits`: largest "
                     "|dL/dlogit|; `at bound`: median share of each clamp's elements held at its bound (zero "
                     "gradient).\n\n" + markdown_table(table))
        fp32 = table[table["precision"] == "fp32"].set_index("eps")
        rows = {eps: fp32.loc[fp32.index[np.isclose(fp32.index, eps)]].iloc[0] for eps in (1e-4, 1e-2)
                if np.isclose(fp32.index, eps).any()}
        if len(rows) == 2:
            low, high = rows[1e-4], rows[1e-2]
            held = ", ".join(f"{_percent(high[name])} {name.split(', ')[1]} (1e-4: {_percent(low[name])})"
                             for name in at_bound)
            answer = (f"For the seed's design (fp32): clamp 1e-2 biases the loss by a median "
                      f"{_percent(high['median_abs_loss_bias'])} (1e-4: {_percent(low['median_abs_loss_bias'])}), "
                      f"holds at its bound (zero gradient) the median share {held}, and sends at most "
                      f"{_number(high['max_grad_logits'])} to a logit (1e-4: {_number(low['max_grad_logits'])}).")
        verdict = (replica_summary.get("verdict_clamp_1e-2") or {}).get("sentence")
        if verdict:  # the sweep's own verdict pools every precision: say so, its medians differ from fp32's
            pooled = ", ".join(sorted(replica_sweep["precision"].unique()))
            answer += f" The sweep's verdict, its medians and maxima pooled over {pooled}: {verdict}"
    if headline is not None and len(headline):
        rows = []
        for stabilizer, eps in (SEED_V23, SEED_V24):
            frame = headline[(headline["stabilizer"] == stabilizer)
                             & np.isclose(headline["eps"], eps, rtol=1e-9, atol=0)]
            if frame.empty:
                continue
            row = frame.iloc[0]
            rows.append({"setting": setting_label(stabilizer, eps),
                         "median |bias P|": _percent(row["median_abs_bias_perimeter"]),
                         "median |bias C|": _percent(row["median_abs_bias_compactness"]),
                         "max |dL/dlogit|": row["max_grad_max"],
                         "pixels with zero gradient (median)": _percent(row["median_frac_zero_grad"])})
        verdict = (sweep_summary.get("verdict_clamp_1e-2") or {}).get("sentence", "")
        parts.append("geodiag's production loss for contrast (its sweep over clamp eps on normalised s, 1/"
                     f"{SEED_UNITS_FACTOR:g} of the seed's s):\n\n"
                     + (markdown_table(pd.DataFrame(rows)) if rows else "neither setting swept") + "\n\n" + verdict)
    body = "\n\n".join([answer] + parts)
    return Section("Is clamp 1e-2 justified for the seed's design?", body, numbered=True), answer


def datasets_section(study: dict, runs: pd.DataFrame, small_s: pd.DataFrame, gradients: pd.DataFrame,
                     clamps: pd.DataFrame) -> Optional[tuple[Section, str]]:
    """Q5: 501 vs 502 for the replica, per version."""
    user = [r for r in study["runs"] if r["code"] == "user"]
    if len({r["dataset"] for r in user}) < 2:
        return None
    version = {r["run"]: r["trainer"].rsplit("Replica", 1)[-1] for r in user}
    switch = {r["run"]: f"checkpoint_epoch_{r['warmup']:04d}.pth" for r in user}
    rows = []
    for run in version:
        dataset = next(r["dataset"] for r in user if r["run"] == run)
        s = small_s[(small_s["run"] == run) & (small_s["units"] == "seed") & (small_s["eps"] == 1e-2)
                    & (small_s["checkpoint"] == switch[run])]
        g = gradients[gradients["run"] == run]
        after = runs[(runs["run"] == run) & runs["geometric_active"].astype(bool)]
        row = {"version": version[run], "dataset": dataset,
               "pixels below 1e-2 (seed's units, median)": s["fraction_below"].median(),
               "largest step norm before clipping": after["grad_norm_max"].max(),
               "non-finite steps": after["nonfinite_steps"].sum()}
        for term, frame in g.groupby("term", sort=False):
            row[f"{term} share (median)"] = frame["share_of_step"].median()
            row[f"{term} max |dL/dlogit|"] = frame["max_abs_grad_logits"].max()
        if not clamps.empty:
            for term, frame in clamps[(clamps["run"] == run) & (clamps["precision"] == "fp32")].groupby("term"):
                row[f"{term} sqrt clamp at bound"] = frame["at_bound_fraction"].max()
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["version", "dataset"])
    sentences = []
    for name, frame in table.groupby("version"):
        frame = frame.set_index("dataset")
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
                differing.append(f"{column} ({', '.join(f'{d}: {_number(v)}' for d, v in values.items())})")
        sentences.append(f"{name}: " + ("; ".join(differing) if differing else
                                        f"no quantity differs by {DIFFER_FACTOR:g}x or more"))
    body = (f"The replica on 501 (2–5 circles) and 502 (one circle) at each version. \"Differ\": a factor of at "
            f"least {DIFFER_FACTOR:g} between the datasets' values (any difference from zero); a share of the step "
            f"below {INERT_SHARE:g} on both datasets is inert on both and not compared.\n\n"
            + markdown_table(table) + "\n\n" + "\n".join(f"- {s}" for s in sentences))
    answer = "Differing between 501 and 502: " + "; ".join(sentences) + "."
    return Section("Do 501 and 502 differ for the replica?", body, numbered=True), answer


def causes_section(study: dict, runs: pd.DataFrame, sites: pd.DataFrame, clamps: pd.DataFrame,
                   precisions: Optional[pd.DataFrame]) -> tuple[Section, str]:
    """Q6: which candidate causes of the seed's NaN remain, and what a user runs to tell them apart."""
    user_runs = [r["run"] for r in study["runs"] if r["code"] == "user"]
    fp = {}
    if not sites.empty:
        for precision, frame in sites.groupby("precision"):
            fp[precision] = int(frame["nonfinite_forward"].sum() + frame["nonfinite_backward"].sum())
    sqrt_backward = int(clamps["nonfinite_backward"].sum()) if not clamps.empty else 0
    masked = int(sites["masked_calls"].sum()) if not sites.empty else 0
    steps = int(runs.loc[runs["run"].isin(user_runs), "nonfinite_steps"].fillna(0).sum())
    low_precision = ", ".join(f"{p}: {n}" for p, n in fp.items() if p != "fp32") or "not analysed"
    rows = [
        {"candidate": "sqrt at s = 0 without a clamp (backward 0·∞ = NaN)",
         "here": f"the replica clamps both sqrt inputs; non-finite backward at its sqrt clamps: {sqrt_backward}",
         "reproduced in the tests": "tests/test_watch.py (a researcher's trainer with an unprotected sqrt)",
         "tell it apart": "`geodiag watch -- nnUNetv2_train …`: first_nonfinite.json names phase backward, op sqrt "
                          "and the line"},
        {"candidate": "fp16/bf16 overflow of pixel-unit moments or s under autocast (nnU-Net's default CUDA path)",
         "here": f"non-finite values at the replica's sites by precision ({low_precision}); "
                 + ("; ".join(f"the loss raises under {r}" for r in _raising(precisions)) or "no precision raised")
                 + "; the seed's train_step has no autocast",
         "reproduced in the tests": "tests/test_own_loss_*.py (check-bounds on fp16/bf16 inputs)",
         "tell it apart": "`geodiag analyze-checkpoint last_good.pth --loss FILE.py:NAME --precision fp32,bf16,fp16`; "
                          "`geodiag replay STEP --device cuda` (maths, precision or scaler)"},
        {"candidate": "a non-finite term hidden by NaN→0 masking, its gradient still NaN",
         "here": f"masked calls at the replica's sites: {masked}",
         "reproduced in the tests": "tests/test_autotaps.py (masked non-finite values)",
         "tell it apart": "the sites table of `analyze-checkpoint --loss` (`masked_calls`, `nonfinite_backward`)"},
        {"candidate": "one Inf gradient element turned into NaN weights by clip_grad_norm_ and SGD momentum",
         "here": f"non-finite training steps of the replica: {steps}",
         "reproduced in the tests": "tests/test_trainer.py (nnU-Net's own CPU train_step writes the NaN)",
         "tell it apart": "watch's iterations_epoch_*.csv (grad_norm, nonfinite weights/momentum) and "
                          "`--on-nonfinite skip`"},
        {"candidate": "a stale trainer copy in site-packages (the seed's warm-up 5 instead of 20)",
         "here": "not applicable: the study resolves the replica from its folder only",
         "reproduced in the tests": "tests/test_environment.py",
         "tell it apart": "`geodiag doctor --trainer NAME` (which file nnU-Net resolves, its settings)"},
    ]
    table = pd.DataFrame(rows)
    remaining = [r["candidate"] for r in rows if not r["here"].startswith("not applicable")]
    body = ("Each candidate cause of the seed's NaN, what this study measured about it, where the test suite "
            "reproduces it, and the command that tells it apart on a user's own run. None of them is excluded for "
            "the seed's own GPU run by a CPU study at this size: the study shows which of them the seed's design "
            "triggers here.\n\n" + markdown_table(table))
    answer = (f"Not reproduced here, so still open for the seed's run: {len(remaining)} candidates (see the table); "
              "`geodiag watch` on the user's run names the first non-finite op, line and phase, and its replay "
              "separates maths from precision from scaler.")
    return Section("Which causes of the seed's NaN remain, and how to tell them apart", body, numbered=True), answer


def render(directory: str | Path, title: str = "geodiag study") -> RenderedReport:
    """Write DIR/report.md and DIR/report.html (and DIR/figures/training.png) from the study's tables."""
    directory = Path(directory)
    study = read_json(directory / "study.json")
    runs = read_table(directory / "runs.csv", RUN_COLUMNS)
    small_s = read_table(directory / "switch_on_s.csv", SWITCH_ON_S_COLUMNS)
    gradients = read_table(directory / "term_gradients.csv", TERM_GRADIENT_COLUMNS)
    analyses = {p.parent.name: read_json(p) for p in sorted((directory / "analysis").glob("*/summary.json"))}
    sweep = read_optional_table(directory / "sweep" / "sweep.csv", SWEEP_COLUMNS)
    sweep_summary = read_json(directory / "sweep" / "summary.json") if sweep is not None else {}
    headline = read_optional_table(directory / "sweep" / "headline.csv", HEADLINE_COLUMNS)
    replica_sweep = read_optional_table(directory / "replica_sweep" / "site_sweep.csv", REPLICA_SWEEP_COLUMNS)
    replica_summary = read_json(directory / "replica_sweep" / "summary.json") if replica_sweep is not None else {}
    precisions = read_optional_table(directory / "loss_precisions.csv", LOSS_PRECISION_COLUMNS)
    sites = _user_sites(analyses, study)
    clamps = _sqrt_clamp_rows(sites, study)

    curves = figures.training_curves(runs, directory / "figures" / "training.png")
    answered = [nonfinite_section(study, runs, gradients, sites, precisions), shares_section(gradients, clamps),
                seed_statistics_section(small_s, study),
                replica_sweep_section(replica_sweep, replica_summary, sweep_summary, headline, _sqrt_sites(study))]
    compared = datasets_section(study, runs, small_s, gradients, clamps)
    if compared is not None:
        answered.append(compared)
    answered.append(causes_section(study, runs, sites, clamps, precisions))
    summary = "\n".join(f"{i}. {answer}" for i, (_, answer) in enumerate(answered, start=1))
    setup = setup_section(study, runs)
    setup = Section(setup.title, setup.body, figures=(Figure(
        curves, "Per run: the epoch mean of the training loss (Dice+CE plus the geometric terms once on); dashed: "
                "the switch-on epoch; a gap is a non-finite epoch."),))
    links = [f"- analysis of {name}: `analysis/{name}/report.md`" for name in analyses]
    if sweep is not None:
        links.append("- geodiag's clamp sweep: `sweep/report.md`")
    if replica_sweep is not None:
        links.append("- the replica's clamps swept at their lines: `replica_sweep/report.md`")
    sections = [Section("Answers", summary), setup] + [section for section, _ in answered]
    sections.append(Section("Details", "\n".join(links) or "No analysis or sweep was run."))
    data = [directory / name for name in ("runs.csv", "switch_on_s.csv", "term_gradients.csv", "loss_precisions.csv",
                                          "study.json")]
    return write_report(directory, title, sections, data=data)
