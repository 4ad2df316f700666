"""check-bounds against a baseline, both ways: a loss change that silences a gradient fails CI as surely as one that
blows it up. The losses are written as researchers write them; every value the tests compare with is recomputed
here in numpy fp64 (an independent Sobel, clamp and sqrt) or follows from the change itself (a gradient scaled by
a quarter), never read back from the code under test."""
from __future__ import annotations

import json
import re
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from geodiag.diagnostics.cli import main
from geodiag.diagnostics.study import replica
from geodiag.diagnostics.tools import bounds
from sobel_reference import sobel_squared_magnitude

EDGE_LOSS = '''import torch
import torch.nn.functional as F

SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
EPS = {eps}  # keeps sqrt's derivative finite on flat regions


def edges(p):
    gx = F.conv2d(p, SOBEL.view(1, 1, 3, 3).to(p.dtype), padding=1)
    gy = F.conv2d(p, SOBEL.t().reshape(1, 1, 3, 3).to(p.dtype), padding=1)
    return gx ** 2 + gy ** 2


def edge_length_loss(pred, target):
    """Predicted boundary length against the target's, per image, in pixels."""
    length = torch.sqrt(torch.clamp(edges(pred[:, 1:2]), min=EPS)).flatten(1).sum(1)
    reference = torch.sqrt(edges(target.float()) + 1e-12).flatten(1).sum(1)
{ending}
'''
ENDINGS = {"plain": "    return ((length - reference).abs() / (reference + 1.0)).mean()",
           "quarter_gradient": "    value = ((length - reference).abs() / (reference + 1.0)).mean()\n"
                               "    return 0.25 * value + 0.75 * value.detach()  # same value, 1/4 of the gradient"}
CLAMP_LINE = "    length = torch.sqrt(torch.clamp(edges(pred[:, 1:2]), min=EPS)).flatten(1).sum(1)"
CASES = ("uncertain", "tiny_disk")
REGRESSION = re.compile(r"^REGRESSION (\S+) / (\S+) / (\S+): (.+?) = (\S+) \(baseline (\S+); bound (.+); "
                        r"tolerance (\w+)\)$")


def _write_edge_loss(path, eps: str, ending: str = "plain") -> str:
    """The loss at ``path`` (rewritten in place, as a researcher edits their file); returns its SPEC."""
    path.write_text(EDGE_LOSS.format(eps=eps, ending=ENDINGS[ending]))
    return f"{path}:edge_length_loss"


def _check_bounds(capsys, *args) -> tuple[int, str, list[tuple]]:
    code = main(["check-bounds", *map(str, args)])
    out = capsys.readouterr().out
    found = [REGRESSION.match(line).groups() for line in out.splitlines() if line.startswith("REGRESSION")]
    return code, out, found


def _case_probabilities(case: str) -> tuple[np.ndarray, np.ndarray]:
    logits, target = bounds.CASES[case].inputs(torch.device("cpu"))
    return torch.softmax(logits.double(), dim=1)[:, 1].numpy(), target[:, 0].double().numpy()


def _edge_loss_fp64(case: str, eps: float) -> tuple[float, float]:
    """(loss, share of the clamp's elements below eps) of EDGE_LOSS in numpy fp64: raw Sobel, zero padding."""
    foreground, target = _case_probabilities(case)
    s = np.stack([sobel_squared_magnitude(p, raw=True, padding="constant") for p in foreground])
    length = np.sqrt(np.maximum(s, eps)).reshape(len(s), -1).sum(1)
    t = np.stack([sobel_squared_magnitude(m, raw=True, padding="constant") for m in target])
    reference = np.sqrt(t + 1e-12).reshape(len(t), -1).sum(1)
    return float((np.abs(length - reference) / (reference + 1.0)).mean()), float((s < eps).mean())


