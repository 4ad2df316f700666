"""analyze-checkpoint on a user's loss file (tests/seed_style_loss.py) and on the loss a run folder records.

References: site lines are searched in the loss file's text; at-bound fractions and host-sync counts are recounted
in numpy fp64 from the same whole-image prediction; the masked NaN comes from a 0/0 the test loss makes on any
input; the recorded loss is the one geodiag's trainer wrote into geometric_settings.json during the real run.
"""
import json
import shutil

import numpy as np
import pytest

from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.cases import find_cases, predict_logits, preprocess
from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
from geodiag.diagnostics.tools.analyze import analyze_checkpoint
from geodiag.reports import analysis_report, sites_report
from geodiag.reports.tables import read_table
from test_autotaps import LOSS_FILE, line_of, sobel_np

V23 = f"{LOSS_FILE}:loss_v23"
SQRT_CLAMP = "torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=self.eps))"
# A researcher's extra term with a 0/0 on every input: no probability exceeds 1, the band is empty.
BAND_LOSS = '''import torch


def band_loss(pred):
    p = pred[:, 1]
    band = (p > 1.0).float()          # over-confident pixels (there should be none)
    sharp = (p * band).sum() / band.sum()
    if torch.isnan(sharp).item():
        sharp = pred.sum() * 0
    return sharp + (1 - p).mean()
'''


def _rows(summary, pass_name="whole_image", precision="fp32"):
    return {(r["site"].rsplit(":", 1)[0].endswith("seed_style_loss.py") and int(r["site"].rsplit(":", 1)[1]), r["op"]): r
            for r in summary["sites"] if r["pass"] == pass_name and r["precision"] == precision}


