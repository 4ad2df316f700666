"""Seeded studies: the same seed twice gives the same numbers on the CPU, another seed other numbers, and the
report states a configuration's numbers as median and range over its seeds, a verdict the seeds disagree on as
seed-dependent."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from geodiag.diagnostics.study.definition import RunSpec, Study, seeded
from geodiag.diagnostics.study.replica import seed_replica
from geodiag.diagnostics.study.study import STEPS, run_study
from geodiag.reports import seed, study_answers, study_report, tables
from geodiag.reports.schema import share_role

CONFIGURATIONS = (RunSpec(502, "nnUNetTrainerSeedReplicaV23", epochs=2, iterations=2, warmup=1,
                          user=seed_replica(seed.V23)),
                  RunSpec(502, "nnUNetTrainerGeometric", epochs=2, iterations=2, warmup=1))
MEASURED = ("make-data", "plan", "train", "summarize", "small-s", "term-gradients")
COMPARED = ("runs.csv", "switch_on_s.csv", "term_gradients.csv")


def _study(out, seeds=(0, 1)) -> Study:
    return Study(out=out, datasets=(502,), runs=seeded(CONFIGURATIONS, seeds), num_images=8, image_size=64,
                 cases=2, term_batches=2, watch_every=2, seed=seeds[0], log=lambda message: None)


def _run(study: Study) -> Study:
    run_study(study, steps=tuple(step for step in STEPS if step.name in MEASURED))
    return study


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """The same two-seed study run in two folders (the second reuses the first's data and plans, not its runs)."""
    first = _run(_study(tmp_path_factory.mktemp("first")))
    second_out = tmp_path_factory.mktemp("second")
    for folder in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(first.out / "nnunet" / folder, second_out / "nnunet" / folder)
    return first, _run(_study(second_out))


def _numbers(out) -> dict:
    study = json.loads((out / "study.json").read_text())
    study.pop("timing")
    return {"study": study, **{name: tables.read_table(out / name) for name in COMPARED}}


def test_the_same_seed_twice_gives_the_same_numbers(twice):
    first, second = (_numbers(study.out) for study in twice)
    assert json.dumps(first.pop("study")).replace(str(twice[0].out), "") == \
        json.dumps(second.pop("study")).replace(str(twice[1].out), "")
    for name in COMPARED:
        pd.testing.assert_frame_equal(first[name], second[name], check_exact=True, obj=name)


def test_each_seed_trains_its_own_run_and_study_json_records_seeds_and_time(twice):
    out = twice[0].out
    runs = tables.read_table(out / "runs.csv")
    losses = runs.pivot_table(index=["run"], columns="epoch", values="train_loss")
    # seeds 0 and 1 of one configuration start from other weights and batches: other losses
    for configuration in ("502-ReplicaV23", "502-Production"):
        assert not np.allclose(losses.loc[f"{configuration}-seed0"], losses.loc[f"{configuration}-seed1"])
    study = json.loads((out / "study.json").read_text())
    assert study["seeds"] == [0, 1] and study["data_seed"] == 0
    assert {(r["configuration"], r["seed"]) for r in study["runs"]} == {
        (c.configuration, s) for c in CONFIGURATIONS for s in (0, 1)}
    timing = study["timing"]
    assert timing["wall_s"] >= sum(timing["steps_s"].values()) - 1 and set(timing["steps_s"]) == set(MEASURED)
    assert timing["load_min"] <= timing["load_max"] and timing["machine"]["cpus"] >= 1
    for seed_number in (0, 1):  # one nnU-Net results folder per seed
        assert (out / "nnunet" / f"nnUNet_results_seed{seed_number}").is_dir()


def test_the_report_gives_each_share_as_median_and_range_over_seeds(twice):
    out = twice[0].out
    report = study_report.render(out, "seeded").markdown.read_text()
    gradients = tables.read_table(out / "term_gradients.csv")
    for configuration in ("502-ReplicaV23", "502-Production"):
        mine = gradients[gradients.run.str.startswith(configuration + "-seed") & (gradients.term == "compactness")]
        per_seed = mine.groupby("run")["share_of_step"].median().to_numpy()
        roles = {share_role(value) for value in per_seed}
        verdict = roles.pop() if len(roles) == 1 else "seed-dependent"
        [row] = [line for line in report.splitlines() if line.startswith(f"| {configuration} | compactness | 2 |")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3:6] == [tables.format_number(float(np.median(per_seed))), tables.format_number(per_seed.min()),
                              tables.format_number(per_seed.max())], configuration
        assert cells[6].startswith(verdict), configuration


def test_spread_and_verdict_over_seeds():
    values = pd.Series([0.3, 0.05, 0.9])
    assert study_answers.spread(values) == "median 0.3, 0.05 – 0.9 over 3 seeds"
    assert study_answers.spread(pd.Series([0.25])) == "0.25"
    assert study_answers.verdict_over_seeds(pd.Series(["inert", "inert"])) == "inert"
    assert study_answers.verdict_over_seeds(pd.Series(["contributes", "dominant", "contributes"])) == \
        "seed-dependent (contributes in 2, dominant in 1 of 3 seeds)"


def test_over_seeds_groups_runs_by_their_configuration():
    from geodiag.reports.study_tables import over_seeds

    study = {"runs": [{"run": f"A-seed{n}", "configuration": "A", "seed": n} for n in range(3)]
             + [{"run": "B", "configuration": "B", "seed": 0}]}
    per_run = pd.Series({"A-seed0": 4.0, "A-seed1": 1.0, "A-seed2": 2.5, "B": 7.0})
    table = over_seeds(per_run, study).set_index("configuration")
    assert table.loc["A", ["median", "low", "high", "seeds"]].tolist() == [2.5, 1.0, 4.0, 3]
    assert table.loc["B", ["median", "low", "high", "seeds"]].tolist() == [7.0, 7.0, 7.0, 1]
