"""Mistakes caught, not silently measured: a user's loss that stays finite and is still wrong.

A researcher's compactness loss applies its own softmax to what it receives, so analysed without
``--loss-input logits`` it normalises nnU-Net's probabilities a second time; and in fp16 its perimeter squared
overflows, which its formula turns into a compactness of 0, so the loss is its weight on every case while an
isnan guard sits there unused. Both are named on the first screen (report and console) and in summary.json of the
analysis, and the constant and the masked overflow on the first screen of the sweep; the same loss called with
``--loss-input logits``, and in fp32 where it varies from case to case, raises no such alarm.

References: lines are searched in the loss's text; the loss is recomputed per case in numpy fp64 from the
whole-image prediction (its fp32 values differ between the two cases; its perimeter P exceeds 256, so P^2 exceeds
fp16's largest value 65504, 4 pi A / P^2 is 0 and the loss is its weight, 0.1 in fp32).
"""
import contextlib
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.cases import find_cases, predict_logits, preprocess
from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
from geodiag.diagnostics.nonfinite.autotaps import AutoTaps
from geodiag.diagnostics.nonfinite.given_input import _LISTENING
from geodiag.diagnostics.nonfinite.loss_spec import as_user_loss, load_loss
from geodiag.diagnostics.tools.own_loss import trainer_call
from geodiag.reports import loss_findings, sweep_report
from geodiag.reports.schema import FP16_MAX
from test_autotaps import sobel_np
from test_recommendation import sweep_rows

GEO_LOSS = '''import math

import torch
import torch.nn.functional as F
from torch import nn


class CompactnessLoss(nn.Module):
    """1 - 4 pi A / P^2 of the predicted foreground (a disc scores lowest), weighted."""

    def __init__(self, weight=0.1, eps=1e-4):
        super().__init__()
        self.weight, self.eps = weight, eps
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernel", torch.stack([sobel, sobel.T])[:, None])

    def forward(self, net_output, target):
        probs = torch.softmax(net_output, dim=1)
        fg = probs[:, 1:2]
        edges = F.conv2d(fg, self.kernel.to(fg.dtype), padding=1)
        magnitude = torch.sqrt(torch.clamp((edges ** 2).sum(dim=1), min=self.eps))
        area = fg.sum(dim=(1, 2, 3))
        perimeter = magnitude.sum(dim=(1, 2))
        compactness = 4 * math.pi * area / perimeter ** 2
        if torch.isnan(compactness).any():      # empty prediction: 0/0
            compactness = torch.zeros_like(compactness)
        return self.weight * (1 - compactness.float().clamp(0, 1)).mean()
'''
WEIGHT, EPS = 0.1, 1e-4


def _line(snippet: str, text: str = GEO_LOSS) -> int:
    (line,) = [i for i, source in enumerate(text.splitlines(), start=1) if snippet in source]
    return line


SOFTMAX_LINE = _line("probs = torch.softmax(net_output, dim=1)")
OVERFLOW_LINE = _line("compactness = 4 * math.pi * area / perimeter ** 2")
CLAMP_LINE = _line("magnitude = torch.sqrt(torch.clamp(")


def _softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _loss_np(logits: np.ndarray, normalised_twice: bool) -> tuple[float, float]:
    """(loss, perimeter) of the whole image [C, H, W] in fp64, as the loss computes them in fp32."""
    probabilities = _softmax_np(logits)
    fg = (_softmax_np(probabilities) if normalised_twice else probabilities)[1]
    gx, gy = sobel_np(fg)
    perimeter = np.sqrt(np.maximum(gx ** 2 + gy ** 2, EPS)).sum()
    compactness = 4 * math.pi * fg.sum() / perimeter ** 2
    return WEIGHT * (1 - min(max(compactness, 0.0), 1.0)), perimeter


@pytest.fixture(scope="module")
def two_cases(geometric_run):
    """The first two cases (what --max-cases 2 analyses) and their whole-image fp32 logits."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = load_checkpoint(geometric_run.final_checkpoint)
    patch = PlansManager(checkpoint.plans).get_configuration(checkpoint.configuration).patch_size
    network = build_network(checkpoint)
    files = find_cases(checkpoint)[:2]
    logits = {f.name: predict_logits(network, preprocess(checkpoint, f).image, patch).double().numpy()[0]
              for f in files}
    return logits


def _analyse(run, tmp_path_factory, *extra):
    folder = tmp_path_factory.mktemp("loss_mistakes")
    loss_file = folder / "my_geo_loss.py"
    loss_file.write_text(GEO_LOSS)
    out = folder / "out"
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = main(["analyze-checkpoint", str(run.final_checkpoint), "--max-cases", "2", "--precision", "fp32,fp16",
                     "--loss", f"{loss_file}:CompactnessLoss", "--out", str(out), "--device", "cpu", *extra])
    return (code, loss_file, json.loads((out / "summary.json").read_text()), (out / "report.md").read_text(),
            console.getvalue())


@pytest.fixture(scope="module")
def mistaken(geometric_run, tmp_path_factory):
    """The loss analysed as the issue's user did: no --loss-input, so it receives probabilities."""
    return _analyse(geometric_run, tmp_path_factory)


