"""The study report's key figure: the distribution of the replica's s (the seed's units) untrained, after the
first epoch and at the switch-on, against the seed's two clamps and the seed's own shares. It carries the study's
conclusion: a prior whose sqrt clamps hold almost every pixel at the bound passes almost no gradient.

Drawn from s_distribution.csv (the pixels of the measured cases in quarter-decade bins of s, per run and state);
runs of one configuration are pooled over their seeds, and the band is the range of the seeds' own curves.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import seed
from .figures import figure_writer
from .schema import UNTRAINED
from .tables import format_eps

# where s = 0 and 0 < s < 1e-16 are drawn: the figure's left edge
LEFT = 1e-16


def _pooled(frame: pd.DataFrame) -> pd.DataFrame:
    """One distribution from the rows of several runs or seeds: pixels per bin, summed."""
    return frame.groupby(["lower", "upper"], sort=True, as_index=False)["pixels"].sum()


def cumulative_share(distribution: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The distribution function read at each bin's upper edge: x (the edge; s = 0 at ``LEFT``) and the share of
    pixels with s below it (%)."""
    bins = _pooled(distribution)
    finite = bins[np.isfinite(bins["upper"])]
    below = np.cumsum(bins["pixels"].to_numpy(dtype=float))[: len(finite)] / bins["pixels"].sum() * 100
    return np.maximum(finite["upper"].to_numpy(dtype=float), LEFT), below


def _per_decade(distribution: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, float]:
    """The quarter decades' edges from ``LEFT`` and each one's share of pixels (%), and the share (%) with s = 0 or
    below ``LEFT``, which no bar shows."""
    bins = _pooled(distribution)
    share = bins["pixels"].to_numpy(dtype=float) / bins["pixels"].sum() * 100
    lower, upper = bins["lower"].to_numpy(dtype=float), bins["upper"].to_numpy(dtype=float)
    inner = (lower >= LEFT) & np.isfinite(upper)
    return np.append(lower[inner], upper[inner][-1]), share[inner], float(share[upper <= LEFT].sum())


@figure_writer
def s_distribution(distribution: pd.DataFrame, runs: Mapping[str, tuple[str, str]]) -> Figure:
    """Per dataset (columns): the share of pixels per quarter decade of s (top) and below each s (bottom, %),
    untrained (grey, pooled over the runs), after epoch 0 (dotted) and at the switch-on (solid, band: range over
    seeds) per configuration; the seed's clamps as vertical lines, its shares at its switch-on as black stars.
    ``runs``: run -> (configuration label, its switch-on checkpoint's file name)."""
    seed_units = distribution[(distribution["units"] == "seed") & distribution["run"].isin(list(runs))]
    datasets = list(dict.fromkeys(seed_units["dataset"]))
    figure = Figure(figsize=(max(7.0, 5.2 * len(datasets)), 6.8))
    clamps = sorted(seed.BELOW_AT_SWITCH_ON)
    configurations = list(dict.fromkeys(label for label, _ in runs.values()))
    # configurations whose curves coincide stay visible: the earlier ones wide and pale under the later ones
    widths = {label: 1.2 + 2.0 * (len(configurations) - 1 - index) for index, label in enumerate(configurations)}
    occupied = seed_units[(seed_units["pixels"] > 0) & (seed_units["lower"] >= LEFT)]["lower"]
    left = max(LEFT, 10.0 ** (np.floor(np.log10(occupied.min())) - 1)) if len(occupied) else LEFT
    for column, dataset in enumerate(datasets):
        rows = seed_units[seed_units["dataset"] == dataset]
        top = figure.add_subplot(2, len(datasets), column + 1)
        bottom = figure.add_subplot(2, len(datasets), len(datasets) + column + 1, sharex=top)
        curves = [("untrained (nnU-Net's initialisation)", "0.45", "--", 1.2, rows[rows["checkpoint"] == UNTRAINED],
                   None)]
        for index, label in enumerate(configurations):
            mine = rows[rows["run"].map(lambda run: runs[run][0]) == label]
            switch_on = mine[mine["checkpoint"] == mine["run"].map(lambda run: runs[run][1])]
            first = mine[(mine["checkpoint"] != UNTRAINED) & ~mine.index.isin(switch_on.index)]
            curves += [(f"{label}, after epoch 0", f"C{index}", ":", widths[label], first, None),
                       (f"{label}, at the switch-on", f"C{index}", "-", widths[label], switch_on, switch_on)]
        notes = []
        for text, colour, style, width, frame, spread in curves:
            if frame.empty:
                continue
            alpha = 0.5 if width > 1.2 else 1.0
            edges, shares, tiny = _per_decade(frame)
            top.stairs(shares, edges, color=colour, ls=style, lw=width, alpha=alpha)
            x, below = cumulative_share(frame)
            bottom.plot(x, below, color=colour, ls=style, lw=width, alpha=alpha, label=text)
            if tiny:
                notes.append(f"{text}: {tiny:.2g}%")
            if spread is not None and spread["run"].nunique() > 1:
                per_seed = np.array([cumulative_share(f)[1] for _, f in spread.groupby("run")])
                bottom.fill_between(x, per_seed.min(axis=0), per_seed.max(axis=0), color=colour, alpha=0.15, lw=0)
        for index, version in enumerate(seed.VERSIONS):
            for ax in (top, bottom):
                ax.axvline(version.eps, color="k", lw=0.8, alpha=0.6)
            last = index == len(seed.VERSIONS) - 1
            top.annotate(f"{version.name} clamp {format_eps(version.eps)}", (version.eps, 1),
                         xycoords=("data", "axes fraction"), xytext=(3 if last else -3, -3),
                         textcoords="offset points", va="top", ha="left" if last else "right", fontsize=7)
        bottom.plot(clamps, [100 * seed.BELOW_AT_SWITCH_ON[eps] for eps in clamps], "k*", ms=10, ls="none",
                    label="the seed at its switch-on")
        top.set_xscale("log")
        top.set_xlim(left, 1e2)
        top.set_ylabel("pixels per quarter decade (%)")
        top.set_title(f"dataset {dataset}: s = gx² + gy², the seed's units (raw Sobel)")
        bottom.set_ylim(0, 100)
        bottom.set_ylabel("pixels with s below x (%)")
        bottom.set_xlabel("s (the seed's units)")
        if notes:
            bottom.text(0.02, 0.97, f"s = 0 or s < {format_eps(LEFT)}:\n" + "\n".join(notes), fontsize=7,
                        ha="left", va="top", transform=bottom.transAxes)
    handles, labels = figure.axes[1].get_legend_handles_labels()
    columns = 3 if len(datasets) > 1 else 2
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.035 * -(-len(labels) // columns), 1, 1))
    return figure
