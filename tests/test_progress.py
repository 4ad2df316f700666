"""Progress of the study's long steps: a tqdm bar on a terminal, plain lines elsewhere (log files, CI)."""
from __future__ import annotations

import io

from geodiag.diagnostics.study import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_on_a_terminal():
    lines: list[str] = []
    stream = io.StringIO()
    with progress(3, "502-V23", "epoch", lines.append, stream=stream) as advance:
        for _ in range(3):
            advance()
    assert lines == ["502-V23: epoch 1/3", "502-V23: epoch 2/3", "502-V23: epoch 3/3"]
    assert stream.getvalue() == ""


def test_a_tqdm_bar_on_a_terminal_and_no_lines():
    lines: list[str] = []
    terminal = _Terminal()
    with progress(3, "502-V23", "epoch", lines.append, stream=terminal) as advance:
        advance()
        advance()
        drawn = terminal.getvalue()
    assert lines == []
    assert "502-V23" in drawn and "2/3" in drawn and "\r" in drawn  # tqdm redraws its line in place
