"""analyze-checkpoint judges a user's loss by its share of the training step's gradient: inert, contributes or
dominant, per term, and why when a clamp explains it.

References: one training patch is cut here from the preprocessed case at the box the analysis recorded, sent
through the rebuilt network, and Dice+CE's and the loss's parameter gradients are taken by autograd one at a time;
the share <g_loss, g>/|g|^2 is then formed in numpy fp64. The clamp's at-bound share is recounted in numpy from the
same patches (raw Sobel, zero padding)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures_nnunet import crop_with_padding
from geodiag.diagnostics.cli import main
from geodiag.diagnostics.nnunet.cases import find_cases, preprocess
from geodiag.diagnostics.nnunet.checkpoint import build_network, load_checkpoint
from geodiag.diagnostics.nonfinite.loss_spec import load_loss
from geodiag.diagnostics.tools.analyze import analyze_checkpoint, dice_ce_for
from geodiag.reports import analysis_report
from geodiag.reports.tables import read_table
from test_autotaps import LOSS_FILE, sobel_np

EDGE_LOSS = '''import torch
import torch.nn.functional as F

SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
EPS = {eps}
WEIGHT = {weight}


def edge_length(pred, target):
    """Mean boundary strength of the prediction, pixel units; the clamp keeps sqrt's derivative finite."""
    p = pred[:, 1:2]
    gx = F.conv2d(p, SOBEL.view(1, 1, 3, 3).to(p.dtype), padding=1)
    gy = F.conv2d(p, SOBEL.t().reshape(1, 1, 3, 3).to(p.dtype), padding=1)
    edge = torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=EPS))
    return WEIGHT * edge.mean()
