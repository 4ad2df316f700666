"""PNG figures drawn from measured tables, one small function per figure; matplotlib's Agg canvas, no pyplot.

Why no pyplot: pyplot keeps global figure state and picks a GUI backend; a report renderer running inside a
sweep or a CLI must not. Every function takes tidy tables already aggregated by the report modules, draws,
writes the PNG atomically and returns its path. Why an own style: nnU-Net's progress plot sets a global seaborn
style with a large font scale, and a study draws its figures in the same process; each figure is drawn and
saved inside ``STYLE`` (matplotlib's defaults plus the settings below), whatever ran before.

Histogram bins are stored in raw |x| (``bin_low``, ``bin_high``) and drawn at log10 of their own edges. Log
axes drop non-positive and non-finite points (matplotlib would clip them to the axis edge and draw a misleading
value); ``unplottable_on_log`` counts what was dropped so captions can say so.
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import matplotlib.colors
import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from .schema import FP16_MAX, FP16_SMALLEST_SUBNORMAL, ReportInputError, write_bytes
from .tables import format_eps, setting_label

DPI = 90
FP16_LIMITS = (FP16_SMALLEST_SUBNORMAL, FP16_MAX)
SPECIAL_LABELS = {"zero": "zero", "nan": "NaN", "posinf": "+Inf", "neginf": "−Inf"}
# geodiag's figure settings, applied on top of matplotlib's defaults (the "default" style resets every style key).
STYLE = ("default", {
    "font.size": 9.0, "axes.titlesize": 10.0, "axes.labelsize": 9.0, "xtick.labelsize": 8.0, "ytick.labelsize": 8.0,
    "legend.fontsize": 8.0, "figure.titlesize": 10.0, "axes.grid": False, "savefig.bbox": None,
})


def unplottable_on_log(values: pd.Series | np.ndarray) -> int:
    """How many values a log axis cannot show (zero, negative, NaN, Inf)."""
    array = np.asarray(values, dtype=float)
    return int((~np.isfinite(array) | (array <= 0)).sum())


def _log_plottable(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for column in columns:
        values = frame[column].to_numpy(dtype=float)
        mask &= np.isfinite(values) & (values > 0)
    return frame[mask]


def _save(figure: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return write_bytes(path, buffer.getvalue())


def figure_writer(draw: Callable[..., Figure]) -> Callable[..., Path]:
    """``draw(*args)`` -> Figure becomes ``writer(*args, path)`` -> Path of the PNG, drawn and saved in ``STYLE``."""
    @functools.wraps(draw)
    def writer(*args, **kwargs) -> Path:
        *draw_args, path = args
        with matplotlib.style.context(STYLE):
            return _save(draw(*draw_args, **kwargs), path)

    return writer


def log10_edges(bins: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """log10 of each bin's (bin_low, bin_high); an open-ended bin (edge 0 or Inf) is drawn one median bin wide."""
    raw_low, raw_high = bins["bin_low"].to_numpy(dtype=float), bins["bin_high"].to_numpy(dtype=float)
    if not ((raw_low >= 0) & (raw_high > raw_low)).all():
        raise ReportInputError("histogram bins must be magnitudes |x| with 0 <= bin_low < bin_high in every row")
    with np.errstate(divide="ignore"):
        low, high = np.log10(raw_low), np.log10(raw_high)
    widths = (high - low)[np.isfinite(high - low)]
    step = float(np.median(widths)) if widths.size else 1.0
    low = np.where(np.isfinite(low), low, high - step)
    high = np.where(np.isfinite(high), high, low + step)
    return low, high