@pytest.fixture(scope="module")
def seed_analysis(geometric_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("own_loss_analysis")
    summary = analyze_checkpoint(str(geometric_run.final_checkpoint), out, max_cases=1, loss_spec=V23)
    return out, summary


def test_the_users_sqrt_and_clamp_sites_are_named_at_their_lines(seed_analysis):
    out, summary = seed_analysis
    assert summary["loss"] == {"spec": V23, "input": "probabilities", "why": "--loss"}
    rows = _rows(summary)
    line = line_of(SQRT_CLAMP)
    assert (line, "sqrt") in rows and (line, "clamp") in rows
    assert (line_of("disc = torch.sqrt("), "sqrt") in rows
    for snippet in ("area = torch.clamp(p.sum(), 50, 1e6)", "lap = torch.clamp(lap, -10, 10)"):
        assert (line_of(snippet), "clamp") in rows
    assert rows[(line, "clamp")]["bounds"] == [[1e-4, None]]
    report = analysis_report.render(out)
    text = (out / "report.md").read_text()
    assert f"seed_style_loss.py:{line}" in text and "Sites (automatic taps)" in text
    assert any(p.name.endswith(f"seed_style_loss.py_{line}_clamp.png") for p in (out / "figures").glob("site_*"))
    assert report.html.exists()
    # the figure's data: bars are the stored bins at log10 of their edges, the clamp's min at log10(1e-4)
    bins = read_table(out / sites_report.HISTOGRAMS_FILE, sites_report.SITE_HISTOGRAM_COLUMNS)
    site_bins = bins[bins.site.str.endswith(f"seed_style_loss.py:{line}") & (bins.op == "clamp")]
    figure = sites_report.site_histogram.__wrapped__(site_bins, "s", "clamp", [[1e-4, None]], {})
    for ax, (key, panel) in zip(figure.axes, site_bins.groupby(["precision", "pass"], sort=False)):
        heights = sorted(bar.get_height() for bar in ax.patches)
        assert heights == sorted(panel["count"].astype(float))
        lefts = sorted(bar.get_x() for bar in ax.patches)
        assert np.allclose(lefts, sorted(np.log10(panel["bin_low"].clip(lower=1e-300))), atol=1e-9) or \
            panel["bin_low"].min() == 0
        assert [line.get_xdata()[0] for line in ax.lines] == [-4.0]


def _whole_image_probability(checkpoint_path):
    checkpoint = load_checkpoint(checkpoint_path)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    patch = PlansManager(checkpoint.plans).get_configuration(checkpoint.configuration).patch_size
    case = preprocess(checkpoint, find_cases(checkpoint)[0])
    logits = predict_logits(build_network(checkpoint), case.image, patch)
    x = logits.double().numpy()[0]
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return (e / e.sum(axis=0, keepdims=True))[1]


def test_at_bound_fraction_and_host_syncs_agree_with_a_numpy_recount(geometric_run, seed_analysis):
    _, summary = seed_analysis
    p = _whole_image_probability(geometric_run.final_checkpoint)
    rows = _rows(summary)
    assert rows[(line_of("if p.sum().item() < 50:"), "item")]["host_syncs"] == 1   # one image
    assert p.sum() >= 50  # the loss computed its terms on this image
    for term in ("c", "bd", "a"):
        assert rows[(line_of(f"if torch.isnan({term}).item() or torch.isinf({term}).item():"), "item")][
            "host_syncs"] == 2
    gx, gy = sobel_np(p)
    s = (gx ** 2 + gy ** 2).ravel()
    below = int((s < 1e-4).sum())
    ambiguous = int((np.abs(s / 1e-4 - 1) < 1e-2).sum())
    row = rows[(line_of(SQRT_CLAMP), "clamp")]
    assert row["elements"] == s.size
    assert abs(row["at_min_fraction"] * s.size - below) <= ambiguous
    assert row["max_abs_grad"] > 0 and row["nonfinite_backward"] == 0
    # the patches go through the network: the same site, measured there too, with the same bound
    patch_rows = _rows(summary, "patches")
    assert patch_rows[(line_of(SQRT_CLAMP), "clamp")]["calls"] >= 1


def test_an_intermediate_nan_hidden_by_a_guard_is_reported_as_masked(geometric_run, tmp_path):
    loss_file = tmp_path / "band_loss.py"
    loss_file.write_text(BAND_LOSS)
    code = main(["analyze-checkpoint", str(geometric_run.final_checkpoint), "--max-cases", "1", "--loss",
                 f"{loss_file}:band_loss", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0  # the loss and its gradient stayed finite: the guard hid the NaN
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    division = BAND_LOSS.splitlines().index("    sharp = (p * band).sum() / band.sum()") + 1
    masked = {(m["site"], m["op"], m["pass"]) for m in summary["masked_nonfinite"]}
    assert (f"{loss_file}:{division}", "div", "whole_image") in masked
    assert (f"{loss_file}:{division}", "div", "patches") in masked
    assert "Masked non-finite values" in (tmp_path / "out" / "report.md").read_text()


def test_without_loss_the_recorded_loss_is_analysed_and_said_why(geometric_run, tmp_path):
    recorded = json.loads((geometric_run.output_folder / "geometric_settings.json").read_text())
    summary = analyze_checkpoint(str(geometric_run.final_checkpoint), tmp_path / "a", max_cases=1)
    assert summary["loss"]["why"] == "recorded by the run folder's geometric_settings.json"
    assert f"stabilizer={recorded['stabilizer']!r}" in summary["loss"]["spec"]
    assert summary["settings"]["eps"] == recorded["eps"]
    # the same checkpoint away from its run folder: geodiag's trainer class preset, said so
    alone = tmp_path / "alone" / "checkpoint_final.pth"
    alone.parent.mkdir()
    shutil.copy(geometric_run.final_checkpoint, alone)
    summary = analyze_checkpoint(str(alone), tmp_path / "b", max_cases=1)
    assert "no geometric_settings.json" in summary["loss"]["why"]
    # a sites table for the built-in loss too, its lines in geodiag's loss code, beside its named taps
    assert any(r["op"] == "sqrt" and "losses" in r["site"] for r in summary["sites"])
    markdown = analysis_report.render(tmp_path / "b").markdown.read_text()
    assert "Sites (automatic taps)" in markdown and "compactness.grad_mag_squared" in markdown


def test_a_settings_file_naming_a_class_is_never_imported(geometric_run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(geometric_run.final_checkpoint, folder / "checkpoint_final.pth")
    settings = json.loads((geometric_run.output_folder / "geometric_settings.json").read_text())
    (folder / "geometric_settings.json").write_text(json.dumps({**settings, "trainer": "os:system",
                                                                "loss": "evil_module:boom"}))
    summary = analyze_checkpoint(str(folder / "checkpoint_final.pth"), tmp_path / "out", max_cases=1)
    assert summary["loss"]["spec"].startswith("GeometricLoss(")
    assert "evil_module" not in str(summary["loss"])


def test_bad_loss_spec_is_a_one_line_error(geometric_run, tmp_path, capsys):
    code = main(["analyze-checkpoint", str(geometric_run.final_checkpoint), "--loss", f"{LOSS_FILE}:no_such",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no_such" in err


NAN_LOSS = '''import torch


def confidence(pred, target):
    margin = torch.sqrt(pred[:, 1] - 0.5)   # NaN wherever the foreground is below one half
    return margin.mean()
'''


def test_a_loss_going_nan_gets_its_verdict_provenance_and_site(geometric_run, tmp_path):
    (tmp_path / "nan_loss.py").write_text(NAN_LOSS)
    summary = analyze_checkpoint(str(geometric_run.final_checkpoint), tmp_path / "out", max_cases=1,
                                 loss_spec=f"{tmp_path / 'nan_loss.py'}:confidence")
    assert summary["verdict"] == "non_finite_loss"
    line = NAN_LOSS.splitlines().index("    margin = torch.sqrt(pred[:, 1] - 0.5)   # NaN wherever the foreground "
                                       "is below one half") + 1
    row = next(r for r in summary["sites"] if r["site"] == f"{tmp_path / 'nan_loss.py'}:{line}" and r["op"] == "sqrt"
               and r["pass"] == "whole_image")
    assert row["nonfinite_forward"] > 0 and row["masked_calls"] == 0
    assert summary["provenance"] and summary["provenance"][0]["phase"] == "forward"
    assert "Sites (automatic taps)" in analysis_report.render(tmp_path / "out").markdown.read_text()


# The seed replica's pattern: a clamp whose upper bound (1e6) does not fit fp16. Its input comes from a conv2d
# (the Sobel edges), which autocast runs in fp16 whatever the softmax's dtype, so torch raises under fp16 ("value
# cannot be converted to type c10::Half without overflow") on the patches and on the whole image alike; fp32 runs.
FP16_RAISING_LOSS = '''import torch
import torch.nn.functional as F

SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_dice(pred, target):
    fg = pred[:, 1:2]
    truth = (target > 0).to(fg.dtype)
    kernel = torch.stack([SOBEL, SOBEL.T])[:, None].to(fg)
    perimeter = F.conv2d(fg, kernel, padding=1).abs().sum()
    perimeter = torch.clamp(perimeter, 10.0, 1e6)    # no division by a vanishing boundary
    dice = 2 * (fg * truth).sum() / (fg.sum() + truth.sum() + 1e-5)
    return 1 - dice + 0.01 * perimeter / perimeter.detach().mean()
'''
RAISING_LINE = "    perimeter = torch.clamp(perimeter, 10.0, 1e6)    # no division by a vanishing boundary"


def test_a_loss_raising_in_fp16_is_a_finding_and_fp32_still_runs(geometric_run, tmp_path):
    loss_file = tmp_path / "edge_dice.py"
    loss_file.write_text(FP16_RAISING_LOSS)
    line = FP16_RAISING_LOSS.splitlines().index(RAISING_LINE) + 1
    out = tmp_path / "out"
    args = ["analyze-checkpoint", str(geometric_run.final_checkpoint), "--max-cases", "1", "--precision", "fp32,fp16",
            "--loss", f"{loss_file}:edge_dice", "--out", str(out), "--device", "cpu"]
    assert main(args) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "loss_raised"
    (raised,) = summary["raised"]
    assert raised["precision"] == "fp16" and raised["site"] == f"{loss_file}:{line}"
    assert "c10::Half without overflow" in raised["message"] and raised["message"].startswith("RuntimeError")
    case = raised["case"]
    # fp32 ran and is healthy: finite loss and gradients on both passes, its sites and terms recorded
    fp32 = json.loads((out / "cases" / "fp32" / f"{case}.json").read_text())
    for name in ("patches", "whole_image"):
        assert fp32[name]["nonfinite_loss"] == 0 and fp32[name]["nonfinite_logit_grad"] == 0
    assert fp32["patches"]["network_gradients"]["nonfinite"] == 0
    assert {r["precision"] for r in summary["sites"]} == {"fp32"}
    assert any(r["site"] == f"{loss_file}:{line}" and r["op"] == "clamp" for r in summary["sites"])
    assert set(read_table(out / "terms.csv").precision) == {"fp32"}
    assert set(read_table(out / "tensors.csv").precision) == {"fp32"}
    # the raised evaluation is a stored case result: a resumed run keeps it and concludes the same
    stored = json.loads((out / "cases" / "fp16" / f"{case}.json").read_text())
    assert stored["raised"] == {"message": raised["message"], "site": raised["site"]}
    assert main(args + ["--resume"]) == 3
    assert json.loads((out / "summary.json").read_text())["raised"] == summary["raised"]
    markdown = analysis_report.render(out).markdown.read_text()
    assert "loss raised" in markdown and "Evaluations where the loss raised" in markdown
    assert f"edge_dice.py:{line}" in markdown and "c10::Half without overflow" in markdown


def test_the_studys_precision_probe_names_the_users_line_where_fp16_raises(geometric_run, tmp_path):
    from geodiag.diagnostics.study.precision_probe import probe

    loss_file = tmp_path / "edge_dice.py"
    loss_file.write_text(FP16_RAISING_LOSS)
    line = FP16_RAISING_LOSS.splitlines().index(RAISING_LINE) + 1
    fp32, fp16 = probe(geometric_run.final_checkpoint, f"{loss_file}:edge_dice", ("fp32", "fp16"))
    assert fp32 == {"precision": "fp32", "runs": True, "error": "", "site": ""}
    assert (fp16["precision"], fp16["runs"], fp16["site"]) == ("fp16", False, f"{loss_file}:{line}")
    assert fp16["error"].startswith("RuntimeError: ") and "c10::Half without overflow" in fp16["error"]


# A researcher's edge term: the sigmoid's output is clamped in place for the log, but autograd saved it for the
# sigmoid's backward, so backward raises ("modified by an inplace operation") on every input.
INPLACE_LOSS = '''import torch


def edge_bce(pred, target):
    p = torch.sigmoid(pred[:, 1])
    edges = (p[:, 1:, :] - p[:, :-1, :]).abs().mean()
    p.clamp_(1e-4, 1 - 1e-4)          # keep the log away from 0
    truth = (target[:, 0] > 0).float()
    return edges - (truth * torch.log(p) + (1 - truth) * torch.log(1 - p)).mean()
'''


def test_a_loss_raising_in_its_backward_is_a_finding_not_a_traceback(geometric_run, tmp_path, capsys):
    loss_file = tmp_path / "edge_bce.py"
    loss_file.write_text(INPLACE_LOSS)
    out = tmp_path / "out"
    args = ["analyze-checkpoint", str(geometric_run.final_checkpoint), "--max-cases", "1", "--loss",
            f"{loss_file}:edge_bce", "--out", str(out), "--device", "cpu"]
    assert main(args) == 3
    assert "Traceback" not in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "loss_raised"
    (raised,) = summary["raised"]
    assert raised["site"] == "the backward pass (autograd)"
    assert raised["message"].startswith("RuntimeError") and "inplace operation" in raised["message"]
    assert "\n" not in raised["message"]
    markdown = analysis_report.render(out).markdown.read_text()
    assert "inplace operation" in markdown
