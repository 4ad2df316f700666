"""The sites section names lines a user can act on: for geodiag's built-in loss its terms' stabilisers in the loss's
own words (the compactness sqrt, its eps), never its internal lines; for a ``--loss``, only the user's file.

The rows come from real automatic taps over the losses, so the internal sites the report must leave out are the
ones an analysis records (the area ramp's clamp at its bound, the area floors, the divisions).
"""
from __future__ import annotations

import pandas as pd
import torch

from geodiag.diagnostics.nonfinite.autotaps import AutoTaps
from geodiag.diagnostics.nonfinite.loss_spec import load_loss
from geodiag.losses import GeometricLoss
from geodiag.losses.stabilizers import STABILIZERS
from geodiag.reports import sites_report


def _tapped_rows(loss, inputs: torch.Tensor, target: torch.Tensor) -> list[dict]:
    inputs = inputs.detach().requires_grad_(True)
    taps = AutoTaps()
    taps.run(loss, inputs, target).backward()
    return [{**row, "precision": "fp32", "pass": "patches"} for row in taps.result().by_risk()]


def _disk_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 48, 48, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    target[:, 0][:, (yy - 24) ** 2 + (xx - 22) ** 2 < 100] = 1
    logits = torch.randn(2, 2, 48, 48) + 4.0 * torch.cat([1 - target, target], dim=1)
    return logits, target


def _summary(spec: str, rows: list[dict], **settings) -> dict:
    return {"loss": {"spec": spec, "input": "logits", "why": "test"}, "sites": rows, "settings": settings}


def test_the_built_in_loss_is_named_by_its_stabilisers_not_its_internal_lines():
    assert set(sites_report.STABILISER_FORMULAS) == set(STABILIZERS)   # every stabiliser the loss offers is named
    logits, target = _disk_batch()
    for preset, formula, eps, aspect in (("production", "sqrt(x + eps) − sqrt(eps)", "1e-10", "none"),
                                         ("v2.3", "sqrt(clamp(x, min=eps))", "1e-4", "sqrt(tr² − 4 det)")):
        loss = GeometricLoss.from_preset(preset, classes=(1,), softmax=True)
        rows = _tapped_rows(loss, logits, target)
        internal = {row["site"] for row in rows}
        assert any("geometric_loss.py" in site for site in internal)   # what an analysis records today
        spec = (f"GeometricLoss(preset={preset!r}, stabilizer={loss.stabilizer.name!r}, eps={loss.stabilizer.eps:g}, "
                f"aspect_formula={loss.aspect_formula!r}, sobel={loss.sobel!r})")
        section = sites_report.sites_section(_summary(spec, rows, stabilizer=loss.stabilizer.name,
                                                      eps=loss.stabilizer.eps, aspect_formula=loss.aspect_formula,
                                                      sobel=loss.sobel))
        assert not any(site in section.body for site in internal), preset
        assert "| compactness | the perimeter's sqrt(s)" in section.body
        assert f"{loss.stabilizer.name}: {formula} | {eps} |" in section.body
        assert aspect in section.body.split("| aspect |")[1].splitlines()[0]
        assert f"{len(internal)} call sites at geodiag's own source lines" in section.body
        assert section.tone == ""


RESEARCHER_LOSS = '''import torch
from geodiag.losses import GeometricLoss


class ShapeAwareLoss(torch.nn.Module):
    """Edge length plus geodiag's compactness, as a researcher would combine them."""

    def __init__(self):
        super().__init__()
        self.shape = GeometricLoss(classes=(1,), aspect_weight=0.0)

    def forward(self, probs, target):
        fg = probs[:, 1]
        edge = torch.sqrt(torch.clamp((fg[:, :, 1:] - fg[:, :, :-1]) ** 2, min=1e-6)).mean()
        shape = self.shape(probs, target)
        if torch.isnan(shape):
            shape = probs.sum() * 0
        return edge + 0.1 * shape
'''


def test_a_users_loss_calling_geodiags_lists_only_the_users_lines(tmp_path):
    (tmp_path / "shape_aware.py").write_text(RESEARCHER_LOSS)
    loss = load_loss(f"{tmp_path / 'shape_aware.py'}:ShapeAwareLoss")
    logits, target = _disk_batch()
    rows = _tapped_rows(lambda p, t: loss(torch.softmax(p, dim=1), t), logits, target)
    theirs = [row["site"] for row in rows if "shape_aware.py:" in row["site"]]
    geodiag = {row["site"] for row in rows} - set(theirs)
    clamp_line = RESEARCHER_LOSS.splitlines().index(
        "        edge = torch.sqrt(torch.clamp((fg[:, :, 1:] - fg[:, :, :-1]) ** 2, min=1e-6)).mean()") + 1
    assert any(site.endswith(f"shape_aware.py:{clamp_line}") for site in theirs) and geodiag   # both recorded
    assert all(sites_report.geodiag_file(site) for site in geodiag)
    assert not any(sites_report.geodiag_file(site) for site in theirs)
    section = sites_report.sites_section(_summary(f"{tmp_path / 'shape_aware.py'}:ShapeAwareLoss", rows))
    table = [line for line in section.body.splitlines() if line.startswith("| fp32 |")]
    assert len(table) == len(theirs) and f"shape_aware.py:{clamp_line}" in section.body
    assert not any(site in section.body for site in geodiag)
    assert f"{len(geodiag)} call site(s) in geodiag's package code, which your loss calls, are left out" \
        in section.body


def test_site_figures_leave_geodiag_sites_out(tmp_path):
    histograms = pd.DataFrame([dict(precision="fp32", site=site, op="clamp", bin_low=1e-3, bin_high=1e-2, count=5,
                                    **{"pass": "patches"})
                               for site in ("losses/geometry.py:78", f"{tmp_path / 'mine.py'}:7")])
    summary = _summary("mine.py:loss", [dict(site=f"{tmp_path / 'mine.py'}:7", op="clamp", bounds=[[1e-3, None]])])
    (tmp_path / "mine.py").write_text("")
    sections = sites_report.figure_sections(tmp_path, summary, histograms)
    assert [figure.caption.split("`")[1] for figure in sections[0].figures] == [f"{tmp_path / 'mine.py'}:7"]
    built_in = _summary("GeometricLoss(preset='production')", summary["sites"])
    assert sites_report.figure_sections(tmp_path, built_in, histograms) == []
