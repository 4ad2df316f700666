"""The study report: the training runs, the seed's questions answered from the sweep and the analyses.

Inputs (written by ``geodiag.diagnostics.study``): DIR/runs.csv, DIR/switch_on_s.csv, DIR/sweep/sweep.csv with
the sweep report's DIR/sweep/summary.json and DIR/sweep/headline.csv, and DIR/analysis/*/summary.json. Every
finding is computed from those tables; the thresholds used for words such as "differ" are printed beside them.

Units: the seed computes s = gx^2 + gy^2 with the raw Sobel kernel and zero padding, 64x geodiag's normalised s
(2D). Shares of pixels below the seed's thresholds are compared with the seed's in its units (switch_on_s.csv);
the sweep's eps act on the normalised s, where the seed's clamps 1e-4 / 1e-2 are 1.6e-6 / 1.6e-4.
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
from .schema import RUN_COLUMNS, SWEEP_COLUMNS, SWITCH_ON_S_COLUMNS, read_json
from .tables import format_number, markdown_table, read_table, setting_label

# The columns of the sweep's headline table (sweep/headline.csv) that the bias section reads.
HEADLINE_COLUMNS = ("stabilizer", "eps", "median_abs_bias_perimeter", "median_abs_bias_compactness", "max_grad_max",
                    "median_frac_zero_grad")
# What the seed reports at its switch-on (8 images of 512^2, epoch 5): shares of pixels with s below each
# threshold, s in the seed's units (raw Sobel, zero padding).
SEED_BELOW = {1e-4: 0.003, 1e-2: 0.283}
# The seed's s over geodiag's normalised s, inside the image (2D): the raw Sobel kernel's gain 8, squared.
SEED_UNITS_FACTOR = 64.0
SWEEP_UNITS = (f"The sweep's eps act on geodiag's normalised s, 1/{SEED_UNITS_FACTOR:g} of the seed's: its clamp 1e-2 "
               f"is the seed's clamp {SEED_UNITS_FACTOR * 1e-2:g}, and the seed's 1e-4 / 1e-2 are "
               f"{1e-4 / SEED_UNITS_FACTOR:.2g} / {1e-2 / SEED_UNITS_FACTOR:.2g} here.")
# Two datasets "differ" in a quantity when the larger median is at least this factor above the smaller.
DIFFER_FACTOR = 1.5
# A share of pixels below the clamp this many times above or below the seed's marks a different regime.
REGIME_FACTOR = 2.0


def _percent(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.3g}%"


def _run_of(label: str) -> str:
    return label.rsplit("-e", 1)[0]


def _switch_on_rows(sweep: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Sweep rows of each run's switch-on checkpoint (the first epoch trained with the geometric term)."""
    warmup = runs.groupby("run")["warmup"].first()
    run = sweep["checkpoint"].map(_run_of)
    return sweep[sweep["epoch"] == run.map(warmup)]


def training_section(runs: pd.DataFrame) -> Section:
    rows = []
    for name, frame in runs.groupby("run", sort=False):
        nonfinite = frame[~frame["train_loss"].map(math.isfinite)]
        rows.append({"run": name, "dataset": frame["dataset"].iloc[0], "preset": frame["preset"].iloc[0],
                     "stabilizer": frame["stabilizer"].iloc[0], "eps": frame["eps"].iloc[0],
                     "switch-on epoch": frame["warmup"].iloc[0], "epochs": len(frame),
                     "non-finite epochs": len(nonfinite),
                     "first non-finite": int(nonfinite["epoch"].iloc[0]) if len(nonfinite) else None,
                     "skipped steps": int(frame["skipped_steps"].fillna(0).sum()),
                     "max grad norm": frame["grad_norm_max"].max(),
                     "final pseudo Dice": frame["pseudo_dice"].iloc[-1]})
    table = pd.DataFrame(rows)
    after = runs[runs["geometric_active"].astype(bool)].groupby("preset")["grad_norm_max"].max().sort_values()
    norms = ("Largest total gradient norm after the switch-on (what clip_grad_norm_ returned before clipping to "
             "12), per preset: " + ", ".join(f"{preset} {format_number(value)}" for preset, value in after.items())
             + ". ") if len(after) else ""
    bad = table[table["non-finite epochs"] > 0]
    text = ("No run logged a non-finite epoch loss and " if bad.empty else
            f"{len(bad)} run(s) logged non-finite epoch losses ({', '.join(bad['run'])}); ")
    text += (f"{int(table['skipped steps'].sum())} optimizer steps were skipped by the trainer's guard in all runs "
             "together.")
    return Section("Training runs", text + " " + norms + "\n\n" + markdown_table(table))


