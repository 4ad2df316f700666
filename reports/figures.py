"""PNG figures drawn from measured tables, one small function per figure; matplotlib's Agg canvas, no pyplot.

Why no pyplot: pyplot keeps global figure state and picks a GUI backend; a report renderer running inside a
sweep or a CLI must not. Every function takes tidy tables already aggregated by the report modules, draws,
writes the PNG atomically and returns its path. Log axes drop non-positive and non-finite points (matplotlib
would clip them to the axis edge and draw a misleading value); ``unplottable_on_log`` counts what was dropped so
captions can say so.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .tables import format_eps, setting_label, write_bytes

DPI = 90
FP16_MAX = 65504.0
FP16_SMALLEST_SUBNORMAL = 2.0 ** -24
SPECIAL_LABELS = {"zero": "zero", "nan": "NaN", "posinf": "+Inf", "neginf": "−Inf"}


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


def _draw_magnitudes(ax, bins: pd.DataFrame) -> None:
    drawn = bins[bins["count"] > 0]
    if drawn.empty:
        ax.text(0.5, 0.5, "no finite non-zero values", ha="center", va="center", transform=ax.transAxes, color="#777")
    else:
        ax.bar(drawn["bin_low"], drawn["count"], width=drawn["bin_high"] - drawn["bin_low"], align="edge",
               color="#4c72b0", edgecolor="none")
        ax.set_yscale("log")
    for limit in (FP16_SMALLEST_SUBNORMAL, FP16_MAX):
        ax.axvline(math.log10(limit), color="#c62828", lw=0.8, ls="--")


def _draw_specials(ax, stats: pd.Series | None) -> None:
    """The exact counts that histograms leave out, as text: grey when zero, red for any NaN or Inf."""
    ax.axis("off")
    if stats is None:
        return
    for line, (column, label) in enumerate(SPECIAL_LABELS.items()):
        count = int(stats[column])
        colour = "#c62828" if count and column != "zero" else ("#1d1d1f" if count else "#9a9a9a")
        ax.text(0.0, 0.9 - 0.24 * line, f"{label}: {count:,}", transform=ax.transAxes, fontsize=8, color=colour,
                fontweight="bold" if colour == "#c62828" else "normal", va="top")


def tensor_histograms(histograms: pd.DataFrame, tensors: pd.DataFrame, precision: str, path: str | Path) -> Path:
    """Per tensor (rows) log10|x| histograms of values and gradients, each with its exact 0/NaN/±Inf counts beside.

    ``histograms`` and ``tensors`` follow HISTOGRAM_COLUMNS / TENSORS_COLUMNS; only ``precision`` is drawn.
    """
    stats = tensors[tensors["precision"] == precision]
    bins = histograms[histograms["precision"] == precision]
    names = list(dict.fromkeys(list(stats["tensor"]) + list(bins["tensor"])))
    figure = Figure(figsize=(12, 0.6 + 1.55 * max(len(names), 1)))
    grid = figure.add_gridspec(max(len(names), 1), 4, width_ratios=[5, 1.1, 5, 1.1], wspace=0.25, hspace=0.7)
    for row, name in enumerate(names):
        for column, kind in enumerate(("value", "grad")):
            hist_ax = figure.add_subplot(grid[row, 2 * column])
            special_ax = figure.add_subplot(grid[row, 2 * column + 1])
            selected = stats[(stats["tensor"] == name) & (stats["kind"] == kind)]
            kind_bins = bins[(bins["tensor"] == name) & (bins["kind"] == kind)]
            if selected.empty and kind_bins.empty:
                hist_ax.text(0.5, 0.5, f"{kind}: not recorded", ha="center", va="center", transform=hist_ax.transAxes,
                             color="#777")
                hist_ax.set_xticks([])
                hist_ax.set_yticks([])
            else:
                _draw_magnitudes(hist_ax, kind_bins)
            hist_ax.set_title(f"{name} · {kind}", fontsize=9, loc="left")
            hist_ax.tick_params(labelsize=7)
            _draw_specials(special_ax, None if selected.empty else selected.iloc[0])
    figure.suptitle(f"log10 |x| per tensor ({precision}); beside: exact counts of 0, NaN, ±Inf (not in the bins); "
                    "dashed: fp16 smallest subnormal and largest finite value", fontsize=10)
    return _save(figure, path)


def eps_fractions(fractions: pd.DataFrame, path: str | Path) -> Path:
    """Fraction of grad_mag_squared pixels below each eps (log x), one line per precision; dotted: zero-gradient share."""
    figure = Figure(figsize=(7, 4))
    ax = figure.add_subplot()
    for index, (precision, group) in enumerate(fractions.groupby("precision", sort=False)):
        group = group.sort_values("eps")
        colour = f"C{index}"
        ax.plot(group["eps"], group["fraction_below"], marker="o", color=colour, label=f"{precision}: below eps")
        ax.axhline(float(group["zero_grad_fraction"].iloc[0]), color=colour, ls=":",
                   label=f"{precision}: zero gradient")
    ax.set_xscale("log")
    ax.set_xlabel("eps")
    ax.set_ylabel("fraction of pixels")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def grad_mag_squared_histograms(hist: pd.DataFrame, eps_values: Sequence[float], path: str | Path) -> Path:
    """grad_mag_squared distribution per dataset (one panel each), one line per checkpoint, eps as vertical lines.

    ``hist`` follows SWEEP_HIST_COLUMNS; counts are shown as the fraction of that checkpoint's pixels per bin.
    """
    datasets = list(dict.fromkeys(hist["dataset"]))
    figure = Figure(figsize=(6 * max(len(datasets), 1), 4.2))
    for index, dataset in enumerate(datasets, start=1):
        ax = figure.add_subplot(1, len(datasets), index)
        subset = hist[hist["dataset"] == dataset].sort_values(["epoch", "checkpoint", "bin_low"])
        for checkpoint, group in subset.groupby(["epoch", "checkpoint"], sort=False):
            total = group["count"].sum()
            shares = group["count"] / total if total else group["count"]
            ax.stairs(shares.to_numpy(), np.append(group["bin_low"].to_numpy(), group["bin_high"].iloc[-1]),
                      label=f"{checkpoint[1]} (epoch {checkpoint[0]})")
        for eps in eps_values:
            ax.axvline(math.log10(eps), color="#c62828", lw=0.8, ls="--")
            ax.text(math.log10(eps), 1.01, format_eps(eps), transform=ax.get_xaxis_transform(), ha="center", fontsize=7,
                    color="#c62828")
        ax.set_title(f"dataset {dataset}", fontsize=10, pad=14)
        ax.set_xlabel("log10 grad_mag_squared")
        ax.set_ylabel("fraction of pixels per bin")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def bias_gradient_tradeoff(headline: pd.DataFrame, path: str | Path, recommended: tuple[str, float] | None) -> Path:
    """x: median |bias_compactness|, y: max grad_max, log-log; one line per stabiliser through its eps values."""
    figure = Figure(figsize=(7.5, 5))
    ax = figure.add_subplot()
    x, y = "median_abs_bias_compactness", "max_grad_max"
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
    ax.set_xlabel("median |relative compactness bias| vs fp64 eps→0 reference")
    ax.set_ylabel("max |dL/dlogit|")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def epoch_evolution(by_epoch: pd.DataFrame, fraction_eps: Sequence[float], path: str | Path) -> Path:
    """Left: median frac_below_eps over epochs at ``fraction_eps``; right: max grad_max over epochs per setting.

    ``by_epoch`` is the headline table grouped by dataset and epoch (see ``recommendation.headline_table``).
    """
    figure = Figure(figsize=(13, 4.5))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    styles = ["-", "--", ":", "-."]
    datasets = list(dict.fromkeys(by_epoch["dataset"]))
    for d_index, dataset in enumerate(datasets):
        subset = by_epoch[by_epoch["dataset"] == dataset]
        style = styles[d_index % len(styles)]
        for e_index, eps in enumerate(fraction_eps):
            rows = subset[np.isclose(subset["eps"], eps)].groupby("epoch")["median_frac_below_eps"].median()
            left.plot(rows.index, rows.to_numpy(), marker="o", ls=style, color=f"C{e_index}",
                      label=f"{dataset}: eps {format_eps(eps)}")
        for s_index, ((stabilizer, eps), group) in enumerate(subset.groupby(["stabilizer", "eps"], sort=True)):
            group = _log_plottable(group.sort_values("epoch"), ("max_grad_max",))
            right.plot(group["epoch"], group["max_grad_max"], marker="o", ls=style, color=f"C{s_index % 10}",
                       label=f"{dataset}: {setting_label(stabilizer, eps)}")
    left.set_xlabel("epoch")
    left.set_ylabel("pixels with grad_mag_squared < eps (median share)")
    left.set_ylim(-0.02, 1.02)
    right.set_xlabel("epoch")
    right.set_ylabel("max |dL/dlogit|")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def dataset_comparison(by_dataset: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars per setting, one bar per dataset: median |bias_compactness| and max grad_max (log y)."""
    figure = Figure(figsize=(13, 4.5))
    datasets = list(dict.fromkeys(by_dataset["dataset"]))
    settings = by_dataset[["stabilizer", "eps"]].drop_duplicates().sort_values(["stabilizer", "eps"])
    labels = [setting_label(s, e) for s, e in settings.itertuples(index=False)]
    width = 0.8 / max(len(datasets), 1)
    for p_index, (column, title) in enumerate((("median_abs_bias_compactness", "median |compactness bias|"),
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
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def training_curves(runs: pd.DataFrame, path: str | Path) -> Path:
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
        ax.set_ylabel("train loss (epoch mean)")
        ax.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
