"""The README's paragraph on the reference study is generated from reports/reference/ (``readme_block``): every
number it states is in the study report, the committed block is what the committed tables give, and the README
carries that block unchanged once pasted."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from geodiag.reports import study_report
from geodiag.reports.readme_block import BEGIN, END, README_BLOCK

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reports" / "reference"
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?%?(?![\w])")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("block") / "reference"
    shutil.copytree(REFERENCE, copy, ignore=shutil.ignore_patterns("*.png", "report.md", README_BLOCK))
    from geodiag.diagnostics.study.reference import TITLE

    study_report.render(copy, TITLE)
    return copy


def test_every_number_of_the_block_is_in_the_study_report(rendered):
    block = (rendered / README_BLOCK).read_text()
    report = set(NUMBER.findall((rendered / "report.md").read_text()))
    numbers = NUMBER.findall(block)
    assert len(numbers) > 20  # the block states the study's findings, not only prose
    assert sorted(set(numbers) - report) == []


def test_the_committed_block_is_what_the_committed_tables_give(rendered):
    assert (REFERENCE / README_BLOCK).read_text() == (rendered / README_BLOCK).read_text()


def test_the_readme_carries_the_generated_block_unchanged():
    readme = (ROOT / "README.md").read_text()
    if BEGIN not in readme:
        pytest.skip("the generated block is not pasted into README.md yet")
    pasted = readme[readme.index(BEGIN):readme.index(END) + len(END)] + "\n"
    assert pasted == (REFERENCE / README_BLOCK).read_text()
