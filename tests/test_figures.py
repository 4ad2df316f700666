"""Figures by their plotted data: the artists read back from each saved figure against the table they came from.

Every figure is drawn through the public writer (which saves a real PNG); ``saved_figures`` records the Figure
objects as ``savefig`` writes them, so the test reads the bars, stairs and lines matplotlib actually drew.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle, StepPatch

from geodiag.reports import analysis_report, figures, sweep_report
from geodiag.reports.screenshot import FLAGS
from geodiag.reports.schema import write_json, write_text
from geodiag.reports.tables import write_table

from test_reports import analysis_inputs, browser_or_skip, sweep_hist, sweep_table

# Raw |x| bin edges, a quarter decade wide, as diagnostics.histograms writes them.
QUARTER_DECADE = 10.0 ** np.arange(-8.0, 2.01, 0.25)


@pytest.fixture
def saved_figures(monkeypatch) -> list[Figure]:
    saved: list[Figure] = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def _axes_titled(figure: Figure, title: str):
    [ax] = [ax for ax in figure.axes if title in (ax.get_title(), ax.get_title("left"))]
    return ax


def _bars(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _histogram_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A per-pixel tensor (a Gaussian in log10 |x| peaking at 1e-3) and a per-image scalar seen 3 times."""
    low, high = QUARTER_DECADE[:-1], QUARTER_DECADE[1:]
    counts = np.round(5000 * np.exp(-0.5 * ((np.log10(low) + 3.0) / 1.2) ** 2)).astype(int)
    rows = [dict(precision="fp32", tensor="compactness.grad_mag_squared", kind="value", bin_low=lo, bin_high=hi,
                 count=c) for lo, hi, c in zip(low, high, counts) if c > 0]
    # compactness of 3 images: 12.6 once, 14.1 twice (bins [10^1, 10^1.25) holding them)
    rows += [dict(precision="fp32", tensor="compactness", kind="value", bin_low=10.0, bin_high=10 ** 1.25, count=3)]
    rows += [dict(precision="fp32", tensor="compactness", kind="grad", bin_low=10 ** -2.5, bin_high=10 ** -2.25,
                  count=1)]
    base = dict(precision="fp32", nan=0, posinf=0, neginf=0, zero=0, subnormal=0, negative=0, fp16_overflow=0,
                fp16_underflow=0, bf16_overflow=0, bf16_underflow=0, min=0.0, max=0.0, mean=0.0, abs_min=0.0,
                abs_p50=0.0, abs_p90=0.0, abs_p99=0.0, abs_p999=0.0, abs_max=0.0)
    stats = [dict(base, tensor="compactness.grad_mag_squared", kind="value", count=int(counts.sum()) + 7, zero=5,
                  nan=2),
             dict(base, tensor="compactness", kind="value", count=3),
             dict(base, tensor="compactness", kind="grad", count=1)]
    return pd.DataFrame(rows), pd.DataFrame(stats)


def test_tensor_histogram_bars_sit_at_log10_of_their_bins_on_one_axis(tmp_path, saved_figures):
    histograms, tensors = _histogram_tables()
    figures.tensor_histograms(histograms, tensors, "fp32", tmp_path / "h.png")
    [figure] = saved_figures
    pixels = histograms[histograms["tensor"] == "compactness.grad_mag_squared"]
    ax = _axes_titled(figure, "compactness.grad_mag_squared · value")
    bars = sorted(_bars(ax), key=Rectangle.get_x)
    np.testing.assert_allclose([b.get_x() for b in bars], np.log10(pixels["bin_low"]), atol=1e-12)
    np.testing.assert_allclose([b.get_width() for b in bars], np.full(len(bars), 0.25), atol=1e-12)
    np.testing.assert_allclose([b.get_height() for b in bars], pixels["count"])
    modal = pixels.loc[pixels["count"].idxmax()]
    tallest = max(bars, key=Rectangle.get_height)
    assert tallest.get_x() == pytest.approx(np.log10(modal["bin_low"]))
    assert tallest.get_x() + tallest.get_width() == pytest.approx(np.log10(modal["bin_high"]))
    assert tallest.get_x() == pytest.approx(-3.0)  # the Gaussian's peak, 1e-3
    # the fp16 range as dashed lines at log10 of its limits, on the same axis
    assert sorted(line.get_xdata()[0] for line in ax.lines) == pytest.approx([np.log10(2.0 ** -24), np.log10(65504)])
    # every histogram panel of the figure shares one x range
    histogram_axes = [a for a in figure.axes if _bars(a)]
    assert len(histogram_axes) == 3 and len({a.get_xlim() for a in histogram_axes}) == 1
    assert "log10" in histogram_axes[-1].get_xlabel()


