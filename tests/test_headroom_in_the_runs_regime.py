"""Headroom is said in the precision and with the scaler the run has, and carries its unit.

"Closest to trouble" of an analysis: a run without a GradScaler trained in fp32, so its headroom is against fp32's
largest value and the fp16 x 65536 headroom of nnU-Net's CUDA training is named a what-if; a run with a scaler is
held against its own scale. check-bounds' headroom column counts doublings (x2^N) and says against what.
Reference values: numpy's float32/float16 limits and logarithms computed here.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from geodiag.diagnostics.cli import main
from geodiag.reports import analysis_report
from test_reports import analysis_inputs

FP16_MAX = float(np.finfo(np.float16).max)
FP32_MAX = float(np.finfo(np.float32).max)
INITIAL_SCALE = 2.0 ** 16
PEAK = 0.131   # max |grad| of the network's parameters, as the producer records it


def _closest_text(directory, scale) -> str:
    """The Closest-to-trouble section of an analysis whose closest tensor is the network's parameter gradient."""
    analysis_inputs(directory, verdict="healthy")
    summary = json.loads((directory / "summary.json").read_text())
    limit = FP16_MAX / INITIAL_SCALE
    summary["closest_to_trouble"] = {
        "tensor": "network.parameters", "kind": "grad", "precision": "bf16",
        "quantity": f"max |grad| x {INITIAL_SCALE:g} (GradScaler) vs fp16 max {FP16_MAX:g}", "value": PEAK,
        "limit": limit, "headroom_decades": math.log10(limit / PEAK)}
    summary["state"]["grad_scaler_scale"] = scale
    (directory / "summary.json").write_text(json.dumps(summary))
    markdown = analysis_report.render(directory).markdown.read_text()
    return re.search(r"## Closest to trouble\n\n(.*?)\n## ", markdown, flags=re.S).group(1)


def test_a_run_without_a_scaler_is_held_against_fp32_and_fp16_is_a_what_if(tmp_path):
    text = _closest_text(tmp_path, None)
    own, what_if = text.split("**What-if**")
    assert "fp32 without a GradScaler" in own and "65536" not in own
    assert f"{math.log10(FP32_MAX / PEAK):.2g} decades of headroom" in own
    assert f"{FP32_MAX:.3g}" in own
    assert "GradScaler starting at 65536" in what_if
    assert f"{math.log10(FP16_MAX / (PEAK * INITIAL_SCALE)):.2g} decades of headroom" in what_if
    assert "That is less than the 1 decade this report flags" in what_if   # 0.88 decades: flagged as a what-if


def test_a_run_with_a_scaler_is_held_against_its_own_scale(tmp_path):
    text = _closest_text(tmp_path, 1024.0)
    assert "What-if" not in text and "65536" not in text and "scale 1024 " in text
    decades = math.log10(FP16_MAX / (PEAK * 1024.0))
    assert f"{decades:.2g} decades of headroom" in text and "not less than the 1 decade" in text


def test_check_bounds_prints_headroom_as_doublings_and_says_against_what(capsys, tmp_path):
    loss_file = tmp_path / "linear.py"
    loss_file.write_text("def foreground_sum(probs, target):\n    return probs[:, 1].sum()\n")
    code = main(["check-bounds", "--loss", f"{loss_file}:foreground_sum", "--cases", "uniform_half",
                 "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 0
    header, _, row = out.splitlines()[:3]
    assert "fp16 headroom" in header and "headroom " not in header.replace("fp16 headroom", "")
    # dL/dlogit = p0 p1 = 0.25 for the sum of p1 at p1 = 1/2: log2(65504 / (0.25 x 65536)) doublings
    assert f"x2^{math.log2(FP16_MAX / (0.25 * INITIAL_SCALE)):.1f}" in row.split()
    assert f"max|g| x {INITIAL_SCALE:g}" in out and f"fp16's {FP16_MAX:g}" in out and "what-if" in out

