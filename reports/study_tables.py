"""The study's tables, read and aggregated for its report: which runs are the seed replica and at which version, the
analysed sites of their sqrt clamps, each term's share of the step, the shares of small s, the replica sweep and
the per-dataset comparison. Numbers only; ``study_answers`` and ``study_causes`` put them into words.

Run kinds are fields of the run records in study.json: ``code`` ("user" for the seed replica, geodiag's code
otherwise), ``seed_version`` (the replica's version, see ``seed.VERSIONS``) and ``dataset``; a run's name is only
a label. A configuration (dataset and trainer) run with several seeds has one record per seed, with its
``configuration`` and ``seed``; ``over_seeds`` aggregates a per-run number into its median and range over seeds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from . import seed
from .schema import (LOSS_PRECISION_COLUMNS, REPLICA_SWEEP_COLUMNS, RUN_COLUMNS, S_DISTRIBUTION_COLUMNS,
                     STUDY_RUN_FIELDS, SWEEP_COLUMNS, SWITCH_ON_S_COLUMNS, TERM_GRADIENT_COLUMNS, ReportInputError,
                     UNTRAINED, read_json, share_role)
from .tables import format_eps, format_percent, read_optional_table, read_table

# The sweep's headline table (sweep/headline.csv) columns the bias section reads.
HEADLINE_COLUMNS = ("stabilizer", "eps", "median_abs_bias_perimeter", "median_abs_bias_compactness", "max_grad_max",
                    "median_frac_zero_grad")


@dataclass(frozen=True)
class StudyTables:
    """Everything the study report reads from DIR; the sweeps and the precision probe are optional (None)."""

    study: dict
    runs: pd.DataFrame
    small_s: pd.DataFrame
    s_distribution: pd.DataFrame
    gradients: pd.DataFrame
    analyses: dict[str, dict]
    sweep: Optional[pd.DataFrame]
    sweep_summary: dict
    headline: Optional[pd.DataFrame]
    replica_sweep: Optional[pd.DataFrame]
    replica_summary: dict
    precisions: Optional[pd.DataFrame]

    @classmethod
    def read(cls, directory: Path) -> "StudyTables":
        sweep = read_optional_table(directory / "sweep" / "sweep.csv", SWEEP_COLUMNS)
        replica_sweep = read_optional_table(directory / "replica_sweep" / "site_sweep.csv", REPLICA_SWEEP_COLUMNS)
        return cls(
            study=read_study(directory / "study.json"),
            runs=read_table(directory / "runs.csv", RUN_COLUMNS),
            small_s=read_table(directory / "switch_on_s.csv", SWITCH_ON_S_COLUMNS),
            s_distribution=read_table(directory / "s_distribution.csv", S_DISTRIBUTION_COLUMNS),
            gradients=read_table(directory / "term_gradients.csv", TERM_GRADIENT_COLUMNS),
            analyses={p.parent.name: read_json(p) for p in sorted((directory / "analysis").glob("*/summary.json"))},
            sweep=sweep, sweep_summary=read_json(directory / "sweep" / "summary.json") if sweep is not None else {},
            headline=read_optional_table(directory / "sweep" / "headline.csv", HEADLINE_COLUMNS),
            replica_sweep=replica_sweep,
            replica_summary=(read_json(directory / "replica_sweep" / "summary.json")
                             if replica_sweep is not None else {}),
            precisions=read_optional_table(directory / "loss_precisions.csv", LOSS_PRECISION_COLUMNS))


def read_study(path: Path) -> dict:
    """study.json, each run record checked for the fields the report reads (``schema.STUDY_RUN_FIELDS``)."""
    study = read_json(path)
    runs = study.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ReportInputError(f"{path} lists no runs")
    for index, run in enumerate(runs):
        missing = [field for field in STUDY_RUN_FIELDS if not isinstance(run, dict) or field not in run]
        if missing:
            name = run.get("run", f"#{index + 1}") if isinstance(run, dict) else f"#{index + 1}"
            raise ReportInputError(f"{path}: run {name} lacks field(s) {', '.join(missing)} (a study written by an "
                                   "older geodiag: run the study again)")
    return study


# ------------------------------------------------------------------------------------------------ run kinds
def user_runs(study: dict) -> list[dict]:
    """The run records whose trainer and loss are a user's code: the seed replica."""
    return [run for run in study["runs"] if run["code"] == "user"]


