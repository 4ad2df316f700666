"""The report sections on the loss that was analysed and its automatic-tap sites (risky ops by source line).

Reads ``loss``, ``sites`` and ``masked_nonfinite`` of summary.json (rows already sorted by risk within each
precision and pass by the producer) and DIR/site_histograms.csv: one figure per sqrt or clamp site, its input
|x| drawn at log10 of the bin edges as reports/figures.py draws histograms, with the clamp's numeric bounds as
dashed lines (a value below a clamp's min is raised to it and passes no gradient).

The sites named are the user's lines: a most-likely-culprit list headed by geodiag's own internals (an area ramp
at its bound, a floor, a division) points a user at code they cannot change. For geodiag's built-in loss the
section names its terms' stabilisers in the loss's own words (the compactness sqrt, its eps) instead; for a
``--loss``, calls made in geodiag's package code (its loss, called from the user's) are left out and counted.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from . import figures, seed
from .html import Figure, Section
from .tables import format_eps, markdown_table

HISTOGRAMS_FILE = "site_histograms.csv"
SITE_HISTOGRAM_COLUMNS = ("precision", "pass", "site", "op", "bin_low", "bin_high", "count")
SITE_TABLE_COLUMNS = ("precision", "pass", "site", "op", "calls", "nonfinite_forward", "nonfinite_backward",
                      "masked_calls", "at_min_fraction", "at_max_fraction", "at_bound_fraction", "max_abs_grad",
                      "max_local_derivative", "host_syncs", "bounds")
# geodiag's own package code: its top-level folders (a user's file shipped inside geodiag as data, in a folder
# without __init__.py such as the study's seed replica, is not).
_GEODIAG_ROOT = Path(__file__).resolve().parent.parent
_GEODIAG_PACKAGES = ("losses", "diagnostics", "reports")
# What each of geodiag's sqrt stabilisers computes from the quantity x under its sqrt.
STABILISER_FORMULAS = {"clamp": "sqrt(clamp(x, min=eps))", "additive": "sqrt(x + eps)",
                       "shifted": "sqrt(x + eps) − sqrt(eps)"}


def loss_section(summary: dict) -> Optional[Section]:
    loss = summary.get("loss")
    if not isinstance(loss, dict):
        return None
    body = (f"`{loss.get('spec')}`, fed {loss.get('input')}; chosen by: {loss.get('why')}.\n\nIt was evaluated on every "
            "case's training patches (gradients through the network) and on its whole image, under automatic "
            "taps: every sqrt, pow, div, log, exp, clamp, ... call it made is a site named by its source line.")
    return Section("Loss analysed", body)


def _bounds_text(bounds) -> str:
    pairs = [f"[{'–' if low is None else format_eps(low)}, {'–' if high is None else format_eps(high)}]"
             for low, high in (bounds or [])]
    return " ".join(pairs)


def geodiag_file(site: str) -> bool:
    """Whether a site (``file:line`` as the sites table names it: relative to the working directory when inside
    it) is in geodiag's package code. A relative name that is no file here is looked up in geodiag's folder."""
    path = Path(site.rsplit(":", 1)[0])
    if not path.is_absolute():
        path = Path.cwd() / path if (Path.cwd() / path).is_file() else _GEODIAG_ROOT / path
    path = path.resolve()
    try:
        inside = path.relative_to(_GEODIAG_ROOT).parts[0] in _GEODIAG_PACKAGES
    except (ValueError, IndexError):
        return False
    return inside and (path.parent / "__init__.py").is_file()


def _builtin(summary: dict) -> bool:
    return str((summary.get("loss") or {}).get("spec", "")).startswith("GeometricLoss(")


def _nonfinite(rows: list[dict]) -> int:
    return sum((r.get("nonfinite_forward") or 0) + (r.get("nonfinite_backward") or 0) for r in rows)


def _settings(summary: dict) -> dict:
    settings = summary.get("settings")
    return settings if isinstance(settings, dict) else {}


def _stabiliser_table(settings: dict) -> str:
    """geodiag's terms and the stabiliser each puts under its sqrt, in the loss's own words."""
    name, eps = settings.get("stabilizer"), settings.get("eps")
    formula = STABILISER_FORMULAS.get(name, "not recorded")
    units = {"normalised": f"normalised s (1/{seed.UNITS_FACTOR:g} of the seed's raw-Sobel s)",
             "seed": "the seed's raw-Sobel s"}.get(settings.get("sobel"), "s (units not recorded)")
    rows = [("compactness", f"the perimeter's sqrt(s), s = gx² + gy² per pixel, on {units}", f"{name}: {formula}",
             None if eps is None else format_eps(eps), "compactness.sqrt_input")]
    if settings.get("aspect_formula") == "seed":
        rows.append(("aspect", "the seed formula's sqrt(tr² − 4 det) of the second moments, in pixel units",
                     f"{name}: {formula}", None if eps is None else format_eps(eps), "aspect.sqrt_input"))
    else:
        rows.append(("aspect", "none: its anisotropy is a sum of squares over tr², with no sqrt", "–", None,
                     "aspect.discriminant"))
    return markdown_table(pd.DataFrame(rows, columns=["term", "what is stabilised", "stabiliser", "eps",
                                                      "tap of its input"]))


def _builtin_section(summary: dict, rows: list[dict]) -> Section:
    internal = len({r.get("site") for r in rows})
    body = ("geodiag's own loss, in its own terms: the stabiliser each term puts under a sqrt, as analysed. The "
            "values reaching it are its tap's in the Tensors sections (its taps compactness.grad_mag_squared, "
            "compactness.sqrt_input, aspect.discriminant, ... by name), and the share below each eps is in "
            f"Clamped tensors below eps. Its {internal} call sites at geodiag's own source lines are internals, "
            "left out of this report: check-bounds tests them against analytic bounds.\n\n"
            + _stabiliser_table(_settings(summary)))
    bad = _nonfinite(rows)
    if bad:
        body += (f"\n\n{bad} non-finite values came out of those internal calls: Provenance names the first op; "
                 "in geodiag's own loss that is a bug of geodiag's.")
    return Section("Sites (automatic taps)", body, tone="bad" if bad else "")


def sites_section(summary: dict) -> Optional[Section]:
    rows = summary.get("sites")
    if not rows:
        return None
    if _builtin(summary):
        return _builtin_section(summary, rows)
    theirs = [r for r in rows if not geodiag_file(str(r.get("site", "")))]
    frame = pd.DataFrame(theirs).reindex(columns=list(SITE_TABLE_COLUMNS))
    frame["bounds"] = frame["bounds"].map(lambda b: _bounds_text(b) if isinstance(b, list) else "")
    frame = frame.astype(object).where(frame.notna(), None)
    body = ("Risky calls of the loss by source line, most likely culprit first within each precision and pass "
            "(non-finite gradients sent back, non-finite outputs, masked non-finite outputs, largest share of "
            "elements held at a clamp bound, largest local derivative, host syncs). `at_bound_fraction`: share of "
            "the clamp's elements moved to a bound, which pass zero gradient; `max_abs_grad`: largest |gradient| "
            "arriving at the op's output; `host_syncs`: calls that read a device value back (a stall each on a "
            "GPU).\n\n" + (markdown_table(frame) if theirs else "No call of the loss was made at a line of yours."))
    left_out = sorted({r.get("site") for r in rows} - {r.get("site") for r in theirs})
    if left_out:
        body += (f"\n\n{len(left_out)} call site(s) in geodiag's package code, which your loss calls, are left out "
                 f"(with {_nonfinite([r for r in rows if r not in theirs])} non-finite values): the lines named "
                 "are yours; geodiag's are tested by check-bounds.")
    return Section("Sites (automatic taps)", body, tone="bad" if _nonfinite(rows) else "")


def masked_section(summary: dict) -> Optional[Section]:
    if "masked_nonfinite" not in summary:
        return None
    masked = summary.get("masked_nonfinite") or []
    if not masked:
        return Section("Masked non-finite values", "No op inside the loss produced NaN/Inf in a call whose final "
                                                   "value was finite.")
    table = pd.DataFrame(masked).reindex(columns=["precision", "pass", "site", "op", "calls"])
    return Section("Masked non-finite values",
                   "Ops whose output held NaN/Inf in loss calls that still returned a finite value: a guard "
                   "(``if isnan: return pred.sum() * 0``) replaced the term, so training saw a zero gradient "
                   "instead of the failure.\n\n" + markdown_table(table), tone="warn")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


@figures.figure_writer
def site_histogram(bins: pd.DataFrame, site: str, op: str, bounds: list, at_bound: dict) -> MplFigure:
    """One panel per precision (rows) and pass (columns): |input| of the site on log10 bin edges, count on a log
    axis; dashed: each positive numeric bound of the clamp. |input| drops signs, so bars can sit far from a bound
    that holds most elements: each panel's title gives the share held at the bound (``at_bound``: (precision,
    pass) -> share), which the bars alone would hide."""
    precisions, passes = list(dict.fromkeys(bins["precision"])), list(dict.fromkeys(bins["pass"]))
    panels = [(precision, pass_name) for precision in precisions for pass_name in passes]
    figure = MplFigure(figsize=(4.6 * len(passes), 2.9 * len(precisions) + 0.4))
    drawn = bins[bins["count"] > 0]
    low, high = figures.log10_edges(drawn) if len(drawn) else (np.zeros(0), np.zeros(0))
    lines = sorted({v for pair in bounds for v in pair if v is not None and v > 0})
    ends = np.concatenate([low, high, np.log10(lines)]) if len(low) or lines else np.array([0.0])
    xlim = (float(ends.min()) - 0.5, float(ends.max()) + 0.5)
    for index, (precision, pass_name) in enumerate(panels, start=1):
        ax = figure.add_subplot(len(precisions), len(passes), index)
        panel = drawn[(drawn["precision"] == precision) & (drawn["pass"] == pass_name)]
        if panel.empty:
            ax.text(0.5, 0.5, "no finite non-zero input", ha="center", va="center", transform=ax.transAxes)
        else:
            figures.log_count_bars(ax, panel)
        for value in lines:
            ax.axvline(math.log10(value), color="#c62828", lw=0.9, ls="--")
            ax.text(math.log10(value), 1.01, f"bound {format_eps(value)}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7, color="#c62828")
        ax.set_xlim(*xlim)
        ax.set_xlabel(f"log10 |input of {op}|")
        ax.set_ylabel("elements per bin")
        held = at_bound.get((precision, pass_name))
        share = "" if held is None else f": {100 * held:.3g}% at the bound"
        ax.set_title(f"{precision}, {pass_name.replace('_', ' ')}{share}", pad=14)
    figure.suptitle(site, fontsize=9)
    figure.tight_layout()
    return figure


def figure_sections(directory: Path, summary: dict, histograms: Optional[pd.DataFrame]) -> list[Section]:
    if histograms is None or histograms.empty:
        return []
    bounds = {(r["site"], r["op"]): r.get("bounds") or [] for r in summary.get("sites") or []}
    held: dict[tuple[str, str], dict] = {}
    for r in summary.get("sites") or []:
        if r.get("op") == "clamp" and r.get("at_bound_fraction") is not None:
            held.setdefault((r["site"], r["op"]), {})[(r.get("precision"), r.get("pass"))] = r["at_bound_fraction"]
    figure_list = []
    for (site, op), group in histograms.groupby(["site", "op"], sort=False):
        if _builtin(summary) or geodiag_file(site):
            continue
        site_bounds = bounds.get((site, op), [])
        path = site_histogram(group, site, op, site_bounds, held.get((site, op), {}),
                              directory / "figures" / f"site_{_slug(site)}_{op}.png")
        drawn = _bounds_text(site_bounds) if site_bounds else "none (a sqrt has no bound of its own)"
        figure_list.append(Figure(path, f"`{site}` ({op}): histogram of log10 |input| (bars span log10 of each "
                                        f"bin's edges; count on a log axis; zeros and NaN/Inf are not in the "
                                        f"bins). Dashed: the positive numeric bounds [min, max]: {drawn}. A clamp's panel title gives the "
                                        "share of its elements held at the bound (zero gradient there), which the "
                                        "unsigned bars do not show."))
    return [Section("Site histograms", "Inputs of every sqrt and clamp site, with the clamp's bounds drawn in.",
                    figures=figure_list)] if figure_list else []


def sections(directory: Path, summary: dict, histograms: Optional[pd.DataFrame]) -> list[Section]:
    """Every section on the analysed loss and its sites, in reading order (absent parts left out)."""
    found = [loss_section(summary), sites_section(summary), masked_section(summary)]
    return [s for s in found if s is not None] + figure_sections(directory, summary, histograms)