def _compared_with_seed(share: float, seed: float) -> str:
    """How a share compares with the seed's, in words fixed by ``REGIME_FACTOR``."""
    if share == 0:
        return "none, where the seed reports " + _percent(seed)
    ratio = share / seed
    if REGIME_FACTOR ** -1 <= ratio <= REGIME_FACTOR:
        return f"within a factor of {REGIME_FACTOR:g} of the seed's {_percent(seed)}"
    return f"{format_number(ratio if ratio > 1 else 1 / ratio)}x {'more' if ratio > 1 else 'less'} than the seed's " \
           f"{_percent(seed)}"


def switch_on_section(small_s: pd.DataFrame) -> Section:
    """Q1: the share of pixels with s below the seed's 1e-4 and 1e-2 at switch-on, in the seed's units."""
    seed_units = small_s[small_s["units"] == "seed"]
    rows, sentences = [], []
    for dataset, frame in seed_units.groupby("dataset"):
        row = {"dataset": dataset, "runs × cases": int(frame[["run", "case"]].drop_duplicates().shape[0])}
        words = []
        for eps, seed in SEED_BELOW.items():
            values = frame.loc[frame["eps"] == eps, "fraction_below"]
            median = values.median() if len(values) else math.nan
            row[f"below {eps:g} (median)"] = _percent(median)
            row[f"below {eps:g} (range)"] = (f"{_percent(values.min())} – {_percent(values.max())}"
                                            if len(values) else "–")
            row[f"seed: below {eps:g}"] = _percent(seed)
            if not math.isnan(median):
                words.append(f"{_percent(median)} below {eps:g} ({_compared_with_seed(median, seed)})")
        rows.append(row)
        if words:
            sentences.append(f"Dataset {dataset}: " + "; ".join(words) + ".")
    body = ("The share of pixels whose squared Sobel magnitude s = gx² + gy² lies below the seed's two clamps, on "
            "the fp32 predictions of each run's switch-on checkpoint, with s in the seed's units (raw Sobel kernel "
            f"[-1 0 1; -2 0 2; -1 0 1], zero padding; geodiag's normalised s is 1/{SEED_UNITS_FACTOR:g} of it), "
            "next to what the seed reports at its own switch-on. Medians over runs and cases. Words compare the "
            f"medians with the seed's shares: \"within a factor of {REGIME_FACTOR:g}\" or the factor itself.\n\n"
            + (markdown_table(pd.DataFrame(rows)) if rows else "No switch-on checkpoint was measured."))
    if sentences:
        body += "\n\n" + "\n".join(f"- {sentence}" for sentence in sentences)
    return Section("How many pixels sit below the clamp at switch-on?", body, numbered=True)


def nan_section(runs: pd.DataFrame, sweep: pd.DataFrame, analyses: dict[str, dict],
                analysis_tensors: dict[str, pd.DataFrame]) -> Section:
    """Q2: whether NaN occurs, at which op and why."""
    lines = []
    bad_runs = runs[~runs["train_loss"].map(math.isfinite)].groupby("run")["epoch"].min()
    lines.append("Training: " + ("no run produced a non-finite epoch loss." if bad_runs.empty else
                                 "; ".join(f"{run} first at epoch {epoch}" for run, epoch in bad_runs.items()) + "."))
    nonfinite = sweep[(sweep["nonfinite_loss"] > 0) | (sweep["nonfinite_grad"] > 0)]
    if nonfinite.empty:
        lines.append(f"Sweep: all {len(sweep)} evaluations (every setting, precision and case) had a finite loss and "
                     "gradient.")
    else:
        where = nonfinite.groupby(["stabilizer", "eps", "precision"]).size()
        lines.append("Sweep: non-finite loss or gradient in " + "; ".join(
            f"{s} {e:g} {p} ({n} cases)" for (s, e, p), n in where.items()) + ".")
    for name, summary in analyses.items():
        settings = summary.get("settings", {})
        text = (f"Analysis of {name} ({settings.get('stabilizer')} eps {settings.get('eps'):g}): verdict "
                f"**{summary['verdict']}** — {summary['verdict_reason']}.")
        s_stats = analysis_tensors.get(name)
        if s_stats is not None and len(s_stats):
            zeros, count, low = int(s_stats["zero"].sum()), int(s_stats["count"].sum()), s_stats["min"].min()
            text += (f" Its s = gx² + gy² had {zeros} exact zeros among {count} pixel evaluations (smallest "
                     f"{format_number(low)}): a bare sqrt fails only where s is exactly 0 (0 × ∞ in backward).")
        for report in summary.get("provenance", [])[:2]:
            text += f" Provenance ({report.get('precision')}, {report.get('case')}): {report.get('message')}"
        lines.append(text)
    if not analyses:
        lines.append("No checkpoint was analysed (no run went non-finite and none was chosen).")
    return Section("Does NaN occur, at which op, and why?", "\n\n".join(f"- {line}" for line in lines),
                   numbered=True)


