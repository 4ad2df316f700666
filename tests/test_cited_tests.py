"""The reports cite the tests that reproduce what they claim ("tests/test_watch.py", "tests/test_own_loss_*.py",
"tests/test_x.py::test_name"): every cited file must exist (a pattern must match one) and every cited test function
must be defined in it, in the renderers' code, the committed reference reports and the README."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"\btests/[\w*./-]+?\.py(?:::(\w+))?")
CITING = sorted([*(ROOT / "reports").rglob("*.py"), *(ROOT / "reports").rglob("*.md"), ROOT / "README.md"])


def _functions(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def missing(text: str) -> list[str]:
    """The citations in ``text`` whose file (or pattern) matches nothing, or whose test function is not defined."""
    found = []
    for match in CITATION.finditer(text):
        path, function = match.group(0).split("::")[0], match.group(1)
        files = sorted(ROOT.glob(path))
        if not files:
            found.append(f"{match.group(0)}: no such file")
        elif function and not any(function in _functions(file) for file in files):
            found.append(f"{match.group(0)}: {function} is not defined in {', '.join(f.name for f in files)}")
    return found


def test_the_checker_finds_a_missing_file_a_missing_function_and_accepts_real_ones():
    assert missing("tests/test_cited_tests.py and tests/test_cited_*.py") == []
    assert missing("tests/test_cited_tests.py::test_the_checker_finds_a_missing_file_a_missing_function_and_"
                   "accepts_real_ones") == []
    assert missing("see tests/test_no_such_thing.py, tests/test_nothing_*.py") == [
        "tests/test_no_such_thing.py: no such file", "tests/test_nothing_*.py: no such file"]
    assert missing("tests/test_cited_tests.py::test_absent") == [
        "tests/test_cited_tests.py::test_absent: test_absent is not defined in test_cited_tests.py"]


def test_the_study_report_cites_tests():
    cited = CITATION.findall((ROOT / "reports" / "study_causes.py").read_text())
    assert len(cited) >= 5  # the candidate causes' table: the check below is not vacuous


@pytest.mark.parametrize("path", CITING, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_test_exists(path):
    assert missing(path.read_text()) == []
