"""The demo pipeline end to end at a small size: data, nnU-Net training, analysis, sweep and the study report."""
import json
import math

import pandas as pd

from geodiag.diagnostics.study.demo import run_demo
from geodiag.reports import tables


def test_demo_writes_a_report_that_answers_from_its_own_tables(tmp_path):
    log = []
    report = run_demo(tmp_path, num_images=8, image_size=64, log=log.append)
    text = report.read_text()
    html = report.with_suffix(".html").read_text()
    assert "Verdict on clamp 1e-2 (normalised s)" in text and "data:image/png;base64," in html
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
    # what the report says about pixels below the seed's 1e-2 is the median of the study's seed-units shares
    small_s = tables.read_table(tmp_path / "switch_on_s.csv")
    seed_units = small_s[(small_s.units == "seed") & (small_s.eps == 1e-2) & (small_s.epoch == 2)]
    assert len(seed_units) == 4 and f"{100 * seed_units.fraction_below.median():.3g}% below 0.01" in text
    # a second run reuses everything it can
    log.clear()
    run_demo(tmp_path, num_images=8, image_size=64, log=log.append)
    assert any("reusing" in line for line in log)