@pytest.fixture(scope="module")
def correct(geometric_run, tmp_path_factory):
    return _analyse(geometric_run, tmp_path_factory, "--loss-input", "logits")


def _first_screen(markdown: str) -> str:
    """The report's first section (its verdict), where the first screen is."""
    return markdown.split("\n## ", 2)[1]


def test_a_loss_normalising_the_probabilities_it_was_given_is_named_with_its_line_and_the_flag(mistaken):
    code, loss_file, summary, markdown, console = mistaken
    assert code == 0 and summary["verdict"] == "healthy"  # finite everywhere: the verdict alone says nothing
    rows = summary["misread_input"]
    assert {(r["site"], r["op"], r["given"], r["read_as"]) for r in rows} == {
        (f"{loss_file}:{SOFTMAX_LINE}", "softmax", "probabilities", "logits")}
    assert {(r["precision"], r["pass"]) for r in rows} == {(p, name) for p in ("fp32", "fp16")
                                                            for name in ("patches", "whole_image")}
    screen = _first_screen(markdown)
    assert "Input read as logits" in screen and f"my_geo_loss.py:{SOFTMAX_LINE}" in screen
    assert "`--loss-input logits`" in screen
    # the console: right after the verdict line, before the gradient shares
    assert console.index("verdict: healthy") < console.index("Input read as logits") < console.index("Gradient share")


def test_the_same_loss_given_logits_raises_no_input_alarm(correct):
    code, _, summary, markdown, console = correct
    assert code == 0 and summary["misread_input"] == []
    assert "Input read as" not in markdown and "Input read as" not in console


def test_a_loss_constant_in_fp16_behind_a_masked_overflow_is_named_per_precision(mistaken, correct, two_cases):
    for _, loss_file, summary, markdown, _ in (mistaken, correct):
        reference = [_loss_np(logits, normalised_twice=summary["loss"]["input"] == "probabilities")
                     for logits in two_cases.values()]
        assert all(perimeter ** 2 > FP16_MAX * 1.1 for _, perimeter in reference)  # P^2 overflows fp16
        # fp16: 4 pi A / inf = 0, the loss is its weight (in fp32) on every case
        constant = {(c["precision"], c["pass"]): c for c in summary["constant_loss"]}
        entry = constant[("fp16", "whole_image")]
        assert entry["value"] == pytest.approx(float(np.float32(WEIGHT)), rel=1e-7) and entry["cases"] == 2
        masked = {(m["precision"], m["pass"], m["site"], m["op"]) for m in summary["masked_nonfinite"]}
        assert ("fp16", "whole_image", f"{loss_file}:{OVERFLOW_LINE}", "pow") in masked
        # fp32: the loss varies between the cases (more than the constant's tolerance), P^2 fits
        losses = [loss for loss, _ in reference]
        assert abs(losses[0] - losses[1]) > 10 * loss_findings.CONSTANT_RELATIVE * max(losses)
        assert all(c["precision"] == "fp16" for c in summary["constant_loss"])
        assert all(m["precision"] == "fp16" for m in summary["masked_nonfinite"])
        screen = _first_screen(markdown)
        assert "Constant loss in fp16" in screen and f"{np.float32(WEIGHT):.10g}" in screen
        assert "Masked non-finite values in fp16" in screen and f"my_geo_loss.py:{OVERFLOW_LINE}" in screen
        assert "Constant loss in fp32" not in markdown and "Masked non-finite values in fp32" not in markdown


def test_the_fp32_values_the_constant_is_judged_on_are_the_losss_own(mistaken, two_cases):
    """The constancy test reads each case's loss value: in fp32 they are the loss recomputed in numpy."""
    loss_file = mistaken[1]
    out = loss_file.parent / "out"
    for case, logits in two_cases.items():
        stored = json.loads((out / "cases" / "fp32" / f"{case}.json").read_text())
        expected, _ = _loss_np(logits, normalised_twice=True)
        assert stored["whole_image"]["geometric_loss"] == pytest.approx(expected, rel=1e-5)