def test_a_kind_not_recorded_leaves_no_empty_panel(tmp_path, saved_figures):
    histograms, tensors = _histogram_tables()
    only_grad = histograms.assign(tensor="network.parameters", kind="grad").iloc[:1]
    figures.tensor_histograms(pd.concat([histograms, only_grad]), tensors, "fp32", tmp_path / "h.png")
    [figure] = saved_figures
    texts = [text.get_text() for ax in figure.axes for text in ax.texts]
    assert not any("not recorded" in text for text in texts)
    titles = [ax.get_title(loc="left") for ax in figure.axes if ax.axison]
    assert "network.parameters · grad" in titles and "network.parameters · value" not in titles


def test_the_dataset_comparison_names_its_y_axes_with_their_units(tmp_path, saved_figures):
    by_dataset = pd.DataFrame([dict(dataset=d, stabilizer="clamp", eps=e, median_abs_bias_compactness=b,
                                    max_grad_max=g) for d in (501, 502) for e, b, g in ((1e-4, 0.5, 1e-3),
                                                                                        (1e-2, 2.0, 1e-2))])
    figures.dataset_comparison(by_dataset, tmp_path / "d.png")
    [figure] = saved_figures
    left, right = figure.axes
    assert left.get_ylabel() == "median |compactness bias| (%)" and right.get_ylabel() == "max |dL/dlogit|"
    heights = sorted(bar.get_height() for bar in _bars(left))
    assert heights == pytest.approx([50, 50, 200, 200])  # percent, as the report's text and tables give biases


def test_per_image_scalars_are_visible_bars(tmp_path, saved_figures):
    histograms, tensors = _histogram_tables()
    figures.tensor_histograms(histograms, tensors, "fp32", tmp_path / "h.png")
    [figure] = saved_figures
    for title, count in (("compactness · value", 3), ("compactness · grad", 1)):
        ax = _axes_titled(figure, title)
        [bar] = _bars(ax)
        bottom, top = ax.get_ylim()
        assert bottom < 0.9 * count and count < top, f"{title}: a count of {count} is outside the y range"
        left, right = ax.get_xlim()
        assert left <= bar.get_x() and bar.get_x() + bar.get_width() <= right
        # the bar covers at least 1% of the axis width, so it shows up as a bar
        assert bar.get_width() / (right - left) > 0.01


def test_exact_zero_and_nan_counts_are_written_in_their_histograms_corner(tmp_path, saved_figures):
    histograms, tensors = _histogram_tables()
    figures.tensor_histograms(histograms, tensors, "fp32", tmp_path / "h.png")
    [figure] = saved_figures
    texts = [t.get_text() for t in _axes_titled(figure, "compactness.grad_mag_squared · value").texts]
    assert "zero: 5" in texts and "NaN: 2" in texts
    assert not any(text.startswith(("+Inf", "−Inf")) for text in texts)  # counts of 0 are not written
    assert not _axes_titled(figure, "compactness · value").texts


def test_sweep_histogram_stairs_and_eps_lines_share_the_log10_axis(tmp_path, saved_figures):
    hist = pd.DataFrame([dict(checkpoint="502-V23-e5", dataset=502, epoch=5, bin_low=lo, bin_high=hi, count=c)
                         for lo, hi, c in ((1e-7, 10 ** -6.75, 10), (1e-4, 10 ** -3.75, 30),
                                           (10 ** -3.75, 10 ** -3.5, 60))])  # a gap between 10^-6.75 and 10^-4
    eps = [1e-8, 1e-4, 1e-2]
    figures.grad_mag_squared_histograms(hist, eps, tmp_path / "g.png")
    [figure] = saved_figures
    [ax] = figure.axes
    [stairs] = [p for p in ax.patches if isinstance(p, StepPatch)]
    values, edges, _ = stairs.get_data()
    np.testing.assert_allclose(edges, [-7, -6.75, -4, -3.75, -3.5])
    np.testing.assert_allclose(values, [0.1, 0.0, 0.3, 0.6])  # shares of the 100 binned pixels; the gap is empty
    assert sorted(line.get_xdata()[0] for line in ax.lines) == pytest.approx(np.log10(eps))
    # the modal step sits at log10 of the modal bin's edges
    modal = int(np.argmax(values))
    assert (edges[modal], edges[modal + 1]) == pytest.approx((np.log10(10 ** -3.75), -3.5))


