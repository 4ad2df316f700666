"""The study report answers the seed-design questions from its own tables: every number it states is recomputed
here from the tables written for it (medians, maxima, shares), and its words follow the printed thresholds."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from geodiag.reports import study_report
from geodiag.reports.schema import ReportInputError
from geodiag.reports.study_answers import shares_section
from geodiag.reports.schema import DOMINANT_SHARE, INERT_SHARE

REPLICA = "/somewhere/nnUNetTrainerSeedReplica.py"


def _run(name, dataset, trainer, code, first=None, loss=None, sites=None, version=None):
    return {"run": name, "dataset": dataset, "trainer": trainer, "code": code, "epochs": 3, "iterations": 4,
            "warmup": 1, "patch_size": [64, 64], "batch_size": 8, "watched": True, "samples": 4,
            "loss": loss, "sqrt_clamp_sites": sites or {}, "seed_version": version, "first_nonfinite": first}


def write_study(directory: Path, first_nonfinite: dict | None = None) -> dict:
    """Two replica runs (V2.3 on 501 and 502) and a production run on 502; the 502 replica's compactness share is
    tiny, its boundary share 0.3; the production compactness dominates; 502's replica sits in the seed's regime."""
    sites = {"compactness": "nnUNetTrainerSeedReplica.py:48", "aspect": "nnUNetTrainerSeedReplica.py:67"}
    runs = [_run("501-ReplicaV23", 501, "nnUNetTrainerSeedReplicaV23", "user", loss=f"{REPLICA}:loss_v23",
                 sites=sites, version="V2.3"),
            _run("502-ReplicaV23", 502, "nnUNetTrainerSeedReplicaV23", "user", first=first_nonfinite,
                 loss=f"{REPLICA}:loss_v23", sites=sites, version="V2.3"),
            _run("502-Production", 502, "nnUNetTrainerGeometric", "geodiag",
                 loss={"geometric_preset": "production", "stabilizer": "shifted", "eps": 1e-10})]
    (directory / "study.json").write_text(json.dumps({
        "images": 8, "image_size": 64, "datasets": [501, 502], "cases": 2, "term_batches": 2,
        "precisions": ["fp32", "fp16"], "sweep_eps": [1e-4, 1e-2], "device": "cpu", "runs": runs}))
    rows = []
    for run in runs:
        for epoch in range(3):
            rows.append({"run": run["run"], "dataset": run["dataset"], "trainer": run["trainer"], "code": run["code"],
                         "warmup": 1, "epoch": epoch, "geometric_active": epoch >= 1, "train_loss": 1.0 - 0.1 * epoch,
                         "val_loss": 0.9, "pseudo_dice": 0.5, "watched_steps": 4,
                         "grad_norm_max": {"501-ReplicaV23": 3.0, "502-ReplicaV23": 5.0}.get(run["run"], 20.0)
                         + epoch, "nonfinite_steps": 0, "skipped_steps": 0, "train_dc_ce": 0.5, "train_geometric": 0.1,
                         "train_compactness": 0.99, "train_aspect": 0.01, "train_boundary": 0.02})
    pd.DataFrame(rows).to_csv(directory / "runs.csv", index=False)
    dataset = {run["run"]: run["dataset"] for run in runs}
    shares = {("501-ReplicaV23", "checkpoint_epoch_0001.pth"): (0.0005, 0.05),
              ("502-ReplicaV23", "checkpoint_epoch_0001.pth"): (0.002, 0.25),
              ("502-Production", "checkpoint_epoch_0001.pth"): (0.01, 0.6)}
    small = [{"run": run, "dataset": dataset[run], "checkpoint": checkpoint, "case": f"c{i}", "units": "seed",
              "eps": eps, "fraction_below": value * (1 + 0.1 * i), "pixels": 4096}
             for (run, checkpoint), values in shares.items() for i in range(3) for eps, value in zip((1e-4, 1e-2), values)]
    pd.DataFrame(small).to_csv(directory / "switch_on_s.csv", index=False)
    distribution = [{"run": run, "dataset": dataset[run], "checkpoint": checkpoint, "units": "seed", "lower": lower,
                     "upper": upper, "pixels": pixels}
                    for run in dataset for checkpoint in ("untrained", "checkpoint_epoch_0000.pth",
                                                          "checkpoint_epoch_0001.pth")
                    for lower, upper, pixels in ((0.0, 0.0, 10), (1e-6, 1e-4, 500), (1e-4, 1e-2, 1500),
                                                 (1e-2, float("inf"), 10282))]
    pd.DataFrame(distribution).to_csv(directory / "s_distribution.csv", index=False)
    terms = {"501-ReplicaV23": {"dice_ce": 0.7, "compactness": 0.2, "aspect": 0.0, "boundary": 0.1},
             "502-ReplicaV23": {"dice_ce": 0.7, "compactness": 0.0004, "aspect": -0.0006, "boundary": 0.3},
             "502-Production": {"dice_ce": 0.1, "compactness": 0.9, "aspect": 0.0}}
    grads = []
    for run, by_term in terms.items():
        for batch in range(2):
            for term, share in by_term.items():
                grads.append({"run": run, "dataset": dataset[run], "checkpoint": "checkpoint_epoch_0001.pth",
                              "batch": batch, "term": term, "value": 0.1, "max_abs_grad_logits": 1e-4 * (batch + 1),
                              "grad_norm_network": 0.5 + batch, "share_of_step": share * (1 + 0.2 * batch),
                              "norm_ratio": abs(share), "step_grad_norm": 2.0, "nonfinite_grad_logits": 0,
                              "nonfinite_grad_network": 0})
    pd.DataFrame(grads).to_csv(directory / "term_gradients.csv", index=False)
    for run, at_bound in (("501-ReplicaV23", 0.001), ("502-ReplicaV23", 0.02)):
        folder = directory / "analysis" / run
        folder.mkdir(parents=True)
        site_rows = [{"precision": precision, "pass": "patches", "site": f"{REPLICA}:{line}", "op": "clamp",
                      "calls": 2, "nonfinite_forward": 0, "nonfinite_backward": 0, "masked_calls": 0,
                      "at_bound_fraction": at_bound if precision == "fp32" else 0.5, "max_abs_grad": 1.0}
                     for precision in ("fp32", "fp16") for line in (48, 67)]
        (folder / "summary.json").write_text(json.dumps({"verdict": "healthy", "verdict_reason": "finite",
                                                         "sites": site_rows, "masked_nonfinite": []}))
    return {"runs": runs}


def _section(markdown: str, title: str) -> str:
    return markdown.split(title, 1)[1].split("\n## ", 1)[0]


def test_the_answers_are_computed_from_the_tables(tmp_path):
    write_study(tmp_path)
    markdown = study_report.render(tmp_path, "study").markdown.read_text()
    nonfinite = _section(markdown, "Does the seed's design produce a non-finite value?")
    # Q1: no non-finite value; the largest |dL/dlogit| of the replica's terms (batch 1: 2e-4) and its largest
    # gradient norm before clipping (502's epoch 2: 5 + 2, after the switch-on at epoch 1; before it: 5 at epoch 0)
    assert "No: the seed's design produced no non-finite value in 24 watched training steps" in nonfinite
    assert "at most 0.0002 to a logit" in nonfinite
    assert "peaked at 7 after the switch-on (epochs 1–2) and at 5 before it (epochs 0–0)" in nonfinite
    # Q2: medians over the two batches: 0.0004 * 1.1 = 0.00044 inert; 0.3 * 1.1 = 0.33 contributes
    shares = _share_rows(markdown)
    assert shares[("502-ReplicaV23", "compactness")][:2] == ("0.00044", "inert")
    assert shares[("502-ReplicaV23", "aspect")][:2] == ("-0.00066", "inert")
    assert shares[("502-ReplicaV23", "boundary")][:2] == ("0.33", "contributes")
    assert shares[("502-Production", "compactness")][:2] == ("0.99", "dominant")
    # the single batches' range beside each median (batch 1 is x1.2), and why the medians do not add up
    assert shares[("502-ReplicaV23", "boundary")][2] == "0.3 to 0.36"
    assert "the medians need not sum to 1" in _section(markdown, "each term contribute")
    # Q3: medians over three cases (x1.1): 0.25 * 1.1 = 27.5% below 1e-2, within a factor of 2 of the seed's
    statistics = _section(markdown, "in its units")
    switch_on = "switch-on (after epoch 1, the first with the term)"
    assert f"| 502-ReplicaV23 | {switch_on} | 1 | 3 | 0.22% | 27.5% | the seed's regime |" in statistics
    assert f"| 501-ReplicaV23 | {switch_on} | 1 | 3 | 0.055% | 5.5% | 5.15x below the seed's |" in statistics
    assert (f"The seed's 28.3% lies inside the measured range, between 501-ReplicaV23 {switch_on} (5.5%) and "
            f"502-Production {switch_on} (66%).") in statistics
    # Q5: the at-bound share of the sqrt clamps (fp32 rows only) and the compactness share differ by >= 1.5x
    datasets = _section(markdown, "Do 501 and 502 differ for the replica?")
    assert "compactness sqrt clamp at bound (%) (501: 0.1, 502: 2)" in datasets
    assert "compactness share (median) (501: 0.22, 502: 0.00044)" in datasets
    assert "dice_ce share" not in datasets.split("\n- ")[-1]  # equal on both datasets: not called different
    assert "\n- V2.3: " in datasets  # the version is the run record's seed_version
    numbered = re.findall(r"^## (\d+)\. ", markdown, flags=re.M)
    assert numbered == [str(n) for n in range(1, len(numbered) + 1)] and len(numbered) == 6


def _share_rows(markdown: str) -> dict[tuple[str, str], tuple[str, ...]]:
    """The shares table of the report: (run, term) -> (median share, role, range)."""
    section = _section(markdown, "each term contribute")
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        if "term" in cells and "share" in cells:
            rows[(cells["run"], cells["term"])] = (cells["share"], cells["role"], cells.get("share, range", ""))
    return rows


def _rename(directory: Path, names: dict[str, str]) -> None:
    """Replace every run and trainer name in the study's files (and the analysis folders' names)."""
    for path in [*directory.glob("*.json"), *directory.glob("*.csv"), *directory.glob("*/*/*.json")]:
        text = path.read_text()
        for old, new in names.items():
            text = text.replace(old, new)
        path.write_text(text)
    for old, new in names.items():
        if (directory / "analysis" / old).is_dir():
            (directory / "analysis" / old).rename(directory / "analysis" / new)


def test_run_kinds_are_the_records_fields_not_the_names(tmp_path):
    """Runs and trainers renamed to names that say nothing: the replica runs are still the ones whose code is
    "user", grouped by their seed_version."""
    write_study(tmp_path)
    _rename(tmp_path, {"501-ReplicaV23": "alpha", "502-ReplicaV23": "beta", "502-Production": "gamma",
                       "nnUNetTrainerSeedReplicaV23": "TrainerOne", "nnUNetTrainerGeometric": "TrainerTwo"})
    markdown = study_report.render(tmp_path, "study").markdown.read_text()
    statistics = _section(markdown, "in its units")
    assert "\n| alpha | switch-on (after epoch 1" in statistics and "\n| beta | switch-on (after epoch 1" in statistics
    [prior] = [line for line in _section(markdown, "## In one minute").splitlines() if "Is the prior doing" in line]
    assert "At the switch-on" in prior and "Why" not in prior  # its clamps hold at most 2% at the bound
    assert "gamma" not in prior and "beta" in prior  # geodiag's run: in the sections' tables, not the replica's answer
    datasets = _section(markdown, "Do 501 and 502 differ for the replica?")
    assert "\n- V2.3: " in datasets and "compactness sqrt clamp at bound (%) (501: 0.1, 502: 2)" in datasets


def test_a_study_without_the_run_kind_fields_is_a_one_line_error(tmp_path):
    write_study(tmp_path)
    study = json.loads((tmp_path / "study.json").read_text())
    del study["runs"][1]["seed_version"]
    (tmp_path / "study.json").write_text(json.dumps(study))
    with pytest.raises(ReportInputError, match="run 502-ReplicaV23 lacks field") as raised:
        study_report.render(tmp_path, "study")
    assert "\n" not in str(raised.value)


def test_a_first_nonfinite_step_is_named_with_its_line_phase_and_replay(tmp_path):
    write_study(tmp_path, first_nonfinite={
        "iteration": 9, "epoch": 1, "phase": "backward", "op": "sqrt", "site": "nnUNetTrainerSeedReplica.py:48",
        "dtype": "float32", "replay": {"classification": "maths", "reaches_parameter_gradients": True}})
    markdown = study_report.render(tmp_path, "study").markdown.read_text()
    answer = _section(markdown, "Does the seed's design produce a non-finite value?").strip()
    assert answer.startswith("Yes: 502-ReplicaV23 at iteration 9 (backward sqrt at nnUNetTrainerSeedReplica.py:48, "
                             "float32, maths, reaches the weights' gradients: True)")
    [first] = [line for line in _section(markdown, "## In one minute").splitlines() if "NaN reproduced" in line]
    assert "Yes: 502-ReplicaV23 at iteration 9 (backward sqrt at nnUNetTrainerSeedReplica.py:48, float32)" in first


def test_shares_section_words_follow_the_printed_thresholds():
    frame = pd.DataFrame([{"run": "r", "dataset": 1, "checkpoint": "c", "batch": 0, "term": term, "value": 1.0,
                           "max_abs_grad_logits": 1.0, "grad_norm_network": 1.0, "share_of_step": share,
                           "norm_ratio": 1.0, "step_grad_norm": 1.0, "nonfinite_grad_logits": 0,
                           "nonfinite_grad_network": 0}
                          for term, share in (("a", INERT_SHARE * 0.99), ("b", INERT_SHARE),
                                              ("c", DOMINANT_SHARE * 1.01))])
    _, answer = shares_section(frame, pd.DataFrame())
    assert "a inert" in answer and "b contributes" in answer and "c dominant" in answer


def test_clamp_answer_reads_the_replica_sweep_at_1e4_and_1e2(tmp_path):
    write_study(tmp_path)
    folder = tmp_path / "replica_sweep"
    folder.mkdir()
    rows = [{"checkpoint": f"{run}-e1", "dataset": dataset, "case": f"c{i}", "precision": precision, "eps": eps,
             "loss": 1.0, "bias_loss": bias * (i + 1), "grad_max": grad * (i + 1), "frac_below_eps": below / 2,
             "at_bound_fraction[nnUNetTrainerSeedReplica.py:48]": below,
             "at_bound_fraction[nnUNetTrainerSeedReplica.py:67]": 0.0,
             "nonfinite_loss": 0, "nonfinite_grad": 0, "masked_nonfinite": 0}
            for run, dataset in (("501-ReplicaV23", 501), ("502-ReplicaV23", 502)) for i in range(3)
            for precision in ("fp32", "fp16")
            for eps, bias, grad, below in ((1e-8, 0.0, 1e-3, 0.0), (1e-4, -0.001, 1e-3, 0.01),
                                           (1e-2, 0.02, 2e-3, 0.4))]
    pd.DataFrame(rows).to_csv(folder / "site_sweep.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"verdict_clamp_1e-2": {"sentence": "VERDICT SENTENCE."}}))
    markdown = study_report.render(tmp_path, "study").markdown.read_text()
    paragraphs = _section(markdown, "justified for the seed's design?").strip().split("\n\n")
    # medians over 2 runs x 3 cases of |bias| (x1, x2, x3): 2%*2 = 4% at 1e-2, 0.2% at 1e-4; maxima of grad_max x3
    assert paragraphs[0] == ("For the seed's design (fp32): clamp 1e-2 biases the loss by a median 4% (1e-4: 0.2%), "
                             "holds at its bound (zero gradient) the median share 40% compactness clamp (1e-4: 1%), 0% "
                             "aspect clamp (1e-4: 0%), and sends at most 0.006 to a logit (1e-4: 0.003).")
    # one pool per paragraph: the sweep's own verdict pools its precisions, and says so in a paragraph of its own
    assert paragraphs[1] == "The sweep's own verdict, every median and maximum pooled over fp16, fp32: VERDICT SENTENCE."