def user_run_names(study: dict) -> list[str]:
    return [run["run"] for run in user_runs(study)]


# ----------------------------------------------------------------------------------------------------- seeds
def run_configurations(study: dict) -> dict[str, str]:
    """run -> its configuration (a study written without seeds: the run itself)."""
    return {run["run"]: run.get("configuration", run["run"]) for run in study["runs"]}


def run_seeds(study: dict) -> dict[str, Optional[int]]:
    """run -> the seed it trained with (None for a study written without seeds)."""
    return {run["run"]: run.get("seed") for run in study["runs"]}


def over_seeds(per_run: pd.Series, study: dict) -> pd.DataFrame:
    """From one number per run (indexed by run): per configuration, the median, smallest and largest over its
    seeds and how many seeds gave one."""
    frame = pd.DataFrame({"configuration": per_run.index.map(run_configurations(study)),
                          "value": per_run.to_numpy(dtype=float)}).dropna()
    return frame.groupby("configuration", sort=False)["value"].agg(
        median="median", low="min", high="max", seeds="count").reset_index()


def switch_on_checkpoint(run: dict) -> str:
    """The file name of a run's first checkpoint trained with the geometric term."""
    return f"checkpoint_epoch_{run['warmup']:04d}.pth"


def state_label(checkpoint: str, run: dict) -> str:
    """What a measured checkpoint of a run is, in words: untrained, after epoch E, or the switch-on (epoch E)."""
    if checkpoint == UNTRAINED:
        return "untrained"
    if checkpoint == switch_on_checkpoint(run):
        return f"switch-on (after epoch {run['warmup']}, the first with the term)"
    epoch = re.fullmatch(r"checkpoint_epoch_(\d+)\.pth", checkpoint)
    return f"after epoch {int(epoch.group(1))}" if epoch else checkpoint