def datasets_section(switch_on: pd.DataFrame, small_s: pd.DataFrame, runs: pd.DataFrame) -> Optional[Section]:
    """Q3: whether 501 and 502 differ, and in what."""
    if switch_on["dataset"].nunique() < 2:
        return None
    fp32 = switch_on[switch_on["precision"] == "fp32"]
    seed_units = small_s[small_s["units"] == "seed"]
    quantities = {
        "pixels below 1e-2 (seed's units)": seed_units[seed_units["eps"] == 1e-2].groupby("dataset")[
            "fraction_below"].median(),
        "max |dL/dlogit|, clamp 1e-4": fp32[(fp32["stabilizer"] == "clamp") & (fp32["eps"] == 1e-4)].groupby(
            "dataset")["grad_max"].max(),
        "|compactness bias|, clamp 1e-2": fp32[(fp32["stabilizer"] == "clamp") & (fp32["eps"] == 1e-2)].assign(
            b=lambda f: f["bias_compactness"].abs()).groupby("dataset")["b"].median(),
        "non-finite evaluations": switch_on.assign(
            n=lambda f: (f["nonfinite_loss"] + f["nonfinite_grad"] > 0).astype(int)).groupby("dataset")["n"].sum(),
        "non-finite training epochs": runs.assign(n=lambda f: (~f["train_loss"].map(math.isfinite)).astype(int))
        .groupby("dataset")["n"].sum(),
    }
    table = pd.DataFrame(quantities).T
    table.columns = [str(c) for c in table.columns]
    sentences = []
    for name, values in quantities.items():
        values = values.dropna()
        if len(values) < 2:
            continue
        low, high = values.min(), values.max()
        if name.startswith("non-finite"):
            differ = high != low
        else:
            differ = low == 0 and high > 0 or (low > 0 and high / low >= DIFFER_FACTOR)
        sentences.append(f"{name}: {'differ' if differ else 'do not differ materially'} "
                         f"({', '.join(f'{d}: {format_number(v)}' for d, v in values.items())})")
    clamp2 = fp32[(fp32["stabilizer"] == "clamp") & (fp32["eps"] == 1e-2)]
    bias = clamp2.assign(b=lambda f: f["bias_perimeter"].abs()).groupby("dataset")["b"].median()
    perimeter = clamp2.groupby("dataset")["ref_perimeter"].median()
    if len(bias) == 2 and bias.min() > 0 and perimeter.min() > 0:
        (d1, d2) = bias.index
        bias_ratio, perimeter_ratio = bias[d2] / bias[d1], perimeter[d1] / perimeter[d2]
        if max(bias_ratio, perimeter_ratio) / min(bias_ratio, perimeter_ratio) <= DIFFER_FACTOR:
            sentences.append(
                f"why: the relative perimeter bias of clamp 1e-2 is {format_number(bias_ratio)}x larger on {d2} and "
                f"its true perimeter {format_number(perimeter_ratio)}x smaller: the clamp adds about the same phantom "
                "perimeter (√eps per flat pixel) to both, a larger share of fewer circles")
    body = (f"Medians over the switch-on checkpoints' cases (fp32). \"Differ\" means a factor of at least "
            f"{DIFFER_FACTOR:g} between datasets (any difference for counts of non-finite values).\n\n"
            + markdown_table(table.reset_index().rename(columns={"index": "quantity"}))
            + "\n\n" + "\n".join(f"- {s}" for s in sentences))
    return Section("Do datasets 501 (2–5 circles) and 502 (one circle) differ?", body, numbered=True)


