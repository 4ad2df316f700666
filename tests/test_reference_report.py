"""The committed reference (reports/reference/) is what the renderers make of its committed tables: each report is
rendered again from a copy of the tables beside it and must equal the committed report.md.

When a renderer's wording changes on purpose, render the reference again from its tables (``study_report.render``,
``sweep_report.render``, ``site_sweep_report.render``, ``analysis_report.render`` on its folders, about a minute);
the study behind it (``geodiag reference-report``; its study.json records how long it took) need not run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from geodiag.reports import analysis_report, site_sweep_report, study_report, sweep_report

REFERENCE = Path(__file__).resolve().parents[1] / "reports" / "reference"


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """A copy of the reference's tables and summaries, without its reports and figures."""
    copy = tmp_path_factory.mktemp("reference") / "reference"
    shutil.copytree(REFERENCE, copy, ignore=shutil.ignore_patterns("*.png", "report.md"))
    return copy


def _study(folder: Path):
    from geodiag.diagnostics.study.reference import TITLE

    return study_report.render(folder, TITLE)


# One analysis per units of s: the seed's (the replica's loss) and geodiag's normalised ones (production).
@pytest.mark.parametrize("folder, render", [
    (".", _study), ("sweep", sweep_report.render), ("replica_sweep", site_sweep_report.render),
    ("analysis/501-ReplicaV23-seed0", analysis_report.render),
    ("analysis/502-Production-seed0", analysis_report.render),
], ids=["study", "sweep", "replica_sweep", "analysis-replica", "analysis-production"])
def test_the_committed_report_is_rendered_again_from_its_tables(tables, folder, render):
    rendered = render(tables / folder).markdown
    assert rendered.read_text() == (REFERENCE / folder / "report.md").read_text()