# ------------------------------------------------------------------------------------- the replica's clamps
def user_sites(analyses: dict[str, dict], study: dict) -> pd.DataFrame:
    """The analysed sites of the user runs' losses (every precision and pass), with the run and dataset."""
    frames = []
    for run in user_runs(study):
        summary = analyses.get(run["run"])
        if not summary or not summary.get("sites"):
            continue
        frame = pd.DataFrame(summary["sites"])
        frames.append(frame.assign(run=run["run"], dataset=run["dataset"],
                                   masked=len(summary.get("masked_nonfinite") or [])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def sqrt_sites(study: dict) -> dict[str, str]:
    """term -> "file.py:LINE" of the user runs' sqrt clamps (the same file for every user run)."""
    return next((run["sqrt_clamp_sites"] for run in study["runs"] if run.get("sqrt_clamp_sites")), {})


def sqrt_clamp_rows(sites: pd.DataFrame, study: dict) -> pd.DataFrame:
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


def clamp_at_bound(clamps: pd.DataFrame) -> pd.DataFrame:
    """Per run and term, the largest share of its sqrt clamp's elements held at the bound in fp32."""
    fp32 = clamps[clamps["precision"] == "fp32"]
    return fp32.groupby(["run", "term"], sort=False)["at_bound_fraction"].max().reset_index()


# -------------------------------------------------------------------------------------------- aggregates
def nonfinite_per_precision(sites: pd.DataFrame) -> pd.DataFrame:
    """Per user run and precision, the non-finite elements its sites produced and the calls that masked one."""
    return sites.groupby(["run", "precision"], sort=False).agg(
        forward=("nonfinite_forward", "sum"), backward=("nonfinite_backward", "sum"),
        masked_calls=("masked_calls", "sum")).reset_index()


STEP_NORM_AFTER = "largest step norm before clipping, after switch-on"


def gradient_bounds(runs: pd.DataFrame, gradients: pd.DataFrame) -> pd.DataFrame:
    """Per run: the largest step norm before clipping (after the switch-on, and over the run), and per term the
    largest |dL/dlogit| and network-gradient norm over the switch-on batches."""
    rows = []
    for run, frame in gradients.groupby("run", sort=False):
        after = runs[(runs["run"] == run) & runs["geometric_active"].astype(bool)]
        row = {"run": run, STEP_NORM_AFTER: after["grad_norm_max"].max(),
               "largest, whole run": runs.loc[runs["run"] == run, "grad_norm_max"].max()}
        for term, values in frame.groupby("term", sort=False):
            row[f"{term}: max |dL/dlogit|"] = values["max_abs_grad_logits"].max()
            row[f"{term}: max |grad θ|"] = values["grad_norm_network"].max()
        rows.append(row)
    return pd.DataFrame(rows)


def term_shares(gradients: pd.DataFrame) -> pd.DataFrame:
    """Per run and term over the switch-on batches: median value, share of the step and norm ratio, largest
    |dL/dlogit|, and the role the share gives it (inert, contributes, dominant)."""
    table = gradients.groupby(["run", "term"], sort=False).agg(
        batches=("batch", "count"), value=("value", "median"), share=("share_of_step", "median"),
        norm_ratio=("norm_ratio", "median"), max_grad_logits=("max_abs_grad_logits", "max")).reset_index()
    table["role"] = table["share"].map(share_role)
    return table


def below_median_column(eps: float) -> str:
    return f"below {eps:g} (median)"


def below_range_column(eps: float) -> str:
    return f"below {eps:g} (range)"


def seed_unit_shares(small_s: pd.DataFrame) -> pd.DataFrame:
    """Per run and checkpoint, over cases: the median share of pixels whose s (the seed's units) lies below each
    version's eps, and the range of the shares (formatted)."""
    rows = []
    for (run, checkpoint), frame in small_s[small_s["units"] == "seed"].groupby(["run", "checkpoint"], sort=False):
        row = {"run": run, "checkpoint": checkpoint, "cases": frame["case"].nunique()}
        for eps in seed.BELOW_AT_SWITCH_ON:
            values = frame.loc[frame["eps"] == eps, "fraction_below"]
            row[below_median_column(eps)] = values.median()
            row[below_range_column(eps)] = f"{format_percent(values.min())} – {format_percent(values.max())}"
        rows.append(row)
    return pd.DataFrame(rows)


def replica_sweep_table(replica_sweep: pd.DataFrame, sites: dict[str, str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """Per eps and precision over the replica sweep's rows: evaluations, median and largest |loss bias|, largest
    |dL/dlogit|, each sqrt clamp's median at-bound share and the non-finite counts; with the at-bound columns'
    names (column name -> the sweep's column)."""
    at_bound = {f"at bound, {term} clamp": f"at_bound_fraction[{site}]" for term, site in sites.items()
                if f"at_bound_fraction[{site}]" in replica_sweep}
    table = replica_sweep.groupby(["eps", "precision"], sort=True).agg(
        evaluations=("case", "count"), median_abs_loss_bias=("bias_loss", lambda b: b.abs().median()),
        max_abs_loss_bias=("bias_loss", lambda b: b.abs().max()), max_grad_logits=("grad_max", "max"),
        **{name: (column, "median") for name, column in at_bound.items()},
        nonfinite=("nonfinite_grad", "sum"), masked=("masked_nonfinite", "sum")).reset_index()
    return table, at_bound


def rows_at(table: pd.DataFrame, eps_values: tuple[float, ...]) -> dict[float, pd.Series]:
    """The row of ``table`` (indexed by eps) at each of ``eps_values`` that it holds, matched to rounding."""
    return {eps: table.loc[table.index[np.isclose(table.index, eps)]].iloc[0] for eps in eps_values
            if np.isclose(table.index, eps).any()}


def headline_rows(headline: pd.DataFrame, setting: tuple[str, float]) -> pd.DataFrame:
    return headline[(headline["stabilizer"] == setting[0])
                    & np.isclose(headline["eps"], setting[1], rtol=1e-9, atol=0)]


def dataset_table(tables: StudyTables, clamps: pd.DataFrame) -> pd.DataFrame:
    """Per replica configuration (its version and dataset; the median over its seeds): the median share of pixels
    below V2.4's eps at the switch-on, the largest step norm after it, the non-finite steps, and per term the median
    share of the step, the largest |dL/dlogit| and its sqrt clamp's at-bound share in fp32."""
    rows = []
    for run in user_runs(tables.study):
        name = run["run"]
        small_s, gradients, runs = tables.small_s, tables.gradients, tables.runs
        s = small_s[(small_s["run"] == name) & (small_s["units"] == "seed") & (small_s["eps"] == seed.V24.eps)
                    & (small_s["checkpoint"] == switch_on_checkpoint(run))]
        after = runs[(runs["run"] == name) & runs["geometric_active"].astype(bool)]
        row = {"version": run["seed_version"], "dataset": run["dataset"],
               f"pixels below {format_eps(seed.V24.eps)} (seed's units, median, %)": 100 * s["fraction_below"].median(),
               "largest step norm before clipping": after["grad_norm_max"].max(),
               "non-finite steps": after["nonfinite_steps"].sum()}
        for term, frame in gradients[gradients["run"] == name].groupby("term", sort=False):
            row[f"{term} share (median)"] = frame["share_of_step"].median()
            row[f"{term} max |dL/dlogit|"] = frame["max_abs_grad_logits"].max()
        if not clamps.empty:
            for term, frame in clamps[(clamps["run"] == name) & (clamps["precision"] == "fp32")].groupby("term"):
                row[f"{term} sqrt clamp at bound (%)"] = 100 * frame["at_bound_fraction"].max()
        rows.append(row)
    # a configuration's seeds: their median (several seeds of one dataset are no difference between datasets)
    return pd.DataFrame(rows).groupby(["version", "dataset"], sort=True).median().reset_index()


def timing_sentence(study: dict) -> str:
    """The study's measured wall time, load and machine, when the study recorded them (study.json's timing)."""
    timing = study.get("timing") or {}
    if not timing.get("wall_s"):
        return ""
    minutes, seconds = divmod(round(timing["wall_s"]), 60)
    machine = timing.get("machine") or {}
    where = f"a {machine['cpus']}-core {machine['cpu']}" if machine.get("cpu") else ""
    load = [timing[key] for key in ("load_min", "load_max") if timing.get(key) is not None]
    return (f" `geodiag reference-report` ran {minutes} min {seconds} s" + (f" on {where}" if where else "")
            + (f" under a load average of {min(load):g}–{max(load):g} (sampled between steps)" if load else "")
            + ".")


def analysed_seeds(study: dict) -> Optional[str]:
    """"seed 0 only (of 3)" when the analysis and the sweeps measured fewer seeds than the training ran; else None."""
    seeds, analysed = study.get("seeds") or [], study.get("analysed_seeds") or []
    if len(seeds) > 1 and analysed and len(analysed) < len(seeds):
        return f"seed {', '.join(map(str, analysed))} only (of {len(seeds)})"
    return None


def seeds_sentence(study: dict) -> str:
    """Which seeds trained, which were analysed and swept, and what the study reduced to fit its time budget."""
    seeds = study.get("seeds") or []
    if len(seeds) < 2:
        return ""
    analysed = analysed_seeds(study)
    reductions = study.get("reductions") or []
    return (f" Every configuration trained from seeds {', '.join(map(str, seeds))}"
            + (f"; the analysis and the sweeps measured {analysed}" if analysed else "") + "."
            + (f" Reduced to fit the time budget: {'; '.join(reductions)}." if reductions else ""))