def bias_section(sweep_summary: dict, headline: pd.DataFrame) -> Section:
    """Q4: what 1e-2 costs in bias: the sweep's headline rows, the same rows its verdict on clamp 1e-2 quotes."""
    recommended = sweep_summary.get("recommended") or {}
    named = [("", SEED_V23), ("", SEED_V24)]
    if recommended:
        named.append(("recommended: ", (recommended.get("stabilizer"), recommended.get("eps"))))
    rows = []
    for prefix, (stabilizer, eps) in named:
        frame = headline[(headline["stabilizer"] == stabilizer) & np.isclose(headline["eps"], eps, rtol=1e-9, atol=0)]
        if frame.empty:
            continue
        row = frame.iloc[0]
        rows.append({"setting": prefix + setting_label(stabilizer, eps),
                     "median |bias P|": _percent(row["median_abs_bias_perimeter"]),
                     "median |bias C|": _percent(row["median_abs_bias_compactness"]),
                     "max |dL/dlogit|": row["max_grad_max"],
                     "pixels with zero gradient (median)": _percent(row["median_frac_zero_grad"])})
    verdict = (sweep_summary.get("verdict_clamp_1e-2") or {}).get("sentence", "")
    body = ("Biases are relative to the fp64 eps→0 reference of the same prediction; medians and maxima pool every "
            "swept checkpoint, case and precision (the sweep's headline table, whose rows the verdict quotes). "
            + SWEEP_UNITS + "\n\n" + (markdown_table(pd.DataFrame(rows)) if rows else "Neither setting was swept.")
            + "\n\n" + verdict)
    return Section("What does clamp 1e-2 (normalised s) cost in bias?", body, numbered=True)


def render(directory: str | Path, title: str = "geodiag study") -> RenderedReport:
    """Write DIR/report.md and DIR/report.html (and DIR/figures/training.png) from the study's tables."""
    directory = Path(directory)
    runs = read_table(directory / "runs.csv", RUN_COLUMNS)
    sweep = read_table(directory / "sweep" / "sweep.csv", SWEEP_COLUMNS)
    sweep_summary = read_json(directory / "sweep" / "summary.json")
    headline = read_table(directory / "sweep" / "headline.csv", HEADLINE_COLUMNS)
    analyses = {p.parent.name: read_json(p) for p in sorted((directory / "analysis").glob("*/summary.json"))}
    analysis_tensors = {}
    for name in analyses:
        tensors = read_table(directory / "analysis" / name / "tensors.csv", ("tensor", "kind", "zero", "count", "min"))
        analysis_tensors[name] = tensors[(tensors["tensor"] == "compactness.grad_mag_squared")
                                         & (tensors["kind"] == "value")]
    small_s = read_table(directory / "switch_on_s.csv", SWITCH_ON_S_COLUMNS)
    switch_on = _switch_on_rows(sweep, runs)
    judged = sweep_summary.get("verdict_clamp_1e-2") or {}
    verdict = judged.get("sentence", "The sweep gave no verdict.")
    tone = {"justified": "ok", "not_justified": "bad"}.get(judged.get("status"), "warn")
    curves = figures.training_curves(runs, directory / "figures" / "training.png")
    sections = [Section("Verdict on clamp 1e-2 (normalised s)", verdict + " " + SWEEP_UNITS, tone=tone),
                training_section(runs)]
    sections[-1] = Section(sections[-1].title, sections[-1].body, figures=(Figure(
        curves, "Per run: the epoch mean of the training loss (Dice+CE plus the geometric terms once on); dashed: "
                "the switch-on epoch; a gap is a non-finite epoch."),))
    sections += [switch_on_section(small_s), nan_section(runs, sweep, analyses, analysis_tensors)]
    compared = datasets_section(switch_on, small_s, runs)
    if compared is not None:
        sections.append(compared)
    sections.append(bias_section(sweep_summary, headline))
    links = ["- clamp sweep (every setting, precision and checkpoint): `sweep/report.md`"]
    links += [f"- analysis of {name}: `analysis/{name}/report.md`" for name in analyses]
    sections.append(Section("Details", "\n".join(links)))
    return write_report(directory, title, sections, data=[directory / "runs.csv", directory / "switch_on_s.csv"])
