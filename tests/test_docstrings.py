"""Docstrings and comments carry reasons, not measurements: timings go stale (``geodiag bench`` produces them and
the README holds them), and nothing cites a document outside the repository."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("losses", "diagnostics", "reports") for p in (ROOT / folder).rglob("*.py"))

# A duration (129 us, 53 ms, 2.5 s) or a measured ratio with decimals (2.16x, 1.02×); "64x" (a units factor) is not.
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(us|µs|ms|s)\b(?![-\w])|\b\d+\.\d+\s?[x×](?!\w)")
# A document outside the repository: the notes folder or a file of it, an issue note, or a section of "the notes"
# ("notes §4", "notes, §4.2", "§4 of the notes", "the notes' §4").
OUTSIDE = re.compile(r"notes/|numerics\.md|\bnumerics\b|issue note|\bnotes'?\W{0,3}§\s*\d"
                     r"|§\s*\d+(\.\d+)*\s+(of|in)\s+(the\s+)?(\w+\s+)?notes\b")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a module."""
    source = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


@pytest.mark.parametrize("citation", ["notes §4", "the notes' §4", "(notes, §4.2)", "§4 of the notes",
                                      "see §2.1 in the design notes", "notes/numerics.md"])
def test_the_outside_citation_pattern_catches_each_spelling(citation):
    assert OUTSIDE.search(citation)


@pytest.mark.parametrize("prose", ["the report's §4", "section 4 of the report", "footnotes", "§1 (the answers)"])
def test_the_outside_citation_pattern_leaves_the_repositorys_own_sections(prose):
    assert not OUTSIDE.search(prose)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_measured_timings_or_outside_citations_in_docstrings_and_comments(path):
    bad = [(line, match.group(0)) for line, text in _prose(path)
           for pattern in (TIMING, OUTSIDE) for match in pattern.finditer(text)]
    assert not bad, bad
