"""The demo pipeline end to end at a small size: data, nnU-Net training, analysis, sweep and the study report."""
import json
import math

import pandas as pd

from geodiag.diagnostics.demo import run_demo
from geodiag.reports import tables


def test_demo_writes_a_report_that_answers_from_its_own_tables(tmp_path):
    log = []
    report = run_demo(tmp_path, num_images=8, image_size=64, log=log.append)
    text = report.read_text()
    html = report.with_suffix(".html").read_text()
    assert "Verdict on the seed's clamp 1e-2" in text and "data:image/png;base64," in html
    runs = tables.read_table(tmp_path / "runs.csv")
    assert runs.geometric_active.tolist() == [False, False, True, True, True, True]
    assert runs[runs.geometric_active].train_geometric.map(math.isfinite).all()
    assert runs[~runs.geometric_active].train_geometric.isna().all()
    sweep = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert set(sweep.epoch) == {1, 2, 3} and set(sweep.precision) == {"fp32", "bf16", "fp16"}
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    verdict = summary["verdict_clamp_1e-2"]
    assert verdict["sentence"] in text
    assert json.loads((tmp_path / "analysis" / "502-Quick-epoch2" / "summary.json").read_text())["verdict"]
    # what the report says about pixels below 1e-2 is the sweep's own median
    switch_on = sweep[(sweep.epoch == 2) & (sweep.stabilizer == "clamp") & (sweep.eps == 1e-2)
                      & (sweep.precision == "fp32")]
    assert f"{100 * switch_on.frac_below_eps.median():.3g}%" in text
    # a second run reuses everything it can
    log.clear()
    run_demo(tmp_path, num_images=8, image_size=64, log=log.append)
    assert any("reusing" in line for line in log)
