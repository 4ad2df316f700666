"""Progress of long runs: a tqdm bar on a terminal, one plain line per case otherwise."""
import io
from types import SimpleNamespace

from geodiag.diagnostics.progress import TerminalBar, counter, for_stream, progress_over

CASES = [SimpleNamespace(name="case_a"), SimpleNamespace(name="case_b")]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar():
    stream = _Terminal()
    progress = for_stream(stream)
    assert isinstance(progress, TerminalBar)
    assert [c.name for c in progress_over(CASES, "fp32 cases", progress)] == ["case_a", "case_b"]
    text = stream.getvalue()
    assert "\r" in text and "2/2" in text and "100%" in text and "case_b" in text


def test_a_log_file_gets_one_plain_line_per_case():
    stream = io.StringIO()
    list(progress_over(CASES, "fp32 cases", for_stream(stream)))
    assert stream.getvalue().splitlines() == ["fp32 cases: case_a (1/2)", "fp32 cases: case_b (2/2)"]


def test_counter_writes_plain_lines_when_not_on_a_terminal():
    lines: list[str] = []
    stream = io.StringIO()
    with counter(3, "502-V23", "epoch", lines.append, stream=stream) as advance:
        for _ in range(3):
            advance()
    assert lines == ["502-V23: epoch 1/3", "502-V23: epoch 2/3", "502-V23: epoch 3/3"]
    assert stream.getvalue() == ""


def test_counter_draws_a_tqdm_bar_on_a_terminal_and_no_lines():
    lines: list[str] = []
    terminal = _Terminal()
    with counter(3, "502-V23", "epoch", lines.append, stream=terminal) as advance:
        advance()
        advance()
        drawn = terminal.getvalue()
    assert lines == []
    assert "502-V23" in drawn and "2/3" in drawn and "\r" in drawn  # tqdm redraws its line in place