def log_count_bars(ax, bins: pd.DataFrame) -> None:
    """Bars spanning log10 of each bin's own edges; counts on a log axis floored at 0.5, so a count of 1 shows."""
    low, high = log10_edges(bins)
    ax.bar(low, bins["count"].to_numpy(dtype=float), width=high - low, align="edge", color="#4c72b0",
           edgecolor="none")
    ax.set_yscale("log")
    ax.set_ylim(0.5, 2.0 * float(bins["count"].max()))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _draw_magnitudes(ax, bins: pd.DataFrame, xlim: tuple[float, float]) -> None:
    """Bars at log10 of the bins' edges on a log count axis whose floor (0.5) keeps a count of 1 visible."""
    drawn = bins[bins["count"] > 0]
    if drawn.empty:
        ax.text(0.5, 0.5, "no finite non-zero values", ha="center", va="center", transform=ax.transAxes, color="#777")
    else:
        log_count_bars(ax, drawn)
    for limit in FP16_LIMITS:
        ax.axvline(math.log10(limit), color="#c62828", lw=0.8, ls="--")
    ax.set_xlim(*xlim)


def _shared_log10_range(bins: pd.DataFrame) -> tuple[float, float]:
    """One x range for every panel of a figure: all non-empty bins and the fp16 limits, half a decade of margin."""
    low, high = log10_edges(bins[bins["count"] > 0])
    ends = np.concatenate([low, high, np.log10(FP16_LIMITS)])
    return float(ends.min()) - 0.5, float(ends.max()) + 0.5


def _draw_specials(ax, stats: pd.Series | None) -> None:
    """The exact counts that histograms leave out, in the panel's corner: each non-zero count of 0, NaN, +Inf,
    -Inf, NaN and Inf in red."""
    if stats is None:
        return
    shown = [(column, label) for column, label in SPECIAL_LABELS.items() if int(stats[column])]
    for line, (column, label) in enumerate(shown):
        red = column != "zero"
        ax.text(0.02, 0.95 - 0.17 * line, f"{label}: {int(stats[column]):,}", transform=ax.transAxes, fontsize=7,
                color="#c62828" if red else "#1d1d1f", fontweight="bold" if red else "normal", va="top")


TENSORS_PER_ROW = 2  # each with its value and gradient panel: four panels across


@figure_writer
def tensor_histograms(histograms: pd.DataFrame, tensors: pd.DataFrame, precision: str) -> Figure:
    """Per tensor log10|x| histograms of values and gradients, two tensors to a row, each panel with its exact
    non-zero counts of 0, NaN and ±Inf in its corner; a kind not recorded gets no panel.

    ``histograms`` and ``tensors`` follow HISTOGRAM_COLUMNS / TENSORS_COLUMNS; only ``precision`` is drawn.
    """
    stats = tensors[tensors["precision"] == precision]
    bins = histograms[histograms["precision"] == precision]
    names = list(dict.fromkeys(list(stats["tensor"]) + list(bins["tensor"])))
    rows = max(math.ceil(len(names) / TENSORS_PER_ROW), 1)
    height = 1.0 + 1.3 * rows
    figure = Figure(figsize=(12, height))
    grid = figure.add_gridspec(rows, 2 * TENSORS_PER_ROW, wspace=0.28, hspace=0.75, top=1 - 0.7 / height,
                               bottom=0.45 / height, left=0.05, right=0.99)
    xlim = _shared_log10_range(bins)
    for index, name in enumerate(names):
        row, first_column = divmod(index, TENSORS_PER_ROW)
        for offset, kind in enumerate(("value", "grad")):
            selected = stats[(stats["tensor"] == name) & (stats["kind"] == kind)]
            kind_bins = bins[(bins["tensor"] == name) & (bins["kind"] == kind)]
            if selected.empty and kind_bins.empty:  # not recorded: no panel, rather than an empty one
                continue
            ax = figure.add_subplot(grid[row, 2 * first_column + offset])
            _draw_magnitudes(ax, kind_bins, xlim)
            ax.set_title(f"{name} · {kind}", fontsize=8, loc="left")
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            if row == rows - 1 or index + TENSORS_PER_ROW >= len(names):
                ax.set_xlabel("log10 |x|", fontsize=7)
            _draw_specials(ax, None if selected.empty else selected.iloc[0])
    figure.suptitle(f"Histograms of log10 |x| per tensor ({precision}), count on a log axis; in each panel's corner: "
                    "exact counts of 0, NaN, ±Inf (not in the bins)\nwhere not zero; dashed: fp16 smallest subnormal "
                    "and largest finite value", fontsize=9, y=1 - 0.1 / height, va="top")
    return figure


