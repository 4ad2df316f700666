"""The study report's key figure: where the replica's s (the seed's units) sits relative to the seed's two clamps,
at the untrained checkpoint and at the switch-on, beside the seed's own shares. It carries the study's conclusion:
a prior whose sqrt clamps hold almost every pixel at the bound passes almost no gradient.

Drawn from switch_on_s.csv, which holds the share of pixels below each clamp per case (not the whole distribution
of s): each line joins a run's shares below 1e-4 and 1e-2, an empirical distribution function read at the clamps.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import seed
from .figures import figure_writer
from .tables import format_eps


@figure_writer
def shares_below_clamps(small_s: pd.DataFrame, switch_on: Mapping[str, str]) -> Figure:
    """Per dataset: the share of pixels (%) whose s lies below each of the seed's clamps, median over cases with the
    range as error bars, per run at its first checkpoint (dotted) and at its switch-on (solid); black stars: the
    seed's shares at its switch-on. ``switch_on``: run -> its switch-on checkpoint file name."""
    seed_units = small_s[(small_s["units"] == "seed") & small_s["run"].isin(list(switch_on))]
    datasets = list(dict.fromkeys(seed_units["dataset"]))
    figure = Figure(figsize=(5.0 * len(datasets), 4.4))
    clamps = sorted(seed.BELOW_AT_SWITCH_ON)
    for index, dataset in enumerate(datasets, start=1):
        ax = figure.add_subplot(1, len(datasets), index)
        for offset, (run, frame) in enumerate(seed_units[seed_units["dataset"] == dataset].groupby("run", sort=False)):
            colour, shifted = None, np.asarray(clamps) * 1.25 ** offset  # side by side, not on top of each other
            for checkpoint, rows in frame.groupby("checkpoint", sort=True):
                per_eps = rows.groupby("eps")["fraction_below"].agg(["median", "min", "max"]).reindex(clamps) * 100
                late = checkpoint == switch_on[run]
                line = ax.errorbar(shifted, per_eps["median"], capsize=3, marker="o", ms=4, color=colour,
                                   yerr=[per_eps["median"] - per_eps["min"], per_eps["max"] - per_eps["median"]],
                                   ls="-" if late else ":", label=f"{run}, {'switch-on' if late else 'untrained'}")
                colour = line.lines[0].get_color()
        ax.plot(clamps, [100 * seed.BELOW_AT_SWITCH_ON[eps] for eps in clamps], "k*", ms=10, ls="none",
                label="the seed, switch-on")
        ax.set_xscale("log")
        ax.set_xticks(clamps, [f"s < {format_eps(eps)}" for eps in clamps])
        ax.minorticks_off()
        ax.set_xlim(np.min(clamps) / 3, np.max(clamps) * 3)
        ax.set_ylim(0, 100)
        ax.set_ylabel("pixels below the clamp (%)")
        ax.set_title(f"dataset {dataset}: s in the seed's units (raw Sobel)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    figure.tight_layout()
    return figure