def test_the_sweep_names_the_constant_and_the_masked_values_per_precision(geometric_run, two_cases, tmp_path):
    loss_file = tmp_path / "my_geo_loss.py"
    loss_file.write_text(GEO_LOSS)
    out = tmp_path / "sweep"
    assert main(["clamp-sweep", str(geometric_run.final_checkpoint), "--loss", f"{loss_file}:CompactnessLoss",
                 "--site", f"my_geo_loss.py:{CLAMP_LINE}", "--eps", "1e-4,1e-2", "--precision", "fp32,fp16",
                 "--cases", ",".join(two_cases), "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # a larger clamp only raises P, so P^2 overflows fp16 at both values: the loss is its weight there
    assert {(c["precision"], c["eps"]) for c in summary["constant_loss"]} == {("fp16", 1e-4), ("fp16", 1e-2)}
    assert all(c["value"] == pytest.approx(float(np.float32(WEIGHT)), rel=1e-7) for c in summary["constant_loss"])
    assert summary["masked_nonfinite_evaluations"] == {"fp16": 4}
    screen = _first_screen((out / "report.md").read_text())
    assert "Constant loss in fp16" in screen and "Masked non-finite values in fp16" in screen
    assert "Constant loss in fp32" not in screen and "Masked non-finite values in fp32" not in screen


# ------------------------------------------------------------------------------------------ without nnU-Net
READS = '''import torch
import torch.nn.functional as F
from torch import nn

SOFTMAX = nn.Softmax(dim=1)


def own_softmax(pred, target):
    return torch.softmax(pred, dim=1)[:, 1].mean()


def functional_softmax(pred, target):
    return F.softmax(pred.float(), dim=1)[:, 1:].mean()


def module_softmax(pred, target):
    return SOFTMAX(pred)[:, 1].mean()


def log_softmax(pred, target):
    return -pred.log_softmax(1)[:, 1].mean()


def sigmoid_of_foreground(pred, target):
    return torch.sigmoid(pred[:, 1]).mean()


def spatial_softmax_and_soft_threshold(pred, target):
    attention = torch.softmax(pred[:, 1].flatten(1), dim=1)
    hard = torch.sigmoid(10 * (pred[:, 1] - 0.5))
    return (attention * hard.flatten(1)).sum() + torch.log(pred.clamp(min=1e-6)).mean()


def bce_on_logits_as_probabilities(pred, target):
    p = pred[:, 1].clamp(1e-6, 1 - 1e-6)
    truth = (target[:, 0] > 0).float()
    return -(truth * torch.log(p) + (1 - truth) * torch.log(1 - pred[:, 1] + 1e-6)).mean()


def bce_on_logits(pred, target):
    logits = pred[:, 1].clamp(-15, 15)
    truth = (target[:, 0] > 0).float()
    hinge = (1 - pred[:, 1]).clamp(min=0) * truth      # foreground logits below a margin of 1
    return -(truth * F.logsigmoid(logits) + (1 - truth) * F.logsigmoid(-logits)).mean() + hinge.mean()
'''


def _misread(tmp_path, name: str, input_kind: str, autocast: bool = False) -> dict:
    """{(line, op): calls} of one loss call under automatic taps, as analyze-checkpoint calls it."""
    path = tmp_path / "reads.py"
    path.write_text(READS)
    loss = load_loss(f"{path}:{name}", input_kind)
    logits = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    label = (logits[:, 1:] > 0).float()
    taps = AutoTaps()
    call = trainer_call(loss, torch.bfloat16 if autocast else None, torch.device("cpu"))
    taps.run(call, logits.requires_grad_(True), label).backward()
    rows = taps.result().misread_input
    assert all(r["given"] == input_kind and r["site"].startswith(str(path)) for r in rows)
    return {(int(r["site"].rsplit(":", 1)[1]), r["op"]): r["calls"] for r in rows}


@pytest.mark.parametrize("name,snippet,op", [
    ("own_softmax", "torch.softmax(pred, dim=1)", "softmax"),
    ("functional_softmax", "F.softmax(pred.float(), dim=1)", "softmax"),
    ("module_softmax", "SOFTMAX(pred)", "softmax"),
    ("log_softmax", "pred.log_softmax(1)", "log_softmax"),
    ("sigmoid_of_foreground", "torch.sigmoid(pred[:, 1])", "sigmoid")])
@pytest.mark.parametrize("autocast", [False, True])
def test_each_way_of_normalising_the_given_probabilities_again_is_named_at_its_line(tmp_path, name, snippet, op,
                                                                                    autocast):
    assert _misread(tmp_path, name, "probabilities", autocast) == {(_line(snippet, READS), op): 1}
    assert _misread(tmp_path, name, "logits", autocast) == {}


def test_a_spatial_softmax_a_soft_threshold_and_a_guarded_log_of_probabilities_are_not_misreads(tmp_path):
    assert _misread(tmp_path, "spatial_softmax_and_soft_threshold", "probabilities") == {}


def test_logits_read_as_probabilities_by_a_unit_clamp_or_a_log_are_named(tmp_path):
    found = _misread(tmp_path, "bce_on_logits_as_probabilities", "logits")
    assert found == {(_line("p = pred[:, 1].clamp(1e-6, 1 - 1e-6)", READS), "clamp"): 1,
                     (_line("torch.log(1 - pred[:, 1] + 1e-6)", READS), "log"): 1}
    assert _misread(tmp_path, "bce_on_logits_as_probabilities", "probabilities") == {}
    assert _misread(tmp_path, "bce_on_logits", "logits") == {}  # a logit clamp, a hinge, logsigmoid: logits


def test_the_input_is_followed_only_while_taps_are_attached(tmp_path):
    class Renormalising(nn.Module):
        def forward(self, pred, target):
            return F.softmax(pred, dim=1).mean()

    loss = as_user_loss(Renormalising())
    logits = torch.randn(1, 2, 8, 8)
    trainer_call(loss, None, torch.device("cpu"))(logits, None)  # no taps: nothing listens, nothing is held
    assert _LISTENING == []
    taps = AutoTaps()
    with pytest.raises(ZeroDivisionError):
        taps.run(lambda x: 1 / 0, logits)
    assert _LISTENING == []


@pytest.mark.parametrize("values,constant", [
    ([0.1, 0.1, 0.1], 0.1),
    ([1.0, 1.0 + 5e-7, 1.0 - 5e-7], 1.0),     # within a relative 1e-6
    ([1.0, 1.0 + 5e-6], None),
    ([0.0, 0.0], 0.0),
    ([0.1], None),                             # one value says nothing about constancy
    ([0.1, math.nan], None),
])
def test_a_constant_is_equal_values_to_within_a_relative_1e_6(values, constant):
    assert loss_findings.constant_value(values) == constant


def test_a_constant_needs_two_cases_with_the_other_keys_held_fixed():
    rows = [{"precision": p, "eps": e, "case": c, "loss": 0.1 if p == "fp16" else 0.1 + c / 100}
            for p in ("fp32", "fp16") for e in (1e-4, 1e-2) for c in (0, 1)]
    found = loss_findings.constant_groups(rows, ("precision", "eps"))
    assert found == [{"precision": "fp16", "eps": e, "value": 0.1, "cases": 2} for e in (1e-4, 1e-2)]
    assert loss_findings.constant_groups([r for r in rows if r["case"] == 0], ("precision", "eps")) == []
    # a non-finite loss reads back from summary.json as null: not a constant (the verdict names it)
    nulls = [{"precision": "fp32", "case": c, "loss": None} for c in (0, 1)]
    assert loss_findings.constant_groups(nulls, ("precision",)) == []


def test_the_built_in_sweep_names_a_precision_whose_loss_is_a_constant(tmp_path):
    sweep = sweep_rows({("clamp", 1e-4): dict(bias=0.05, grad_max=0.03), ("clamp", 1e-2): dict(bias=0.9,
                                                                                               grad_max=0.03)})
    case_index = sweep["case"].map({"a": 0, "b": 1, "c": 2})
    sweep["loss"] = np.where(sweep["precision"] == "fp16", 0.25, 1.0 + case_index / 10)
    sweep.to_csv(tmp_path / "sweep.csv", index=False)
    sweep_report.render(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {(c["precision"], c["stabilizer"], c["eps"], c["value"], c["cases"]) for c in summary["constant_loss"]} \
        == {("fp16", "clamp", 1e-4, 0.25, 3), ("fp16", "clamp", 1e-2, 0.25, 3)}
    screen = _first_screen((tmp_path / "report.md").read_text())
    assert "Constant loss in fp16:** 0.25 on every one of 3 cases" in screen
    assert "Constant loss in fp32" not in screen
    assert pd.read_csv(tmp_path / "sweep.csv")["loss"].nunique() == 4
