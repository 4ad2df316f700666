"""clamp-sweep --loss --site: the user's own clamp swept at run time on a real checkpoint.

Reference: a copy of tests/seed_style_loss.py edited by hand to the swept bound (text replacement at that line),
evaluated on the same whole-image prediction with plain autograd.
"""
import json

import numpy as np
import pandas as pd
import pytest

from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.cases import find_cases, predict_logits, preprocess
from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
from geodiag.diagnostics.nonfinite.loss_spec import load_loss
from test_autotaps import LOSS_FILE, line_of

SQRT_CLAMP = "torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=self.eps))"


@pytest.fixture(scope="module")
def swept(geometric_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("site_sweep")
    checkpoint = load_checkpoint(geometric_run.final_checkpoint)
    case = find_cases(checkpoint)[0]
    code = main(["clamp-sweep", str(geometric_run.final_checkpoint), "--loss", f"{LOSS_FILE}:loss_v23",
                 "--site", f"seed_style_loss.py:{line_of(SQRT_CLAMP)}", "--eps", "1e-2,1e-4",
                 "--precision", "fp32", "--cases", case.name, "--out", str(out), "--device", "cpu"])
    assert code == 0
    return out, checkpoint, case


def _by_hand(path, checkpoint, case_files):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    patch = PlansManager(checkpoint.plans).get_configuration(checkpoint.configuration).patch_size
    case = preprocess(checkpoint, case_files)
    logits = predict_logits(build_network(checkpoint), case.image, patch).requires_grad_(True)
    value = load_loss(f"{path}:loss_v23")(logits, case.label[None])
    value.backward()
    grad = logits.grad.double()
    return float(value.detach()), float(grad.abs().max()), float(grad.square().sum().sqrt())


def test_the_swept_bound_equals_the_file_edited_by_hand(swept, tmp_path):
    out, checkpoint, case = swept
    rows = pd.read_csv(out / "site_sweep.csv")
    assert sorted(rows.eps) == [1e-4, 1e-2] and set(rows.stabilizer) == {"clamp"}
    line = line_of(SQRT_CLAMP)
    text = open(LOSS_FILE).read().splitlines()
    text[line - 1] = text[line - 1].replace("min=self.eps", "min=1e-2")
    edited = tmp_path / "seed_style_loss_edited.py"
    edited.write_text("\n".join(text) + "\n")
    for path, eps in ((edited, 1e-2), (LOSS_FILE, 1e-4)):
        loss, grad_max, grad_l2 = _by_hand(path, checkpoint, case)
        row = rows[np.isclose(rows.eps, eps)].iloc[0]
        assert row["loss"] == pytest.approx(loss, rel=1e-6)
        assert row["grad_max"] == pytest.approx(grad_max, rel=1e-6)
        assert row["grad_l2"] == pytest.approx(grad_l2, rel=1e-6)
    # the reference is the fp64 loss at the smallest value; at that value the bias is fp32 rounding only
    smallest = rows[np.isclose(rows.eps, 1e-4)].iloc[0]
    assert abs(smallest["bias_loss"]) < 1e-5
    # a larger clamp holds at least as many elements at its bound (geometry: a superset of pixels is below it)
    fractions = rows.sort_values("eps")[[c for c in rows.columns if c.startswith("at_bound_fraction[")][0]]
    assert 0 <= fractions.iloc[0] <= fractions.iloc[1] <= 1


def test_the_report_applies_the_rule_in_the_losss_own_units(swept):
    out, _, _ = swept
    markdown = (out / "report.md").read_text()
    assert "Verdict on your bound" in markdown and "in the loss's own units" in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"]["bias_column"] == "median_abs_bias_loss"
    assert summary["verdict_clamp_1e-2"]["status"] in ("justified", "not_justified")
    assert summary["eps_units"]["seed_units"] is None
    # the verdict is on the bound the file has: loss_v23 builds the loss with eps=1e-4, the clamp's min at the site
    site = f"seed_style_loss.py:{line_of(SQRT_CLAMP)}"
    assert pd.read_csv(out / "site_sweep.csv")[f"current_bound[{site}]"].eq(1e-4).all()
    verdict = summary["verdict_current_bound"]
    assert verdict["current_bound"] == 1e-4 and verdict["status"] in ("justified", "tied", "not_justified")
    assert f"your bound 1e-4 at {site}" in verdict["sentence"] and verdict["sentence"] in markdown


@pytest.mark.parametrize("site,needle", [("seed_style_loss.py:1", "sites found:"),
                                          ("seed_style_loss.py", "is not FILE:LINE")])
def test_a_bad_site_is_a_one_line_error(geometric_run, tmp_path, capsys, site, needle):
    code = main(["clamp-sweep", str(geometric_run.final_checkpoint), "--loss", f"{LOSS_FILE}:loss_v23",
                 "--site", site, "--eps", "1e-2", "--precision", "fp32", "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("geodiag")]
    assert code == 2 and len(errors) == 1 and needle in errors[0], errors


def test_loss_without_site_is_a_one_line_error(geometric_run, tmp_path, capsys):
    code = main(["clamp-sweep", str(geometric_run.final_checkpoint), "--loss", f"{LOSS_FILE}:loss_v23",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--site" in err


ONE_ARGUMENT_LOSS = '''import torch


def edge_length(pred):
    p = pred[:, 1]
    dx = p[:, :, 1:] - p[:, :, :-1]
    edge = torch.sqrt(torch.clamp(dx ** 2, min=1e-6))
    return edge.mean()
'''


def test_a_one_argument_loss_is_swept_at_its_clamp(geometric_run, tmp_path):
    (tmp_path / "edge_loss.py").write_text(ONE_ARGUMENT_LOSS)
    line = ONE_ARGUMENT_LOSS.splitlines().index("    edge = torch.sqrt(torch.clamp(dx ** 2, min=1e-6))") + 1
    checkpoint = load_checkpoint(geometric_run.final_checkpoint)
    code = main(["clamp-sweep", str(geometric_run.final_checkpoint), "--loss", f"{tmp_path / 'edge_loss.py'}:edge_length",
                 "--site", f"edge_loss.py:{line}", "--eps", "1e-6,1e-2", "--precision", "fp32",
                 "--cases", find_cases(checkpoint)[0].name, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    rows = pd.read_csv(tmp_path / "out" / "site_sweep.csv").sort_values("eps")
    fraction = rows[f"at_bound_fraction[edge_loss.py:{line}]"]
    assert fraction.iloc[0] < fraction.iloc[1] <= 1 and (rows.nonfinite_grad == 0).all()
    assert rows["loss"].iloc[1] > rows["loss"].iloc[0]  # a higher floor under every |dx| raises their mean


def test_a_precision_where_the_loss_raises_is_listed_and_left_out_of_the_rule(geometric_run, tmp_path):
    from test_own_loss_analyze import FP16_RAISING_LOSS, RAISING_LINE

    loss_file = tmp_path / "edge_dice.py"
    loss_file.write_text(FP16_RAISING_LOSS)
    line = FP16_RAISING_LOSS.splitlines().index(RAISING_LINE) + 1
    out = tmp_path / "out"
    case = find_cases(load_checkpoint(geometric_run.final_checkpoint))[0]
    code = main(["clamp-sweep", str(geometric_run.final_checkpoint), "--loss", f"{loss_file}:edge_dice",
                 "--site", f"edge_dice.py:{line}", "--eps", "1,10", "--precision", "fp32,fp16", "--cases", case.name,
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    rows = pd.read_csv(out / "site_sweep.csv")
    fp32, fp16 = rows[rows.precision == "fp32"], rows[rows.precision == "fp16"]
    assert sorted(fp32.eps) == [1, 10] and fp32["raised"].isna().all() and np.isfinite(fp32["loss"]).all()
    assert sorted(fp16.eps) == [1, 10] and fp16["loss"].isna().all()
    assert set(fp16["raised_site"]) == {f"{loss_file}:{line}"}
    assert all("c10::Half without overflow" in m for m in fp16["raised"])
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["precision"], r["eps"]) for r in summary["raised"]} == {("fp16", 1.0), ("fp16", 10.0)}
    # the rule pools the fp32 rows only
    headline = pd.read_csv(out / "headline.csv").sort_values("eps")
    assert list(headline["max_grad_max"]) == pytest.approx(list(fp32.sort_values("eps")["grad_max"]))
    markdown = (out / "report.md").read_text()
    assert "Where the loss raised" in markdown and f"edge_dice.py:{line}" in markdown and "precisions fp32." in markdown