def test_a_clamp_raised_from_1e4_to_1e1_fails_its_own_baseline_on_at_bound_share_and_loss_drift(capsys, tmp_path):
    path, baseline = tmp_path / "edge_loss.py", tmp_path / "baseline.json"
    spec = _write_edge_loss(path, "1e-4")
    selection = ["--cases", ",".join(CASES), "--precision", "fp32", "--baseline", baseline]
    assert _check_bounds(capsys, "--loss", spec, *selection, "--update-baseline")[0] == 0
    code, out, found = _check_bounds(capsys, "--loss", spec, *selection)
    assert code == 0 and not found and "without a baseline" not in out  # the loss passes its own baseline

    _write_edge_loss(path, "1e-1")
    code, out, found = _check_bounds(capsys, "--loss", spec, *selection)
    assert code == 1
    site = f"edge_loss.py:{EDGE_LOSS.splitlines().index(CLAMP_LINE) + 1}"
    by_quantity = {(case, quantity): (float(now), float(before), tolerance)
                   for case, _, _, quantity, now, before, _, tolerance in found}
    for case in CASES:
        loss_before, share_before = _edge_loss_fp64(case, 1e-4)
        loss_now, share_now = _edge_loss_fp64(case, 1e-1)
        now, before, tolerance = by_quantity[(case, "loss")]
        assert tolerance == "loss"
        assert now == pytest.approx(loss_now, rel=1e-4) and before == pytest.approx(loss_before, rel=1e-4)
        named = (case, f"at_bound {site}") in by_quantity
        assert named == (share_now - share_before > 0.10)  # named exactly where the share rose by 10 points
        if named:
            now, before, tolerance = by_quantity[(case, f"at_bound {site}")]
            assert tolerance == "at_bound"
            assert now == pytest.approx(share_now, abs=1e-3) and before == pytest.approx(share_before, abs=1e-3)
    _, uncertain_before = _edge_loss_fp64("uncertain", 1e-4)
    _, uncertain_now = _edge_loss_fp64("uncertain", 1e-1)
    assert uncertain_now > 0.5 > uncertain_before  # switch-on predictions: most elements now held at the bound
    # the row names what it failed on; the tolerances are printed with the results
    uncertain_row = next(line for line in out.splitlines() if line.startswith("uncertain "))
    assert uncertain_row.split()[-1] == "FAIL" and {"loss", "at_bound"} <= set(uncertain_row.split()[-2].split(","))
    assert "loss +-1% or +-1e-06: drift of the loss value" in out and "at_bound +10 points" in out


def test_a_loss_change_that_only_shrinks_every_gradient_4x_fails_on_the_l2_norm(capsys, tmp_path):
    path, baseline = tmp_path / "edge_loss.py", tmp_path / "baseline.json"
    spec = _write_edge_loss(path, "1e-4")
    selection = ["--cases", ",".join(CASES), "--precision", "fp32", "--baseline", baseline]
    assert _check_bounds(capsys, "--loss", spec, *selection, "--update-baseline")[0] == 0
    stored = {e["case"]: e for e in json.loads(baseline.read_text())["entries"]}

    _write_edge_loss(path, "1e-4", "quarter_gradient")
    code, out, found = _check_bounds(capsys, "--loss", spec, *selection, "--junit", tmp_path / "bounds.xml")
    assert code == 1
    # the value is unchanged, so nothing but the fallen L2 norm fails: no drift, no growth, no new zeros
    assert {(case, quantity, tolerance) for case, _, _, quantity, _, _, _, tolerance in found} == \
        {(case, "grad_l2", "grad_l2_drop") for case in CASES}
    for case, _, _, _, now, before, bound, _ in found:
        assert float(now) == pytest.approx(stored[case]["grad_l2"] / 4, rel=1e-5)
        assert bound.startswith(">= ") and float(bound.split()[1]) == pytest.approx(float(before) / 2, rel=1e-5)
    suite = ElementTree.parse(tmp_path / "bounds.xml").getroot().find("testsuite")
    messages = [t.find("failure").get("message") for t in suite.findall("testcase")]
    assert all("grad_l2 = " in m and "baseline " in m and "tolerance grad_l2_drop" in m for m in messages)
    properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert properties["tolerance.grad_l2_drop"].startswith("grad_l2_drop -50%")


