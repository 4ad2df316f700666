"""The demo end to end at a small size: the seed replica (a user's trainer found through nnUNet_extTrainer, its
loss read through --loss) beside geodiag's production trainer, measured at the switch-on, analysed, swept, one
report that answers from its own tables."""
import json
import math
import re

from geodiag.diagnostics.study.demo import run_demo
from geodiag.reports import tables


def test_demo_puts_the_replica_beside_production_and_answers_from_its_tables(tmp_path):
    log = []
    report = run_demo(tmp_path, num_images=8, image_size=64, log=log.append)
    text = report.read_text()
    html = report.with_suffix(".html").read_text()
    assert "data:image/png;base64," in html
    # the first screen: the answers with their numbers and scope within the first 12 lines
    top = "\n".join(text.splitlines()[:12])
    assert "## In one minute" in top and "**Was the NaN reproduced?**" in top and "[the replica, 1 run;" in top
    runs = tables.read_table(tmp_path / "runs.csv")
    assert set(runs.run) == {"502-ReplicaV23", "502-Production"}
    assert set(runs.code) == {"user (--loss)", "geodiag"}
    for _, frame in runs.groupby("run"):
        assert frame.geometric_active.tolist() == [False, False, True]
        assert frame.train_loss.map(math.isfinite).all()
    study = json.loads((tmp_path / "study.json").read_text())
    replica = next(run for run in study["runs"] if run["code"] == "user")
    assert replica["loss"].endswith("nnUNetTrainerSeedReplica.py:loss_v23")
    assert set(replica["sqrt_clamp_sites"]) == {"compactness", "aspect"}
    # every term of each loss measured on the switch-on batches, shares of the step summing to 1
    gradients = tables.read_table(tmp_path / "term_gradients.csv")
    terms = gradients.groupby("run")["term"].agg(set).to_dict()
    assert terms == {"502-ReplicaV23": {"dice_ce", "compactness", "aspect", "boundary"},
                     "502-Production": {"dice_ce", "compactness", "aspect"}}
    sums = gradients.groupby(["run", "batch"])["share_of_step"].sum()
    assert (abs(sums - 1) < 1e-6).all()
    # the report's role of each term is the median share of the table
    median = gradients[(gradients.run == "502-ReplicaV23") & (gradients.term == "boundary")].share_of_step.median()
    role = "inert" if abs(median) < 0.01 else "dominant" if median > 0.5 else "contributes"
    assert re.search(rf"^\| 502-ReplicaV23 \| boundary \|[^\n]* \| {re.escape(tables.format_number(median))} \|"
                     rf"[^\n]* \| {role} \|$", text, flags=re.M)
    # and the first screen's prior answer names the largest median share of the replica's geometric terms
    replica = gradients[(gradients.run == "502-ReplicaV23") & (gradients.term != "dice_ce")]
    medians = replica.groupby("term").share_of_step.median()
    assert f"(largest {tables.format_number(medians[medians.abs().idxmax()])}, {medians.abs().idxmax()} on " in top
    # a second run reuses everything it can
    log.clear()
    run_demo(tmp_path, num_images=8, image_size=64, log=log.append)
    assert any("reusing" in line for line in log)
