"""The study's distribution of s (s_distribution.csv) and the key figure drawn from it.

Bin counts are checked against numpy's own histogram of the same values, the untrained network against a second
build under the same seed, and the figure by the data it plots against an empirical distribution computed here."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from geodiag.diagnostics.study.measurements import S_EDGES, s_histogram
from geodiag.reports import seed, study_figures
from geodiag.reports.schema import UNTRAINED


def _values(n: int = 20000, zeros: int = 37, seed_: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed_)
    values = 10.0 ** rng.uniform(-18, 3, n)  # beyond both ends of the edges
    values[:zeros] = 0.0
    values[zeros:zeros + 5] = 1e-4  # exactly on an edge: counted in the bin it opens
    return values


def test_histogram_counts_match_numpy_and_put_each_clamp_on_an_edge():
    values = _values()
    bins = s_histogram(torch.tensor(values))
    assert sum(count for *_, count in bins) == values.size
    assert bins[0] == (0.0, 0.0, 37)
    inner = np.histogram(values[(values >= S_EDGES[0]) & (values < S_EDGES[-1])], bins=S_EDGES)[0]
    assert [count for *_, count in bins[2:-1]] == inner.tolist()
    assert bins[1][2] == ((values > 0) & (values < S_EDGES[0])).sum()
    assert bins[-1][:2] == (S_EDGES[-1], float("inf")) and bins[-1][2] == (values >= S_EDGES[-1]).sum()
    for eps in seed.BELOW_AT_SWITCH_ON:  # the share below a clamp is a sum of whole bins
        below = sum(count for lower, upper, count in bins if upper <= eps)
        assert below == (values < eps).sum(), eps


def _distribution(samples: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    rows = []
    for (run, checkpoint), values in samples.items():
        rows += [{"run": run, "dataset": 501, "checkpoint": checkpoint, "units": units, "lower": lower,
                  "upper": upper, "pixels": count}
                 for units in ("seed", "normalised") for lower, upper, count in s_histogram(torch.tensor(values))]
    return pd.DataFrame(rows)


def test_figure_plots_the_pooled_distribution_function_of_each_state(tmp_path):
    """Two seeds of one configuration: the switch-on curve is the distribution function of their pooled pixels,
    the band spans the two seeds' own curves, and the untrained curve is drawn once."""
    samples = {("r0", UNTRAINED): _values(seed_=1), ("r0", "checkpoint_epoch_0000.pth"): _values(seed_=2),
               ("r0", "checkpoint_epoch_0002.pth"): _values(seed_=3) * 1e-6,
               ("r1", UNTRAINED): _values(seed_=4), ("r1", "checkpoint_epoch_0000.pth"): _values(seed_=5),
               ("r1", "checkpoint_epoch_0002.pth"): _values(seed_=6, n=5000) * 1e-3}
    runs = {"r0": ("replica V2.3", "checkpoint_epoch_0002.pth"), "r1": ("replica V2.3", "checkpoint_epoch_0002.pth")}
    figure = study_figures.s_distribution.__wrapped__(_distribution(samples), runs)
    bottom = figure.axes[1]
    lines = {line.get_label(): line for line in bottom.get_lines()}
    switch_on = np.concatenate([samples["r0", "checkpoint_epoch_0002.pth"], samples["r1", "checkpoint_epoch_0002.pth"]])
    x, y = lines["replica V2.3, at the switch-on"].get_data()
    for eps in (*seed.BELOW_AT_SWITCH_ON, 1e-8, 1.0):
        at = np.flatnonzero(np.isclose(x, eps, rtol=1e-12, atol=0))[-1]
        assert y[at] == pytest.approx(100 * (switch_on < eps).mean(), abs=1e-9), eps
    untrained = np.concatenate([samples["r0", UNTRAINED], samples["r1", UNTRAINED]])
    x, y = lines["untrained (nnU-Net's initialisation)"].get_data()
    at = np.flatnonzero(np.isclose(x, 1e-2, rtol=1e-12, atol=0))[-1]
    assert y[at] == pytest.approx(100 * (untrained < 1e-2).mean(), abs=1e-9)
    band = bottom.collections[0].get_paths()[0].vertices  # fill_between: the seeds' range at every edge
    for run in ("r0", "r1"):
        share = 100 * (samples[run, "checkpoint_epoch_0002.pth"] < 1e-4).mean()
        at_edge = band[np.isclose(band[:, 0], 1e-4, rtol=1e-12, atol=0), 1]
        assert at_edge.min() - 1e-9 <= share <= at_edge.max() + 1e-9
    stars = lines["the seed at its switch-on"].get_data()
    assert list(stars[1]) == [100 * seed.BELOW_AT_SWITCH_ON[eps] for eps in sorted(seed.BELOW_AT_SWITCH_ON)]


def test_untrained_network_is_nnunets_initialisation_under_the_seed(geometric_run):
    from geodiag.diagnostics.nnunet.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(geometric_run.checkpoints[geometric_run.switch_on_epoch])
    torch.manual_seed(123)
    before = torch.rand(3)
    first, again, other = (checkpoint.untrained_network(seed_) for seed_ in (0, 0, 1))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)  # the global generator is untouched
    trained = checkpoint.network().state_dict()
    weights = [name for name, value in trained.items() if value.is_floating_point() and value.dim() > 1]
    assert weights
    for name in weights:
        assert torch.equal(first.state_dict()[name], again.state_dict()[name]), name
        assert not torch.equal(first.state_dict()[name], trained[name]), name
    assert any(not torch.equal(first.state_dict()[name], other.state_dict()[name]) for name in weights)
