"""The clamp-sweep report: headline table, recommended setting, verdict on the seed's V2.4 clamp, and the figures
behind them.

Reads DIR/sweep.csv (required), DIR/sweep_hist.csv and DIR/settings.json (optional: the aspect formula the sweep
used and why); writes DIR/headline.csv (+ .parquet),
DIR/summary.json, DIR/figures/*.png, DIR/report.md and DIR/report.html. Every finding in the text is formatted
from the tables (see ``recommendation``); the only fixed prose says what a column or figure shows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, seed
from .html import Figure, RenderedReport, Section, write_report
from .loss_findings import sweep_findings
from .recommendation import VERDICT_TITLE, Recommendation, RecommendationRule, headline_table, recommend
from .schema import SWEEP_COLUMNS, SWEEP_HIST_COLUMNS, ReportInputError, read_json, write_json
from .screens import Answer, first_screen, hidden_answers, sweep_answers
from .tables import format_eps, markdown_table, read_optional_table, read_table, setting_label, write_table

TITLE = "geodiag clamp sweep"
# Precisions nnU-Net trains in under CUDA autocast; a sweep without them says nothing about fp16/bf16 overflow.
AUTOCAST_PRECISIONS = ("fp16", "bf16")
# The eps values the seed compared, as numbers; the epoch figure follows the fraction of pixels below them. The
# sweep's eps act on geodiag's normalised s, so these are not the seed's clamps themselves.
SEED_EPS = tuple(version.eps for version in seed.VERSIONS)
_TONES = {"justified": "ok", "not_justified": "bad", "not_measured": "warn"}
# What the sweep recorded it ran with, beside its tables (diagnostics' run record).
RUN_SETTINGS = "settings.json"


def load_sweep(directory: Path) -> pd.DataFrame:
    """sweep.csv with its schema checked and numeric columns coerced; an empty or malformed table is an error."""
    sweep = read_table(directory / "sweep.csv", SWEEP_COLUMNS)
    if sweep.empty:
        raise ReportInputError(f"{directory / 'sweep.csv'} has no rows")
    numeric = [c for c in SWEEP_COLUMNS if c not in ("checkpoint", "dataset", "geometric_active", "case",
                                                      "stabilizer", "precision")]
    for column in numeric:
        converted = pd.to_numeric(sweep[column], errors="coerce")
        if converted.isna().sum() > sweep[column].isna().sum():
            raise ReportInputError(f"{directory / 'sweep.csv'}: column {column} holds non-numeric values")
        sweep[column] = converted
    if sweep["eps"].isna().any() or (sweep["eps"] < 0).any():
        raise ReportInputError(f"{directory / 'sweep.csv'}: eps must be a number >= 0 in every row")
    sweep["precision"] = sweep["precision"].astype(str)
    sweep["stabilizer"] = sweep["stabilizer"].astype(str)
    return sweep


def _headline_for_display(candidates: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "setting": [setting_label(s, e) for s, e in zip(candidates["stabilizer"], candidates["eps"])],
        "median abs bias P (%)": 100 * candidates["median_abs_bias_perimeter"],
        "median abs bias C (%)": 100 * candidates["median_abs_bias_compactness"],
        "median abs bias A (%)": 100 * candidates["median_abs_bias_aspect"],
        "max grad_max": candidates["max_grad_max"],
        "max sqrt_deriv_max": candidates["max_sqrt_deriv_max"],
        "pixels below eps (median, %)": 100 * candidates["median_frac_below_eps"],
        "pixels with zero gradient (median, %)": 100 * candidates["median_frac_zero_grad"],
        "non-finite": candidates["nonfinite"],
        "non-finite in": candidates["nonfinite_precisions"].replace("", "–"),
        "eligible": candidates["eligible"],
    })


def _aspect_formula_line(directory: Path) -> list[str]:
    """Which aspect formula the bias of the aspect term was measured with, and why (absent without settings.json)."""
    path = directory / RUN_SETTINGS
    recorded = read_json(path) if path.exists() else {}
    if "aspect_formula" not in recorded:
        return []
    why = recorded.get("aspect_formula_why") or "why not recorded"
    return [f"- aspect formula: {recorded['aspect_formula']} ({why})"]


def _coverage(sweep: pd.DataFrame) -> tuple[str, dict]:
    precisions = sorted(sweep["precision"].unique())
    datasets = [str(d) for d in dict.fromkeys(sweep["dataset"])]
    epochs = sorted(int(e) for e in sweep["epoch"].dropna().unique())
    missing = [p for p in AUTOCAST_PRECISIONS if p not in precisions]
    active = sweep.drop_duplicates("checkpoint")["geometric_active"].astype(str).str.lower().isin(("true", "1"))
    lines = [
        f"- checkpoints: {sweep['checkpoint'].nunique()} (geometric loss active in {int(active.sum())}); "
        f"datasets: {', '.join(datasets)}; epochs: {', '.join(map(str, epochs)) or '–'}",
        f"- cases: {sweep['case'].nunique()}; settings: {len(sweep[['stabilizer', 'eps']].drop_duplicates())}; "
        f"precisions: {', '.join(precisions)}; rows: {len(sweep)}",
    ]
    if missing:
        lines.append(f"- **not measured: {', '.join(missing)}**: the rule's \"every precision\" covers only "
                     f"{', '.join(precisions)}; overflow and underflow under CUDA autocast are not tested here.")
    facts = {"precisions": precisions, "missing_autocast_precisions": missing, "datasets": datasets,
             "epochs": epochs, "checkpoints": int(sweep["checkpoint"].nunique()), "cases": int(sweep["case"].nunique()),
             "rows": int(len(sweep))}
    return "\n".join(lines), facts


def _recommendation_text(rec: Recommendation) -> str:
    lines = [f"**Rule.** {rec.rule.describe()}"]
    if rec.grad_bound is None:
        lines.append("No setting was free of non-finite values, so no bound B exists and nothing is recommended.")
        return "\n\n".join(lines)
    lines.append(f"B used: {rec.grad_bound:.3g}. Settings passing both conditions: "
                 f"{int(rec.candidates['eligible'].sum())} of {len(rec.candidates)}.")
    chosen = rec.recommended
    if chosen is None:
        lines.append("No setting passed the rule: nothing is recommended.")
    else:
        lines.append(
            f"**Recommended: {setting_label(chosen['stabilizer'], chosen['eps'])}**: median |compactness bias| "
            f"{100 * chosen['median_abs_bias_compactness']:.3g}%, median |perimeter bias| "
            f"{100 * chosen['median_abs_bias_perimeter']:.3g}%, max |dL/dlogit| {chosen['max_grad_max']:.3g}, "
            f"median zero-gradient pixels {100 * chosen['median_frac_zero_grad']:.3g}%, non-finite values "
            f"{chosen['nonfinite']}.")
    return "\n\n".join(lines)


def _per_dataset_text(sweep: pd.DataFrame, rule: RecommendationRule) -> str:
    lines = []
    for dataset, subset in sweep.groupby("dataset", sort=False):
        rec = recommend(headline_table(subset), rule)
        pick = "nothing" if rec.recommended_setting is None else setting_label(*rec.recommended_setting)
        lines.append(f"- dataset {dataset}: the rule alone on this dataset picks {pick}; "
                     f"{setting_label(*seed.V24.setting)}: "
                     f"{rec.clamp_1e2.status.replace('_', ' ')}; non-finite values in any setting: "
                     f"{int(rec.candidates['nonfinite'].sum())}")
    return "\n".join(lines)


_TRADEOFF_CAPTION = ("Each line is a stabiliser through its eps values: x = median |compactness bias| (%), y = max "
                     "|dL/dlogit|; red x: non-finite values somewhere; star: recommended.")


def _dropped_note(rec: Recommendation) -> str:
    dropped = figures.unplottable_on_log(rec.candidates["median_abs_bias_compactness"]) + \
        figures.unplottable_on_log(rec.candidates["max_grad_max"])
    return f" {dropped} value(s) zero or non-finite, not drawn on the log axes." if dropped else ""


def _figures(directory: Path, sweep: pd.DataFrame, hist: pd.DataFrame | None, rec: Recommendation) -> list[Section]:
    out = directory / "figures"
    sections = []
    eps_values = sorted(e for e in sweep["eps"].unique() if e > 0)
    if hist is not None and not hist.empty:
        path = figures.grad_mag_squared_histograms(hist, eps_values, out / "grad_mag_squared.png")
        sections.append(Section("grad_mag_squared and the eps values", figures=[Figure(
            path, "Distribution of grad_mag_squared per checkpoint: x = log10 of the bins' edges, y = fraction of the "
                  "checkpoint's binned pixels per bin (exact zeros are not in the bins); dashed: log10 of the swept "
                  "eps values. A clamp passes zero gradient to every pixel left of its line.")]))
    fraction_eps = [e for e in SEED_EPS if np.isclose(sweep["eps"], e).any()] or eps_values
    by_epoch = headline_table(sweep, by=("dataset", "epoch"))
    if by_epoch["epoch"].nunique() >= 2:  # one epoch is a column of dots, not an evolution
        sections.append(Section("Over epochs", figures=[Figure(
            figures.epoch_evolution(by_epoch, fraction_eps, out / "epochs.png"),
            f"Left: median fraction of pixels with grad_mag_squared (normalised s, 1/{seed.UNITS_FACTOR:g} of the "
            f"seed's) below eps {', '.join(map(format_eps, fraction_eps))}; right: max |dL/dlogit| per setting; one "
            "line style per dataset.")]))
    if sweep["dataset"].nunique() >= 2:
        path = figures.dataset_comparison(headline_table(sweep, by=("dataset",)), out / "datasets.png")
        sections.append(Section("Datasets compared", figures=[Figure(
            path, "Per setting and dataset: median |compactness bias| in % (left) and max |dL/dlogit| (right).")]))
    return sections


def first_screen_answers(rec: Recommendation, sweep: pd.DataFrame) -> list[Answer]:
    """The first screen's answers; a check of its own appends its line to this list."""
    return sweep_answers(rec, sweep, VERDICT_TITLE)


