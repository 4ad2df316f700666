"""A site sweep's verdict is about the user's own bound: the value their file has at the swept line, read at run
time, against the rule's pick; the tie tolerance is stated in the unit of the table beside it (percent) and the
tie-break says why it prefers what it prefers.

Reference values: the bound is the literal written in the loss file below; biases and derivative bounds are
computed here from the table's own numbers (percentages, 1/(2 sqrt(eps))).
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from geodiag.diagnostics.nonfinite.loss_spec import load_loss
from geodiag.diagnostics.nonfinite.override import BoundOverride
from geodiag.reports import site_sweep_report
from geodiag.reports.recommendation import RecommendationRule

SITE = "my_geo_loss.py:24"

# A researcher's loss: the perimeter through a clamped sqrt (their eps in the constructor), and an aspect-like
# term through sqrt(x + c) with the constant written in the line.
MY_GEO_LOSS = '''import torch
import torch.nn.functional as F


class MyGeoLoss(torch.nn.Module):
    def __init__(self, eps=1e-4):
        super().__init__()
        self.eps = eps

    def forward(self, probs, target):
        fg = probs[:, 1:2]
        gx = fg[..., :, 1:] - fg[..., :, :-1]
        gy = fg[..., 1:, :] - fg[..., :-1, :]
        edge = torch.sqrt(torch.clamp(gx[..., 1:, :] ** 2 + gy[..., :, 1:] ** 2, min=self.eps))
        spread = torch.sqrt(fg.var(dim=(-2, -1)) + 1e-6)
        try:
            return edge.mean() + 0.1 * spread.mean()
        except RuntimeError:
            return probs.sum() * 0
'''


def _line(snippet: str) -> int:
    return next(i for i, text in enumerate(MY_GEO_LOSS.splitlines(), start=1) if snippet in text)


def test_the_bound_each_call_was_made_with_is_recorded_at_its_site(tmp_path):
    (tmp_path / "my_geo_loss.py").write_text(MY_GEO_LOSS)
    loss = load_loss(f"{tmp_path / 'my_geo_loss.py'}:MyGeoLoss")
    clamp, additive = f"my_geo_loss.py:{_line('min=self.eps')}", f"my_geo_loss.py:{_line('+ 1e-6')}"
    probs = torch.softmax(torch.randn(2, 2, 16, 16), dim=1)
    override = BoundOverride({clamp: 1e-2, additive: 1e-3})
    with override:
        loss(probs, torch.zeros(2, 1, 16, 16))
    assert override.current == {clamp: {1e-4}, additive: {1e-6}}   # the constructor's default and the literal


def _rows(biases: dict, current="0.0001", at_bound=None, nonfinite=None, grad_max=None) -> pd.DataFrame:
    """site_sweep.csv as the sweep writes it: 2 cases x fp32, per eps the given median |loss bias|."""
    rows = []
    for eps, bias in biases.items():
        for case in ("a", "b"):
            row = dict(checkpoint="final", case=case, precision="fp32", sites=SITE, eps=eps, ref_eps=min(biases),
                       loss=1.0 + bias, ref_loss=1.0, bias_loss=bias, grad_max=(grad_max or {}).get(eps, 0.02),
                       grad_l2=0.5, sqrt_deriv_max=0.5 / math.sqrt(eps), frac_below_eps=(at_bound or {}).get(eps, 0.4),
                       nonfinite_loss=0, nonfinite_grad=(nonfinite or {}).get(eps, 0), masked_nonfinite=0,
                       stabilizer="clamp", **{f"at_bound_fraction[{SITE}]": (at_bound or {}).get(eps, 0.4)})
            if current is not None:
                row[site_sweep_report.CURRENT_BOUND.format(site=SITE)] = current
            rows.append(row)
    return pd.DataFrame(rows)


def _render(tmp_path, frame: pd.DataFrame) -> tuple[dict, str]:
    frame.to_csv(tmp_path / site_sweep_report.ROWS_FILE, index=False)
    report = site_sweep_report.render(tmp_path)
    return json.loads((tmp_path / "summary.json").read_text()), report.markdown.read_text()


# The issue's sweep: --eps 1e-4,1e-3,1e-2 of a clamp whose biases are 0.00134%, 0.005% and 0.00932%.
ISSUE_BIASES = {1e-4: 0.0000134, 1e-3: 0.00005, 1e-2: 0.0000932}


def test_the_verdict_is_on_the_users_bound_and_the_tie_break_says_why(tmp_path):
    summary, markdown = _render(tmp_path, _rows(ISSUE_BIASES, current="0.0001",
                                                at_bound={1e-4: 0.30, 1e-3: 0.35, 1e-2: 0.41}))
    verdict = summary[site_sweep_report.VERDICT_KEY]
    assert verdict["current_bound"] == 1e-4 and verdict["status"] == "tied"
    assert summary["recommended"]["eps"] == 1e-2   # 0.00932% - 0.00134% = 0.008 points < 0.01: a tie
    assert "Verdict on your bound" in markdown and "Verdict on clamp 1e-2" not in markdown
    assert "the seed's" not in markdown.split("## Recommended value")[0]
    sentence = verdict["sentence"]
    assert f"your bound 1e-4 at {SITE}" in sentence.lower()
    assert "0.00134%" in sentence and "0.00932%" in sentence and "0.01 percentage points" in sentence
    # why the larger eps: the derivative bound 1/(2 sqrt(eps)) at each, and what it costs in held elements
    assert f"{0.5 / math.sqrt(1e-2):.3g} instead of {0.5 / math.sqrt(1e-4):.3g}" in sentence
    tie_break = summary["tie_break"]
    assert "The tie-break decided: clamp 1e-4 has the smallest median |loss bias|, 0.00134%" in tie_break
    assert "41% vs 30%" in tie_break and tie_break in markdown


def test_the_rule_states_its_tolerance_in_the_tables_unit_and_its_reason():
    text = RecommendationRule().describe()
    assert "0.01 percentage points" in text and "within 0.0001 " not in text
    assert "1/(2√eps)" in text and "headroom" in text
    assert "0.5 percentage points" in RecommendationRule(tie_tolerance=0.005).describe()


def test_keep_a_bound_the_rule_picks_and_change_one_a_smaller_bias_beats(tmp_path):
    for name in ("picked", "biased"):
        (tmp_path / name).mkdir()
    summary, _ = _render(tmp_path / "picked", _rows(ISSUE_BIASES, current="0.01"))
    verdict = summary[site_sweep_report.VERDICT_KEY]
    assert verdict["status"] == "justified" and verdict["sentence"].startswith(f"Keep your bound 1e-2 at {SITE}")
    assert "0.00134%" in verdict["sentence"]   # the tie that decided is said, with the smaller bias it beat
    summary, _ = _render(tmp_path / "biased", _rows({1e-6: 0.0001, 1e-4: 0.004, 1e-2: 0.03}, current="0.01"))
    verdict = summary[site_sweep_report.VERDICT_KEY]
    assert verdict["status"] == "not_justified"
    assert verdict["sentence"].startswith(f"Change your bound 1e-2 at {SITE} to clamp 1e-6")
    assert "0.01%" in verdict["sentence"] and "3%" in verdict["sentence"]


def test_a_bound_that_fails_the_rule_is_changed_for_the_failure_named(tmp_path):
    summary, _ = _render(tmp_path, _rows({1e-6: 0.0001, 1e-2: 0.03}, current="1e-06", nonfinite={1e-6: 3}))
    verdict = summary[site_sweep_report.VERDICT_KEY]
    assert verdict["status"] == "not_justified" and "Change your bound 1e-6" in verdict["sentence"]
    assert "6 non-finite values (precisions: fp32)" in verdict["sentence"]   # 3 in each of 2 cases


@pytest.mark.parametrize("current, needle", [
    ("0.003", "was not swept (1e-4, 1e-3, 1e-2)"),
    (None, "do not record the bound your file has"),
    ("0.0001;0.001", "different bounds"),
])
def test_a_bound_the_sweep_cannot_judge_is_not_measured_and_says_why(tmp_path, current, needle):
    summary, markdown = _render(tmp_path, _rows(ISSUE_BIASES, current=current))
    verdict = summary[site_sweep_report.VERDICT_KEY]
    assert verdict["status"] == "not_measured" and needle in verdict["sentence"]
    assert "clamp 1e-2" in verdict["sentence"]   # the rule's pick is still named