def test_epoch_axes_tick_whole_epochs_even_for_a_single_checkpoint(tmp_path, saved_figures):
    """One checkpoint (one epoch) left matplotlib free to tick 1.975, 2.025: an epoch axis ticks whole epochs."""
    by_epoch = pd.DataFrame([dict(dataset=502, epoch=2, stabilizer="clamp", eps=e, median_frac_below_eps=f,
                                  max_grad_max=g) for e, f, g in ((1e-4, 0.05, 9e-3), (1e-2, 0.97, 1.2e-2))])
    figures.epoch_evolution(by_epoch, [1e-4, 1e-2], tmp_path / "e.png")
    runs = pd.DataFrame([dict(dataset=502, run="r", epoch=e, train_loss=1.0 / (e + 1), warmup=1) for e in (0, 1, 2)])
    figures.training_curves(runs, tmp_path / "t.png")
    axes = [ax for figure in saved_figures for ax in figure.axes if ax.get_xlabel() == "epoch"]
    assert len(axes) == 3
    for ax in axes:
        ax.figure.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # the points themselves stay at their epochs
    assert [list(line.get_xdata()) for line in axes[0].lines if len(line.get_xdata())][0] == [2]


def _eps_table() -> pd.DataFrame:
    eps = [1e-6, 1e-4, 1e-2]
    rows = [dict(precision=p, tensor="compactness.grad_mag_squared", eps=e, fraction_below=f, zero_grad_fraction=0.5)
            for p in ("fp32", "fp16") for e, f in zip(eps, (0.5, 0.756, 0.9))]
    rows += [dict(precision=p, tensor="aspect.discriminant", eps=e, fraction_below=f, zero_grad_fraction=0.0)
             for p in ("fp32", "fp16") for e, f in zip(eps, (0.0, 0.667, 0.7))]
    return pd.DataFrame(rows)


def test_eps_fractions_draw_one_named_line_per_tensor_and_precision(tmp_path, saved_figures):
    fractions = _eps_table()
    figures.eps_fractions(fractions, tmp_path / "e.png")
    [figure] = saved_figures
    solid = [line for ax in figure.axes for line in ax.lines
             if isinstance(line, Line2D) and line.get_linestyle() == "-"]
    assert len(solid) == 4
    for (precision, tensor), group in fractions.groupby(["precision", "tensor"]):
        [line] = [l for l in solid if tensor in l.get_label() and precision in l.get_label()]
        np.testing.assert_allclose(line.get_xdata(), group["eps"])
        np.testing.assert_allclose(line.get_ydata(), 100 * group["fraction_below"])  # percent, as the text
    # precisions that agree stay visible: no two lines of a panel share both marker and width
    for ax in figure.axes:
        drawn = [(line.get_marker(), line.get_linewidth()) for line in ax.lines if line.get_linestyle() == "-"]
        assert len(set(drawn)) == len(drawn)


def test_eps_bullets_name_the_tensor_each_fraction_is_of(tmp_path):
    analysis_inputs(tmp_path)
    _eps_table().to_csv(tmp_path / "eps_fractions.csv", index=False)
    markdown = analysis_report.render(tmp_path).markdown.read_text()
    assert "- fp32, `compactness.grad_mag_squared`: 75.6% below 1e-4, 90% below 1e-2" in markdown
    assert "- fp32, `aspect.discriminant`: 66.7% below 1e-4, 70% below 1e-2" in markdown