def _key_figure(directory: Path, rec: Recommendation) -> Figure:
    path = figures.bias_gradient_tradeoff(rec.candidates, rec.recommended_setting,
                                          directory / "figures" / "bias_vs_gradient.png")
    return Figure(path, _TRADEOFF_CAPTION + _dropped_note(rec))


def render(directory: str | Path, rule: RecommendationRule = RecommendationRule()) -> RenderedReport:
    """Render the sweep report in ``directory`` from its sweep.csv (and sweep_hist.csv when present)."""
    directory = Path(directory)
    sweep = load_sweep(directory)
    hist = read_optional_table(directory / "sweep_hist.csv", SWEEP_HIST_COLUMNS)
    rec = recommend(headline_table(sweep), rule)
    coverage, facts = _coverage(sweep)
    coverage = "\n".join([coverage, *_aspect_formula_line(directory)])
    findings, loss_facts = sweep_findings(sweep.to_dict(orient="records"), ("stabilizer", "eps"))
    tables = write_table(rec.candidates, directory / "headline.csv")
    summary = write_json(directory / "summary.json", {**rec.summary(), "coverage": facts, **loss_facts})
    sections = [
        first_screen(first_screen_answers(rec, sweep) + hidden_answers(findings, VERDICT_TITLE),
                     _key_figure(directory, rec)),
        Section(VERDICT_TITLE, "\n\n".join([*findings, rec.clamp_1e2.sentence] + ["\n".join(
            f"- {s}" for s in rec.seed_comparison)]), tone=_TONES[rec.clamp_1e2.status]),
        Section("Recommended setting", _recommendation_text(rec)),
        Section("What was measured", coverage),
        Section("Headline table", "Per setting, pooled over every checkpoint, case and precision. Bias: relative to "
                "the fp64 eps→0 reference of the same prediction. grad_max: max |dL/dlogit|. sqrt_deriv_max: the "
                "local derivative 1/(2√x) at the compactness sqrt. non-finite: NaN/Inf elements of loss and "
                "gradient.\n\n" + markdown_table(_headline_for_display(rec.candidates))),
    ]
    if sweep["dataset"].nunique() >= 2:
        sections.append(Section("Per dataset", _per_dataset_text(sweep, rule)))
    sections += _figures(directory, sweep, hist, rec)
    return write_report(directory, TITLE, sections, data=[summary, *tables])
