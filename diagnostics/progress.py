"""Progress of long runs (per case): a tqdm bar on a terminal, one plain line per case otherwise (logs, CI)."""
from __future__ import annotations

import sys
from typing import Callable, Iterator, Optional, Sequence, TextIO, TypeVar, Union

T = TypeVar("T")


class TerminalBar:
    """Report progress as a tqdm bar on ``stream`` (a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream


Progress = Union[TerminalBar, Callable[[str], None]]


def for_stream(stream: TextIO = sys.stderr) -> Progress:
    """A bar when ``stream`` is a terminal, else plain lines written to it."""
    if stream.isatty():
        return TerminalBar(stream)
    return lambda message: print(message, file=stream, flush=True)


def progress_over(items: Sequence[T], what: str, progress: Optional[Progress]) -> Iterator[T]:
    """Yield ``items`` (things with a ``name``), reporting each before it is worked on."""
    if isinstance(progress, TerminalBar):
        from tqdm import tqdm

        with tqdm(items, desc=what, file=progress.stream, unit="case", dynamic_ncols=True) as bar:
            for item in bar:
                bar.set_postfix_str(str(getattr(item, "name", item)))
                yield item
        return
    for index, item in enumerate(items):
        if progress is not None:
            progress(f"{what}: {getattr(item, 'name', item)} ({index + 1}/{len(items)})")
        yield item