def test_the_seed_replicas_v23_to_v24_change_fails_a_v23_baseline_on_at_bound_share_and_loss_drift(
        capsys, tmp_path, monkeypatch, request):
    """The seed's own change, made in place: the loss its training imports moves from eps 1e-4 to 1e-2."""
    monkeypatch.syspath_prepend(str(replica.FOLDER))
    # the wrapper imports the replica by its file's name: that module leaves with the test, as nnU-Net's lookup's do
    request.addfinalizer(lambda: sys.modules.pop("nnUNetTrainerSeedReplica", None))
    path, baseline = tmp_path / "seed_loss.py", tmp_path / "baseline.json"
    spec = f"{path}:seed_loss"
    selection = ["--cases", "uncertain,uniform_half,full", "--precision", "fp32", "--baseline", baseline]
    path.write_text("from nnUNetTrainerSeedReplica import loss_v23 as seed_loss  # noqa: F401\n")
    assert _check_bounds(capsys, "--loss", spec, *selection, "--update-baseline")[0] == 0
    path.write_text("from nnUNetTrainerSeedReplica import loss_v24 as seed_loss  # noqa: F401\n")
    code, out, found = _check_bounds(capsys, "--loss", spec, *selection)
    assert code == 1
    compactness_clamp = replica.sqrt_clamp_sites()["compactness"]
    named = {(case, quantity) for case, _, _, quantity, *_ in found}
    assert ("uncertain", f"at_bound {compactness_clamp}") in named
    assert any(quantity == "loss" for _, quantity in named)
    # the share the V2.4 clamp holds: s < 1e-2 in the seed's units, recounted in numpy (the seed's 28.3%)
    foreground, _ = _case_probabilities("uncertain")
    s = np.stack([sobel_squared_magnitude(p, raw=True, padding="constant") for p in foreground])
    reported = next(float(now) for case, _, _, quantity, now, *_ in found
                    if (case, quantity) == ("uncertain", f"at_bound {compactness_clamp}"))
    assert reported == pytest.approx(float((s < 1e-2).mean()), abs=1e-3)


def test_a_format_1_baseline_is_still_checked_and_tolerances_are_settable(capsys, tmp_path):
    path, baseline = tmp_path / "edge_loss.py", tmp_path / "baseline.json"
    spec = _write_edge_loss(path, "1e-4")
    selection = ["--cases", "tiny_disk", "--precision", "fp32", "--baseline", baseline]
    assert _check_bounds(capsys, "--loss", spec, *selection, "--update-baseline")[0] == 0
    old = json.loads(baseline.read_text())
    old["format"] = 1
    old["tolerances"] = {name: old["tolerances"][name] for name in ("grad_max", "grad_l2")}
    for entry in old["entries"]:
        del entry["zero_grad_fraction"], entry["clamp_at_bound"]
    baseline.write_text(json.dumps(old))
    _write_edge_loss(path, "1e-1")
    code, _, found = _check_bounds(capsys, "--loss", spec, *selection)
    assert code == 1 and {quantity for _, _, _, quantity, *_ in found} == {"loss"}  # what format 1 recorded
    relative_drift = abs(float(found[0][4]) / float(found[0][5]) - 1)
    code, out, found = _check_bounds(capsys, "--loss", spec, *selection,
                                     "--tolerance", f"loss={2 * relative_drift:g}")
    assert code == 0 and not found and f"loss +-{2 * relative_drift:.0%}" in out


@pytest.mark.parametrize("item", ["nonsense=0.1", "loss", "loss=abc", "zero_grad=-0.1", "grad_l2_drop=1"])
def test_a_bad_tolerance_is_a_one_line_error_naming_the_flag(capsys, item):
    code = main(["check-bounds", "--cases", "tiny_disk", "--precision", "fp32", "--tolerance", item])
    captured = capsys.readouterr()
    assert code == 2 and not captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "--tolerance" in captured.err