'''
CLAMP_LINE = "    edge = torch.sqrt(torch.clamp(gx ** 2 + gy ** 2, min=EPS))"
TERMS = ["compactness=w_compact", "boundary=w_boundary", "aspect=w_aspect"]


def _patches(checkpoint_path, out, case_name):
    """The analysis' training patches of one case, cut here from the case at its recorded boxes: (image, label)."""
    ck = load_checkpoint(checkpoint_path)
    files = next(f for f in find_cases(ck) if f.name == case_name)
    case = preprocess(ck, files)
    boxes = json.loads((out / "cases" / "fp32" / f"{case_name}.json").read_text())["patches"]["bboxes"]
    image = np.stack([crop_with_padding(case.data, box, 0.0)[:, 0] for box in boxes])
    label = np.stack([crop_with_padding(case.seg, box, -1.0)[:, 0] for box in boxes]).clip(min=0)
    return ck, torch.from_numpy(image).float(), torch.from_numpy(label).float()


def test_the_share_of_a_users_loss_and_its_terms_matches_an_independent_step(geometric_run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze-checkpoint", str(geometric_run.final_checkpoint), "--max-cases", "1", "--device", "cpu",
            "--loss", f"{LOSS_FILE}:loss_v23", *[w for t in TERMS for w in ("--term", t)], "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    shares = read_table(out / "loss_share.csv")
    patch0 = shares[(shares["pass"] == "patches") & (shares["sample"] == 0)].set_index("piece")
    assert list(patch0.index) == ["dice_ce", "loss", "compactness", "boundary", "aspect"]

    ck, image, label = _patches(geometric_run.final_checkpoint, out, shares.case.iloc[0])
    network = build_network(ck)
    params = [p for p in network.parameters() if p.requires_grad]
    logits = network(image[:1])
    user = load_loss(f"{LOSS_FILE}:loss_v23")
    pieces = {"dice_ce": dice_ce_for(ck)(logits, label[:1]), "loss": user(logits, label[:1])}
    flat = {}
    for name, value in pieces.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat[name] = np.concatenate([(g if g is not None else torch.zeros_like(p)).double().numpy().ravel()
                                     for g, p in zip(grads, params)])
    step = flat["dice_ce"] + flat["loss"]
    for name in pieces:
        assert patch0.loc[name, "share_params"] == pytest.approx(flat[name] @ step / (step @ step), rel=1e-4, abs=1e-7)
        assert patch0.loc[name, "norm_ratio_params"] == pytest.approx(
            np.linalg.norm(flat[name]) / np.linalg.norm(step), rel=1e-4)
    # the terms are the loss with the other weights at 0: they add up to it, value and share
    terms = patch0.loc[["compactness", "boundary", "aspect"]]
    assert terms["value"].sum() == pytest.approx(patch0.loc["loss", "value"], rel=1e-5)
    assert terms["share_params"].sum() == pytest.approx(patch0.loc["loss", "share_params"], rel=1e-3, abs=1e-8)
    # summary.json per precision and pass, and the line and table the console prints
    assert set(summary["loss_share"]["fp32"]) == {"patches", "whole_image"}
    assert summary["loss_share"]["fp32"]["patches"]["loss"]["samples"] == len(image)
    role = summary["loss_role"]
    assert role["role"] in ("inert", "contributes", "dominant") and set(role["terms"]) == {"compactness", "boundary",
                                                                                          "aspect"}
    assert f"`{LOSS_FILE}:loss_v23`" in printed and "| fp32 | patches | loss |" in printed
    # terms.csv holds the user's terms with their part of the terms' gradient at the logits (summing to 1)
    table = read_table(out / "terms.csv")
    assert table[table.term.isin(["compactness", "boundary", "aspect"])].grad_share.sum() == pytest.approx(1.0)


def _edge_analysis(geometric_run, tmp_path, name, eps, weight):
    path = tmp_path / f"{name}.py"
    path.write_text(EDGE_LOSS.format(eps=eps, weight=weight))
    out = tmp_path / name
    summary = analyze_checkpoint(str(geometric_run.final_checkpoint), out, max_cases=1,
                                 loss_spec=f"{path}:edge_length")
    return path, out, summary


def test_a_clamp_holding_most_pixels_makes_the_loss_inert_and_the_first_screen_says_why(geometric_run, tmp_path):
    path, out, summary = _edge_analysis(geometric_run, tmp_path, "edge_inert", "1.0", "0.01")
    role = summary["loss_role"]
    assert summary["verdict"] == "healthy"  # finiteness is judged as before: nothing is non-finite here
    assert role["role"] == "inert" and abs(role["share"]) < 0.01
    site = f"{path}:{EDGE_LOSS.splitlines().index(CLAMP_LINE) + 1}"
    assert role["explained_by"]["site"] == site
    _, image, _ = _patches(geometric_run.final_checkpoint, out, read_table(out / "loss_share.csv").case.iloc[0])
    with torch.no_grad():
        p = torch.softmax(build_network(load_checkpoint(geometric_run.final_checkpoint))(image).double(), 1)[:, 1]
    s = np.stack([sum(g ** 2 for g in sobel_np(patch)) for patch in p.numpy()])
    ambiguous = np.abs(s - 1.0) < 1e-5
    assert abs(role["explained_by"]["at_bound_fraction"] - (s < 1.0).mean()) <= ambiguous.mean() + 1e-9
    assert role["explained_by"]["at_bound_fraction"] > 0.5
    text = analysis_report.render(out).markdown.read_text()
    first_screen, verdict = text.split("\n## ")[1], text.split("\n## Verdict")[1].split("\n## ")[0]
    assert first_screen.startswith("In one minute") and "inert" in first_screen
    assert "**healthy**" in verdict
    line = next(text for text in verdict.splitlines() if text.startswith("**Gradient share:**"))
    assert "is **inert**" in line and f"the clamp at {site} holds" in line
    assert f"{100 * role['explained_by']['at_bound_fraction']:.3g}% of its elements at its bound" in line


def test_the_same_loss_without_the_clamp_at_work_is_not_called_inert(geometric_run, tmp_path):
    """The healthy version: a negligible clamp and a weight that counts; no inert verdict, no clamp named."""
    _, out, summary = _edge_analysis(geometric_run, tmp_path, "edge_live", "1e-12", "50.0")
    role = summary["loss_role"]
    assert role["role"] in ("contributes", "dominant") and abs(role["share"]) >= 0.01
    assert role["explained_by"] is None
    line = next(text for text in analysis_report.render(out).markdown.read_text().splitlines()
                if text.startswith("**Gradient share:**"))
    assert "inert" not in line.split("inert below")[0] and "Why:" not in line


def test_a_loss_returning_a_dict_of_terms_is_split_by_its_entries(geometric_run, tmp_path):
    path = tmp_path / "dict_loss.py"
    path.write_text(EDGE_LOSS.format(eps="1e-8", weight="1.0") + '''

def edge_and_area(pred, target):
    p = pred[:, 1:2]
    return {"edge": edge_length(pred, target), "area": 0.1 * (p.mean() - (target > 0).float().mean()) ** 2}
''')
    summary = analyze_checkpoint(str(geometric_run.final_checkpoint), tmp_path / "out", max_cases=1,
                                 loss_spec=f"{path}:edge_and_area")
    patches = summary["loss_share"]["fp32"]["patches"]
    assert list(patches) == ["dice_ce", "loss", "edge", "area"]
    assert summary["loss_role"]["terms"].keys() == {"edge", "area"}
    assert patches["edge"]["value"]["median"] + patches["area"]["value"]["median"] == pytest.approx(
        patches["loss"]["value"]["median"], rel=1e-5)


def test_a_bad_term_is_a_one_line_error_naming_the_flag(geometric_run, tmp_path, capsys):
    code = main(["analyze-checkpoint", str(geometric_run.final_checkpoint), "--loss", f"{LOSS_FILE}:loss_v23",
                 "--term", "compactness=w_nothing", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--term" in err and "w_nothing" in err