def test_figures_keep_geodiag_style_after_nnunet_set_a_large_seaborn_font_scale(tmp_path, saved_figures):
    seaborn = pytest.importorskip("seaborn")
    sweep_table().to_csv(tmp_path / "sweep.csv", index=False)
    sweep_hist().to_csv(tmp_path / "sweep_hist.csv", index=False)
    (tmp_path / "analysis").mkdir()
    analysis_inputs(tmp_path / "analysis")
    with matplotlib.rc_context():
        seaborn.set(font_scale=2.5)  # what nnU-Net's progress plot does, process-wide
        assert matplotlib.rcParams["xtick.labelsize"] > 20
        sweep_report.render(tmp_path)
        analysis_report.render(tmp_path / "analysis")
    assert len(saved_figures) == 4 + 3
    largest = 10.0  # geodiag's largest font (titles); seaborn's font_scale=2.5 makes tick labels 27.5
    for figure in saved_figures:
        renderer = figure.canvas.get_renderer()
        for text in figure.findobj(matplotlib.text.Text):
            if text.get_text():
                assert text.get_fontsize() <= largest, text.get_text()
        for ax in figure.axes:
            assert ax.get_facecolor()[:3] == (1.0, 1.0, 1.0)  # not seaborn's grey
        drawn = figure.get_tightbbox(renderer)
        canvas = figure.bbox_inches
        assert drawn.x0 >= canvas.x0 - 0.01 and drawn.y0 >= canvas.y0 - 0.01
        assert drawn.x1 <= canvas.x1 + 0.01 and drawn.y1 <= canvas.y1 + 0.01


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_report_files_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = [write_text(tmp_path / "r.md", "x"), write_json(tmp_path / "s.json", {"a": 1}),
                   *write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")]
    finally:
        os.umask(previous)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


# Runs in the page once it is laid out; --dump-dom then returns the DOM carrying the measurements.
LAYOUT_PROBE = """<script>
const root = document.scrollingElement;
document.body.setAttribute("data-layout", JSON.stringify({
  page: [root.scrollWidth, root.clientWidth],
  tables: [...document.querySelectorAll("table")].map(t => ({
    hidden: Math.max(t.scrollWidth - t.clientWidth, t.parentElement.scrollWidth - t.parentElement.clientWidth),
    overflow: [getComputedStyle(t).overflowX, getComputedStyle(t.parentElement).overflowX]})),
}));
</script>"""


def _layout_in_browser(report: Path, width: int) -> dict:
    probed = report.with_name("probed.html")
    probed.write_text(report.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([browser_or_skip(), *FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={width},2000", "--dump-dom", probed.as_uri()],
                                capture_output=True, text=True, timeout=120)
    found = re.search(r'data-layout="([^"]*)"', result.stdout)
    assert found, f"the browser returned no measurement: {result.stderr[-500:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.parametrize("width", [1300, 700])
def test_wide_tables_never_widen_the_page_in_a_real_browser(tmp_path, width):
    analysis_inputs(tmp_path)
    report = analysis_report.render(tmp_path).html
    layout = _layout_in_browser(report, width)
    scroll_width, client_width = layout["page"]
    assert scroll_width <= client_width, "the page scrolls sideways"
    # a table too wide for a narrow window scrolls in its own box
    assert layout["tables"] and all({"auto", "scroll"} & set(t["overflow"]) for t in layout["tables"])
    if width >= 1300:  # wide enough: every column of every table is on screen, none behind a scrollbar
        assert [t["hidden"] for t in layout["tables"]] == [0] * len(layout["tables"])


def test_a_clamp_histogram_gives_the_share_held_at_its_bound_in_each_panel(tmp_path, saved_figures):
    """|input| drops signs: most elements of a clamp can sit at its bound while the bars sit far from it."""
    from geodiag.reports.sites_report import site_histogram

    bins = pd.DataFrame([dict(precision=p, **{"pass": "patches"}, site="loss.py:7", op="clamp", bin_low=1.0,
                              bin_high=10 ** 0.25, count=4) for p in ("fp32", "bf16")])
    site_histogram(bins, "loss.py:7", "clamp", [[1e-6, None]], {("bf16", "patches"): 0.875}, tmp_path / "s.png")
    [figure] = saved_figures
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["fp32, patches", "bf16, patches: 87.5% at the bound"]
