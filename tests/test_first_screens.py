"""The first 12 lines of every report kind carry its verdict with numbers and units. Each report is rendered from a
copy of the committed reference's tables; the numbers expected are recomputed here from those CSVs with pandas,
independently of the renderers' aggregation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geodiag.reports import analysis_report, site_sweep_report, study_report, sweep_report

REFERENCE = Path(__file__).resolve().parents[1] / "reports" / "reference"
FIRST_SCREEN = 12


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("screens") / "reference"
    shutil.copytree(REFERENCE, copy, ignore=shutil.ignore_patterns("*.png", "report.md", "report.html"))
    return copy


def _top(path: Path) -> str:
    return "\n".join(path.read_text().splitlines()[:FIRST_SCREEN])


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def _study(tables: Path) -> dict:
    return json.loads((tables / "study.json").read_text())


def _seed0(tables: Path, name: str) -> Path:
    """An analysis folder of the seed the analysis measured (the reference analyses seed 0's runs)."""
    return tables / "analysis" / f"{name}-seed0"


def test_the_study_opens_with_the_nan_question_the_clamp_verdict_and_the_prior(tables):
    top = _top(study_report.render(tables).markdown)
    runs = pd.read_csv(tables / "runs.csv")
    replica = runs[runs["code"].str.startswith("user")]
    assert f"No: 0 non-finite of {int(replica['watched_steps'].sum())} watched training steps" in top
    size = _study(tables)["image_size"]
    assert f"{size}²" in top and "cpu" in top and "steps/run" in top  # its scope: size, device, steps
    sweep = pd.read_csv(tables / "replica_sweep" / "site_sweep.csv")
    fp32 = sweep[sweep["precision"] == "fp32"]
    bias = {eps: fp32.loc[np.isclose(fp32["eps"], eps), "bias_loss"].abs().median() for eps in (1e-4, 1e-2)}
    assert f"median |loss bias| {_percent(bias[1e-4])} → {_percent(bias[1e-2])}" in top and "fp32 rows only" in top
    shares = pd.read_csv(tables / "term_gradients.csv")
    geometric = shares[shares["run"].isin(replica["run"]) & (shares["term"] != "dice_ce")]
    medians = geometric.groupby(["run", "term"])["share_of_step"].median().abs()
    if medians.max() < 0.01:
        assert "**Is the prior doing anything?** No:" in top
    else:
        carrying = int((medians >= 0.01).sum())
        assert f"**Is the prior doing anything?** In part: {carrying} of {len(medians)} term-runs" in top
    # a cause is named only beside an inert term and a clamp holding most of its elements at the bound (fp32)
    held = max(row["at_bound_fraction"] for name in replica["run"].unique() if (tables / "analysis" / name).is_dir()
               for row in json.loads((tables / "analysis" / name / "summary.json").read_text())["sites"]
               if row["op"] == "clamp" and row["precision"] == "fp32" and row["at_bound_fraction"] is not None)
    [prior] = [line for line in top.splitlines() if "Is the prior doing anything?" in line]
    assert ("Why: at the switch-on" in prior) == (bool((medians < 0.01).any()) and held >= 0.5), prior
    assert "![" in top  # the figure follows the answers on the first screen


def test_the_sweep_opens_with_its_verdict_pooled_and_named(tables):
    top = _top(sweep_report.render(tables / "sweep").markdown)
    rows = pd.read_csv(tables / "sweep" / "sweep.csv")
    at = rows[np.isclose(rows["eps"], 1e-2)]
    assert "Not justified" in top
    assert f"its median |compactness bias| is {_percent(at['bias_compactness'].abs().median())}" in top
    assert f"max |dL/dlogit| {at['grad_max'].max():.3g}" in top and "pooled over bf16, fp16, fp32" in top


def test_the_site_sweep_opens_with_its_verdict_and_each_site_apart(tables):
    top = _top(site_sweep_report.render(tables / "replica_sweep").markdown)
    rows = pd.read_csv(tables / "replica_sweep" / "site_sweep.csv")
    fp32 = rows[(rows["precision"] == "fp32") & np.isclose(rows["eps"], 1e-2)]
    pooled_bias = rows.loc[np.isclose(rows["eps"], 1e-2), "bias_loss"].abs().median()
    # the verdict is on the user's own bound, recorded per row, against the rule's pick: each median pooled as said
    bound = rows["current_bound[nnUNetTrainerSeedReplica.py:52]"].unique()
    pick = json.loads((tables / "replica_sweep" / "summary.json").read_text())["recommended"]["eps"]
    assert len(bound) == 1 and "**Is your bound justified?** Change your bound 1e-4 at " in top
    mine, picked = (rows.loc[np.isclose(rows["eps"], eps), "bias_loss"].abs().median() for eps in (bound[0], pick))
    assert f"smaller median |loss bias|, {_percent(picked)} vs {_percent(mine)}" in top
    assert f"→ {_percent(pooled_bias)}; non-finite values" in top  # what 1e-4 -> 1e-2 changes, pooled as said
    for site in ("nnUNetTrainerSeedReplica.py:52", "nnUNetTrainerSeedReplica.py:74"):
        share = fp32[f"at_bound_fraction[{site}]"].median()
        assert f"{site}: " in top and f"{_percent(share)} at 1e-2" in top
    assert "**Which eps does the sweep's rule pick, and why?**" in top or "**Which eps does the rule pick" in top


@pytest.mark.parametrize("run", ["501-ReplicaV23", "502-Production"])
def test_the_analysis_opens_with_health_and_headroom(tables, run):
    top = _top(analysis_report.render(_seed0(tables, run)).markdown)
    assert "**Is this checkpoint healthy?** Healthy:" in top and "decades of headroom" in top
    [patch] = {tuple(r["patch_size"]) for r in _study(tables)["runs"]}
    assert f"{'×'.join(map(str, patch))} patches" in top and "cpu" in top


# ---------------------------------------------------------------------------------- contradictions (issue 23)
def test_each_maximum_of_the_step_norm_names_its_window(tables):
    text = study_report.render(tables).markdown.read_text()
    runs = pd.read_csv(tables / "runs.csv")
    replica = runs[runs["code"].str.startswith("user")]
    seeds = replica["run"].map({r["run"]: r["seed"] for r in _study(tables)["runs"]})
    active = replica["geometric_active"].astype(str).str.lower() == "true"

    def over_seeds(window) -> str:  # per seed the largest over its runs, then median and range over the seeds
        per_seed = replica[window].groupby(seeds[window])["grad_norm_max"].max()
        return (f"median {per_seed.median():.3g}, {per_seed.min():.3g} – {per_seed.max():.3g} over "
                f"{len(per_seed)} seeds")

    assert f"peaked at {over_seeds(active)} after the switch-on" in text
    assert f"at {over_seeds(~active)} before it" in text


def test_the_causes_count_matches_the_rows_of_its_table(tables):
    text = study_report.render(tables).markdown.read_text()
    section = text.split("Which causes of the seed's NaN remain")[1]
    rows = [line for line in section.split("\n\n| candidate")[1].splitlines()[2:] if line.startswith("|")]
    assert f"of the {len(rows)} candidates in the table" in section


def test_one_pool_per_paragraph_in_the_clamp_answer(tables):
    text = study_report.render(tables).markdown.read_text()
    section = text.split("Is clamp 1e-2 justified for the seed's design?")[1].split("\n## ")[0]
    for paragraph in section.split("\n\n"):
        assert not ("(fp32)" in paragraph and "pooled" in paragraph), paragraph


def test_the_site_sweep_never_pools_sites_nor_prints_missing_numbers(tables):
    text = site_sweep_report.render(tables / "replica_sweep").markdown.read_text()
    rows = pd.read_csv(tables / "replica_sweep" / "site_sweep.csv")
    assert "n/a" not in text
    pooled = rows.groupby("eps")["frac_below_eps"].median()  # the mean of the two sites' shares, per row
    for eps in (1e-4, 1e-2):
        assert _percent(pooled[eps]) not in text


def test_the_fp16_zero_gradients_are_counted_and_explained_as_underflow(tables):
    folder = _seed0(tables, "501-Production")
    top = _top(analysis_report.render(folder).markdown)
    grads = pd.read_csv(folder / "tensors.csv").query("tensor == 'logits' and kind == 'grad'").set_index("precision")
    half, single = grads.loc["fp16"], grads.loc["fp32"]
    # fp32's exact zeros plus its values below fp16's smallest subnormal (2**-24) are fp16's zeros, to 1%
    assert abs(single["zero"] + single["fp16_underflow"] - half["zero"]) < 0.01 * half["count"]
    assert f"{int(half['zero']):,} of {int(half['count']):,}" in top and f"vs {int(single['zero']):,} in fp32" in top
    assert "underflow to zero" in top and f"({2.0 ** -24:.3g})" in top
    # the question states the share it asks about, not "most"
    assert f"Why are {100 * half['zero'] / half['count']:.3g}% of the fp16 `logits` gradients exactly zero?" in top


def test_shares_of_pixels_are_percent_in_the_sweep_table_as_in_its_text(tables):
    text = sweep_report.render(tables / "sweep").markdown.read_text()
    rows = pd.read_csv(tables / "sweep" / "sweep.csv")
    zero = 100 * rows.loc[np.isclose(rows["eps"], 1e-2), "frac_zero_grad"].median()
    [row] = [line for line in text.splitlines() if line.startswith("| clamp 1e-2 |")]
    assert f" {zero:.3g} |" in row and "pixels with zero gradient (median, %)" in text
    assert f"{zero:.3g}% at clamp 1e-2" in text  # the verdict's sentence, same number, same unit


@pytest.mark.parametrize("report", ["site sweep", "study"])
def test_the_picks_reason_agrees_with_the_headline_table(tables, report):
    """A smaller eligible eps in the replica sweep's headline table means the tie-break, not ineligibility, passed
    it over: in the site sweep's first screen and in the study's, which quotes it."""
    markdown = (site_sweep_report.render(tables / "replica_sweep") if report == "site sweep"
                else study_report.render(tables, "study")).markdown
    [line] = [line for line in _top(markdown).splitlines() if "rule pick" in line]
    summary = json.loads((tables / "replica_sweep" / "summary.json").read_text())
    headline = pd.read_csv(tables / "replica_sweep" / "headline.csv")
    smaller = headline[(headline["eps"] < summary["recommended"]["eps"] * (1 - 1e-9)) & headline["eligible"]
                       & (headline["stabilizer"] == summary["recommended"]["stabilizer"])]
    if len(smaller):
        assert "by the tie-break" in line and "every smaller swept eps gave" not in line
    else:
        assert "by the tie-break" not in line
