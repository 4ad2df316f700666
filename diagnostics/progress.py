"""Progress of long runs (cases, epochs): a tqdm bar on a terminal, one plain line per unit otherwise (logs, CI
have no use for a redrawn bar)."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def counter(total: int, label: str, unit: str, log: Callable[[str], None],
            stream: Optional[TextIO] = None) -> Iterator[Callable[[], None]]:
    """Yields ``advance()``, called once per finished unit of work (an epoch): a tqdm bar on ``stream`` (stderr)
    when it is a terminal, otherwise one plain line per unit through ``log``."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        from tqdm import tqdm

        # mininterval 0: units are slow (an epoch, a case), every one is worth a redraw
        with tqdm(total=total, desc=label, unit=unit, file=stream, leave=False, mininterval=0) as bar:
            yield lambda: bar.update(1)
        return
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        log(f"{label}: {unit} {done}/{total}")

    yield advance
