"""One report model, two renderings: Markdown with linked figures, and a self-contained HTML page.

Why self-contained: a report is mailed, attached to an issue or opened from a cluster's scratch disk; the HTML
embeds its PNGs as base64 ``data:`` URIs and its style inline, so it references no file and no network.
Tables sit in a horizontally scrolling box and their cells may break after an underscore or a dot before a letter,
so a wide table neither widens the page nor, at a common window width, hides columns behind a scrollbar. Section bodies are CommonMark with pipe tables, rendered by markdown-it-py with raw HTML escaped, so a
numbered list is a list and text from a user's file cannot inject markup.
"""
from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from markdown_it import MarkdownIt

from .schema import write_text

TONES = ("", "ok", "warn", "bad")

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1240px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
section.ok, section.warn, section.bad { border-left: 6px solid; padding: 0.2em 1em 0.6em; border-radius: 3px; }
section.ok { border-color: #2e7d32; background: #f1f8f1; }
section.warn { border-color: #ed6c02; background: #fff6ec; }
section.bad { border-color: #c62828; background: #fdf0f0; }
div.table { overflow-x: auto; max-width: 100%; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.82em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.4em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
code { background: #f3f3f3; padding: 0 0.25em; border-radius: 3px; overflow-wrap: anywhere; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #555; }
"""


@dataclass(frozen=True)
class Figure:
    """A PNG on disk and the sentence that says what it shows."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    """A titled part of a report: Markdown-subset body, then figures; ``tone`` colours a verdict box.

    ``numbered`` sections are numbered 1, 2, ... in the order they are rendered, so a section a report leaves
    out (a comparison that does not apply) leaves no gap in the numbers.
    """

    title: str
    body: str = ""
    figures: Sequence[Figure] = field(default_factory=tuple)
    tone: str = ""
    numbered: bool = False

    def __post_init__(self) -> None:
        if self.tone not in TONES:
            raise ValueError(f"unknown tone {self.tone!r}; choose one of {TONES}")


def _headings(sections: Sequence[Section]) -> list[str]:
    """Each section's heading as rendered: numbered ones prefixed with their rank among the numbered."""
    headings, number = [], 0
    for section in sections:
        number += section.numbered
        headings.append(f"{number}. {section.title}" if section.numbered else section.title)
    return headings


def to_markdown(title: str, sections: Sequence[Section], directory: Path) -> str:
    """The report as Markdown, figures linked relative to ``directory`` (where report.md is written)."""
    parts = [f"# {title}"]
    for section, heading in zip(sections, _headings(sections)):
        parts.append(f"## {heading}")
        if section.body:
            parts.append(section.body.strip())
        for figure in section.figures:
            link = Path(os.path.relpath(figure.path, directory)).as_posix()
            parts.append(f"![{figure.caption}]({link})\n\n*{figure.caption}*")
    return "\n\n".join(parts) + "\n"


def to_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one HTML page with every figure embedded as a data URI."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section, heading in zip(sections, _headings(sections)):
        tone = f' class="{section.tone}"' if section.tone else ""
        body.append(f"<section{tone}>\n<h2>{html.escape(heading)}</h2>")
        if section.body:
            body.append(markdown_to_html(section.body))
        body.extend(_figure_html(figure) for figure in section.figures)
        body.append("</section>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body) + "\n</body>\n</html>\n"
    )


@dataclass(frozen=True)
class RenderedReport:
    """What a report renderer wrote: the two renderings, the figures and the data files (JSON, tables)."""

    markdown: Path
    html: Path
    figures: list[Path]
    data: list[Path]


def write_report(directory: str | Path, title: str, sections: Sequence[Section],
                 data: Sequence[Path] = ()) -> RenderedReport:
    """Write ``report.md`` and ``report.html`` into ``directory``; ``data`` lists files written beside them."""
    directory = Path(directory)
    return RenderedReport(
        markdown=write_text(directory / "report.md", to_markdown(title, sections, directory)),
        html=write_text(directory / "report.html", to_html(title, sections)),
        figures=[Path(figure.path) for section in sections for figure in section.figures],
        data=list(data),
    )


def _figure_html(figure: Figure) -> str:
    encoded = base64.b64encode(Path(figure.path).read_bytes()).decode("ascii")
    caption = html.escape(figure.caption)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _breakable_cells(page: str) -> str:
    """Let table cells break after an underscore or a dot before a letter (fp16_<wbr>underflow,
    compactness.<wbr>term); numbers such as 6.03e-18 have no other break opportunity, so they stay whole. Only text
    between tags changes, never a tag."""
    def cell(match: re.Match) -> str:
        return re.sub(r"(>[^<]*)", lambda text: re.sub(r"([_.])(?=[A-Za-z])", r"\1<wbr>", text.group(1)),
                      match.group(0))
    return re.sub(r"<t[dh]>.*?</t[dh]>", cell, page, flags=re.S)


_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
_MARKDOWN.add_render_rule("table_open", lambda *args: '<div class="table"><table>\n')
_MARKDOWN.add_render_rule("table_close", lambda *args: "</table></div>\n")


def markdown_to_html(text: str) -> str:
    """Report bodies (CommonMark with pipe tables, raw HTML escaped) as HTML; tables in a scrolling box."""
    return _breakable_cells(_MARKDOWN.render(text))