@figure_writer
def eps_fractions(fractions: pd.DataFrame) -> Figure:
    """One panel per tensor: the share (%) of its elements below each eps (log x), one line per precision; dotted:
    the share of elements whose gradient is exactly zero. ``fractions`` follows EPS_FRACTION_COLUMNS. Precisions
    often agree: each is drawn with its own marker, size and width, so lines on top of each other stay visible."""
    tensors = list(dict.fromkeys(fractions["tensor"]))
    figure = Figure(figsize=(5.5 * max(len(tensors), 1), 4))
    for t_index, tensor in enumerate(tensors, start=1):
        ax = figure.add_subplot(1, len(tensors), t_index)
        subset = fractions[fractions["tensor"] == tensor]
        for index, (precision, group) in enumerate(subset.groupby("precision", sort=False)):
            group = group.sort_values("eps")
            colour, size = f"C{index}", 3 * (3 - index % 3)  # the first drawn is the widest, the last on top
            ax.plot(group["eps"], 100 * group["fraction_below"], marker="os^"[index % 3], ms=size + 3, lw=size / 2,
                    color=colour, mfc="none" if index % 3 == 0 else colour, label=f"{tensor} ({precision}): below eps")
            ax.axhline(100 * float(group["zero_grad_fraction"].iloc[0]), color=colour, ls=":", lw=size / 2,
                       label=f"{tensor} ({precision}): zero gradient")
        ax.set_title(tensor)
        ax.set_xscale("log")
        ax.set_xlabel("eps")
        ax.set_ylabel("elements (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _contiguous_shares(bins: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Bins (only the non-empty ones are stored) as stairs: log10 edges with zero-height steps over the gaps."""
    low, high = log10_edges(bins)
    order = np.argsort(low)
    low, high, counts = low[order], high[order], bins["count"].to_numpy(dtype=float)[order]
    total = counts.sum()
    shares = counts / total if total else counts
    edges = np.unique(np.concatenate([low, high]))
    heights = np.zeros(len(edges) - 1)
    heights[np.searchsorted(edges, low)] = shares
    return heights, edges


@figure_writer
def grad_mag_squared_histograms(hist: pd.DataFrame, eps_values: Sequence[float]) -> Figure:
    """grad_mag_squared distribution per dataset (one panel each), one line per checkpoint, eps as vertical lines.

    ``hist`` follows SWEEP_HIST_COLUMNS (raw bin edges); drawn at log10 of the edges, as the fraction of that
    checkpoint's binned pixels per bin, so the eps lines sit at log10(eps) on the same axis.
    """
    datasets = list(dict.fromkeys(hist["dataset"]))
    figure = Figure(figsize=(8.5 * max(len(datasets), 1), 4.6))
    colours = matplotlib.colormaps["tab20"]
    for index, dataset in enumerate(datasets, start=1):
        ax = figure.add_subplot(1, len(datasets), index)
        subset = hist[(hist["dataset"] == dataset) & (hist["count"] > 0)].sort_values(["epoch", "checkpoint"])
        for c_index, (checkpoint, group) in enumerate(subset.groupby(["epoch", "checkpoint"], sort=False)):
            heights, edges = _contiguous_shares(group)
            ax.stairs(heights, edges, color=colours(c_index % 20), label=f"{checkpoint[1]} (epoch {checkpoint[0]})")
        for eps in eps_values:
            ax.axvline(math.log10(eps), color="#c62828", lw=0.8, ls="--")
            ax.text(math.log10(eps), 1.01, format_eps(eps), transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", rotation=90, fontsize=7, color="#c62828")
        ax.set_title(f"dataset {dataset}", pad=26)
        ax.set_xlabel("log10 grad_mag_squared")
        ax.set_ylabel("fraction of binned pixels per bin")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


@figure_writer
def bias_gradient_tradeoff(headline: pd.DataFrame, recommended: tuple[str, float] | None) -> Figure:
    """x: median |bias_compactness| in %, y: max grad_max, log-log; one line per stabiliser through its eps values."""
    figure = Figure(figsize=(7.5, 5))
    ax = figure.add_subplot()
    x, y = "bias (%)", "max_grad_max"  # percent, the unit the report's text gives biases in
    headline = headline.assign(**{x: 100 * headline["median_abs_bias_compactness"]})
    for index, (stabilizer, group) in enumerate(headline.groupby("stabilizer", sort=False)):
        group = _log_plottable(group.sort_values("eps"), (x, y))
        if group.empty:
            continue
        finite = group["nonfinite"] == 0
        ax.plot(group[x], group[y], color=f"C{index}", marker="o", label=stabilizer)
        ax.scatter(group.loc[~finite, x], group.loc[~finite, y], marker="x", s=90, color="#c62828", zorder=3)
        for _, row in group.iterrows():
            ax.annotate(format_eps(row['eps']), (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if recommended is not None:
        chosen = headline[(headline["stabilizer"] == recommended[0]) & np.isclose(headline["eps"], recommended[1])]
        chosen = _log_plottable(chosen, (x, y))
        if not chosen.empty:
            ax.scatter(chosen[x], chosen[y], marker="*", s=260, facecolor="none", edgecolor="black", zorder=4,
                       label="recommended")
    ax.scatter([], [], marker="x", color="#c62828", label="non-finite somewhere")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("median |relative compactness bias| vs fp64 eps→0 reference (%)")
    ax.set_ylabel("max |dL/dlogit|")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _colour_and_style_legend(ax, colours: dict[str, str], styles: dict[str, str]) -> None:
    """One legend entry per colour (what the colour means) and per line style (the dataset), outside the axes on
    the right, instead of one entry per line: a sweep has datasets × settings lines."""
    handles = [Line2D([], [], color=colour, marker="o", label=label) for label, colour in colours.items()]
    handles += [Line2D([], [], color="black", ls=style, label=label) for label, style in styles.items()]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              ncol=1 + (len(handles) - 1) // 22)


@figure_writer
def epoch_evolution(by_epoch: pd.DataFrame, fraction_eps: Sequence[float]) -> Figure:
    """Left: median frac_below_eps over epochs at ``fraction_eps``; right: max grad_max over epochs per setting.

    Colour: the eps (left) or the setting (right); line style: the dataset. ``by_epoch`` is the headline table
    grouped by dataset and epoch (see ``recommendation.headline_table``).
    """
    figure = Figure(figsize=(14, 5.2))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    line_styles = ["-", "--", ":", "-."]
    palette = matplotlib.colormaps["tab20"]
    settings = by_epoch[["stabilizer", "eps"]].drop_duplicates().sort_values(["stabilizer", "eps"])
    setting_colours = {setting_label(s, e): matplotlib.colors.to_hex(palette(i % 20))
                       for i, (s, e) in enumerate(settings.itertuples(index=False))}
    eps_colours = {f"eps {format_eps(eps)}": f"C{i}" for i, eps in enumerate(fraction_eps)}
    dataset_styles = {}
    for d_index, dataset in enumerate(dict.fromkeys(by_epoch["dataset"])):
        subset = by_epoch[by_epoch["dataset"] == dataset]
        style = dataset_styles[f"dataset {dataset}"] = line_styles[d_index % len(line_styles)]
        for eps, colour in zip(fraction_eps, eps_colours.values()):
            rows = subset[np.isclose(subset["eps"], eps)].groupby("epoch")["median_frac_below_eps"].median()
            left.plot(rows.index, rows.to_numpy(), marker="o", ls=style, color=colour,
                      label=f"{dataset}: eps {format_eps(eps)}")
        for (stabilizer, eps), group in subset.groupby(["stabilizer", "eps"], sort=True):
            group = _log_plottable(group.sort_values("epoch"), ("max_grad_max",))
            label = setting_label(stabilizer, eps)
            right.plot(group["epoch"], group["max_grad_max"], marker="o", ls=style, color=setting_colours[label],
                       label=f"{dataset}: {label}")
    left.set_xlabel("epoch")
    left.set_ylabel("median share of pixels with\ngrad_mag_squared < eps")
    left.set_ylim(-0.02, 1.02)
    right.set_xlabel("epoch")
    right.set_ylabel("max |dL/dlogit|")
    right.set_yscale("log")
    for ax, colours in ((left, eps_colours), (right, setting_colours)):
        # epochs are whole: with one checkpoint the axis was ticked 1.975, 2.025
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        _colour_and_style_legend(ax, colours, dataset_styles)
    figure.tight_layout()
    return figure


@figure_writer
def dataset_comparison(by_dataset: pd.DataFrame) -> Figure:
    """Grouped bars per setting, one bar per dataset: median |bias_compactness| and max grad_max (log y)."""
    figure = Figure(figsize=(13, 4.5))
    datasets = list(dict.fromkeys(by_dataset["dataset"]))
    settings = by_dataset[["stabilizer", "eps"]].drop_duplicates().sort_values(["stabilizer", "eps"])
    labels = [setting_label(s, e) for s, e in settings.itertuples(index=False)]
    width = 0.8 / max(len(datasets), 1)
    by_dataset = by_dataset.assign(bias_percent=100 * by_dataset["median_abs_bias_compactness"])
    for p_index, (column, title) in enumerate((("bias_percent", "median |compactness bias| (%)"),
                                               ("max_grad_max", "max |dL/dlogit|"))):
        ax = figure.add_subplot(1, 2, p_index + 1)
        for d_index, dataset in enumerate(datasets):
            merged = settings.merge(by_dataset[by_dataset["dataset"] == dataset], on=["stabilizer", "eps"], how="left")
            values = merged[column].to_numpy(dtype=float)
            values = np.where(np.isfinite(values) & (values > 0), values, np.nan)
            ax.bar(np.arange(len(labels)) + d_index * width, values, width=width, label=f"dataset {dataset}")
        ax.set_xticks(np.arange(len(labels)) + width * (len(datasets) - 1) / 2, labels, rotation=45, ha="right",
                      fontsize=8)
        ax.set_yscale("log")
        positive = _log_plottable(by_dataset, (column,))[column]
        if not positive.empty:
            ax.set_ylim(bottom=positive.min() / 10)  # a decade below the smallest bar, not matplotlib's tight fit
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


@figure_writer
def training_curves(runs: pd.DataFrame) -> Figure:
    """Epoch-mean training loss per run (one panel per dataset), with each run's switch-on epoch dashed."""
    datasets = list(dict.fromkeys(runs["dataset"]))
    figure = Figure(figsize=(6.0 * len(datasets), 3.6))
    for index, dataset in enumerate(datasets, start=1):
        ax = figure.add_subplot(1, len(datasets), index)
        for name, frame in runs[runs["dataset"] == dataset].groupby("run", sort=False):
            line, = ax.plot(frame["epoch"], frame["train_loss"], marker="o", ms=3, label=name)
            ax.axvline(frame["warmup"].iloc[0] - 0.5, color=line.get_color(), ls="--", lw=0.8)
        ax.set_title(f"dataset {dataset}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel("train loss (epoch mean)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure
