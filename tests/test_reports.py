"""Reports: tables round-trip atomically, Markdown and self-contained HTML are written, figures are PNGs."""
from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geodiag.reports import analysis_report, sweep_report
from geodiag.reports.html import markdown_to_html
from geodiag.reports.screenshot import BROWSERS, ScreenshotError, find_browser, screenshot
from geodiag.reports.schema import ReportInputError, write_json
from geodiag.reports.tables import parquet_available, read_table, write_table

from test_recommendation import sweep_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources, "the report should embed its figures"
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert_valid_png(base64.b64decode(source.split(",", 1)[1]))


def sweep_table(datasets=(501, 502), precisions=("fp32", "fp16")) -> pd.DataFrame:
    settings = {("clamp", 1e-4): dict(bias=0.05, grad_max=0.0285, below=0.0034, zero=0.0034),
                ("clamp", 1e-2): dict(bias=0.9, grad_max=0.0304, below=0.29, zero=0.29),
                ("shifted", 1e-6): dict(bias=0.002, grad_max=0.0285, below=0.00003)}
    return pd.concat([sweep_rows(settings, precisions=precisions, dataset=d, epoch=e)
                      for d in datasets for e in (5, 20)], ignore_index=True)


def sweep_hist(datasets=(501, 502)) -> pd.DataFrame:
    edges = np.linspace(-8, 2, 21)  # log10 of the raw |x| edges the table holds
    counts = np.exp(-0.5 * ((edges[:-1] + 1.75) / 0.8) ** 2) * 1000
    return pd.DataFrame([dict(checkpoint=f"ckpt{e}", dataset=d, epoch=e, bin_low=10 ** lo, bin_high=10 ** hi,
                              count=int(c))
                         for d in datasets for e in (5, 20) for lo, hi, c in zip(edges[:-1], edges[1:], counts)])


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sweep")
    sweep_table().to_csv(directory / "sweep.csv", index=False)
    sweep_hist().to_csv(directory / "sweep_hist.csv", index=False)
    sweep_report.render(directory)
    return directory


def analysis_inputs(directory: Path, verdict: str = "non_finite_gradient", provenance=None) -> None:
    summary = {
        "verdict": verdict, "verdict_reason": "4 NaN in dL/dlogits (fp16)",
        "checkpoint": {"path": "checkpoint_best.pth", "trainer_name": "nnUNetTrainerGeometric", "configuration": "2d",
                       "fold": 0, "epoch": 5, "geometric_active": True},
        "settings": {"stabilizer": "clamp", "eps": 1e-4, "precisions": ["fp32", "fp16"], "device": "cpu"},
        "state": {"non_finite_weights": 0, "non_finite_weight_tensors": [], "non_finite_optimizer": 0,
                  "grad_scaler_scale": None, "inverse_scale_finite": None},
        "closest_to_trouble": {"tensor": "aspect.moments", "kind": "value", "precision": "fp16", "quantity": "max",
                               "value": 6550.4, "limit": 65504.0, "headroom_decades": 1.0 - 1e-12},
        "dominant_gradient": {"term": "compactness", "share": 0.8},
        "provenance": provenance if provenance is not None else
        [{"phase": "backward", "op": "SqrtBackward0", "node": "n7", "module": None,
          "tap": "compactness.sqrt_output", "message": "0 * inf"}],
        "cases": 2,
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    stats, bins = [], []
    for precision in ("fp32", "fp16"):
        for tensor in ("compactness.grad_mag_squared", "compactness.sqrt_output"):
            for kind in ("value", "grad"):
                nan = 4 if (precision, tensor, kind) == ("fp16", "compactness.sqrt_output", "grad") else 0
                stats.append(dict(precision=precision, tensor=tensor, kind=kind, count=100, nan=nan, posinf=0,
                                  neginf=0, zero=3, subnormal=0, negative=0, fp16_overflow=0, fp16_underflow=0,
                                  bf16_overflow=0, bf16_underflow=0, min=-5.0, max=5.0, mean=0.1, abs_min=1e-6,
                                  abs_p50=0.03, abs_p90=0.3, abs_p99=2.0, abs_p999=4.0, abs_max=5.0))
                bins += [dict(precision=precision, tensor=tensor, kind=kind, bin_low=10.0 ** b,
                              bin_high=10.0 ** (b + 1), count=10) for b in range(-6, 1)]
    pd.DataFrame(stats).to_csv(directory / "tensors.csv", index=False)
    pd.DataFrame(bins).to_csv(directory / "histograms.csv", index=False)
    pd.DataFrame([dict(precision=p, tensor="compactness.grad_mag_squared", eps=e, fraction_below=f,
                       zero_grad_fraction=0.0034) for p in ("fp32", "fp16")
                  for e, f in ((1e-6, 0.0001), (1e-4, 0.0034), (1e-2, 0.29))]).to_csv(directory / "eps_fractions.csv",
                                                                                    index=False)
    pd.DataFrame([dict(case=c, precision="fp32", term=t, value=v, grad_share=s) for c in (0, 1)
                  for t, v, s in (("compactness", 1.1, 0.8), ("aspect", 0.2, 0.2), ("geometric_total", 1.3, 1.0))]
                 ).to_csv(directory / "terms.csv", index=False)


@pytest.fixture(scope="module")
def analysis_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("analysis")
    analysis_inputs(directory)
    analysis_report.render(directory)
    return directory


def test_write_table_round_trips_and_leaves_no_temporary_files(tmp_path):
    frame = pd.DataFrame({"eps": [1e-4, 1e-2], "stabilizer": ["clamp", "shifted"], "nonfinite": [3, 0]})
    written = write_table(frame, tmp_path / "t.csv")
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.csv", ["eps"]), frame)
    if parquet_available():
        assert tmp_path / "t.parquet" in written
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_write_json_spells_non_finite_numbers_as_null(tmp_path):
    write_json(tmp_path / "s.json", {"a": float("nan"), "b": [np.float64(np.inf), np.int64(2)]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": [None, 2]}


def test_read_table_names_a_missing_file_and_missing_columns(tmp_path):
    with pytest.raises(ReportInputError, match="not found"):
        read_table(tmp_path / "absent.csv")
    pd.DataFrame({"eps": [1.0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ReportInputError, match="lacks column.*stabilizer"):
        read_table(tmp_path / "t.csv", ["eps", "stabilizer"])


def test_markdown_subset_becomes_escaped_html_with_tables_and_lists():
    page = markdown_to_html("**bold** <b> `a<b`\n\n- one\n- two\n\n| x | y |\n|---|---|\n| 1 | a\\|b |")
    assert "<strong>bold</strong> &lt;b&gt; <code>a&lt;b</code>" in page
    assert "<li>one</li>" in page and "<li>two</li>" in page
    assert "<th>x</th>" in page and "<td>a|b</td>" in page


def test_a_numbered_list_is_an_ordered_list_with_one_item_per_entry_and_a_table_is_a_table():
    page = markdown_to_html("Intro.\n\n1. first answer\n2. second answer\n3. third\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    ordered = re.search(r"<ol>(.*?)</ol>", page, flags=re.S)
    assert ordered is not None, page
    assert re.findall(r"<li>(.*?)</li>", ordered.group(1)) == ["first answer", "second answer", "third"]
    assert "<table>" in page and page.count("<td>") == 2 and "<p>Intro.</p>" in page


def test_sweep_report_writes_markdown_self_contained_html_and_png_figures(sweep_dir):
    markdown = (sweep_dir / "report.md").read_text()
    assert "clamp 1e-2 on normalised s (not the seed's V2.4" in markdown and "is not justified" in markdown
    assert "Recommended: shifted 1e-6" in markdown
    assert_self_contained((sweep_dir / "report.html").read_text())
    names = sorted(p.name for p in (sweep_dir / "figures").iterdir())
    assert names == ["bias_vs_gradient.png", "datasets.png", "epochs.png", "grad_mag_squared.png"]
    for name in names:
        assert f"figures/{name}" in markdown
        assert_valid_png((sweep_dir / "figures" / name).read_bytes())


def test_sweep_summary_json_carries_rule_recommendation_verdict_and_coverage(sweep_dir):
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["recommended"]["stabilizer"] == "shifted"
    assert summary["verdict_clamp_1e-2"]["status"] == "not_justified"
    assert summary["rule"]["grad_bound_used"] == pytest.approx(65504 / 65536)
    assert summary["coverage"]["datasets"] == ["501", "502"]
    assert summary["coverage"]["missing_autocast_precisions"] == ["bf16"]
    assert read_table(sweep_dir / "headline.csv", ["eligible"])["eligible"].tolist() == [True, True, True]


def test_sweep_report_with_one_dataset_one_precision_and_no_histogram_says_what_is_missing(tmp_path):
    sweep_table(datasets=(502,), precisions=("fp32",)).to_csv(tmp_path / "sweep.csv", index=False)
    report = sweep_report.render(tmp_path)
    markdown = report.markdown.read_text()
    assert "not measured: fp16, bf16" in markdown
    assert "Datasets compared" not in markdown and "grad_mag_squared and the eps values" not in markdown
    assert sorted(p.name for p in report.figures) == ["bias_vs_gradient.png", "epochs.png"]


def test_sweep_report_rejects_a_table_without_rows_or_with_text_in_numbers(tmp_path):
    with pytest.raises(ReportInputError, match="sweep.csv not found"):
        sweep_report.render(tmp_path)
    sweep_table().iloc[:0].to_csv(tmp_path / "sweep.csv", index=False)
    with pytest.raises(ReportInputError, match="no rows"):
        sweep_report.render(tmp_path)
    broken = sweep_table().astype({"grad_max": object})
    broken.loc[0, "grad_max"] = "big"
    broken.to_csv(tmp_path / "sweep.csv", index=False)
    with pytest.raises(ReportInputError, match="grad_max holds non-numeric"):
        sweep_report.render(tmp_path)


def test_analysis_report_leads_with_the_verdict_and_reports_headroom_and_provenance(analysis_dir):
    markdown = (analysis_dir / "report.md").read_text()
    sections = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert sections[:2] == ["In one minute", "Verdict"]  # the answers, the verdict first among them, then its section
    first_answer = markdown.split("## In one minute\n\n")[1].splitlines()[0]
    assert first_answer.startswith("- **Is this checkpoint healthy?** ") and "4 NaN in dL/dlogits (fp16)" in first_answer
    assert "4 NaN in dL/dlogits (fp16)" in markdown
    assert "1 decades of headroom. That is less than the 1 decade" in markdown   # 0.999... < 1: flagged
    assert "`compactness.sqrt_output` grad (fp16): 4 NaN" in markdown
    assert "- fp32, `compactness.grad_mag_squared`: 0.34% below 1e-4, 29% below 1e-2" in markdown
    assert "| backward | SqrtBackward0 |" in markdown
    assert_self_contained((analysis_dir / "report.html").read_text())
    for name in ("histograms_fp32.png", "histograms_fp16.png", "eps_fractions.png"):
        assert_valid_png((analysis_dir / "figures" / name).read_bytes())


def test_analysis_report_of_a_healthy_checkpoint_without_optional_tables(tmp_path):
    analysis_inputs(tmp_path, verdict="healthy", provenance=[])
    for optional in ("histograms.csv", "eps_fractions.csv", "terms.csv"):
        (tmp_path / optional).unlink()
    report = analysis_report.render(tmp_path)
    markdown = report.markdown.read_text()
    assert "**healthy**" in markdown and "No non-finite value was produced during the replay" in markdown
    assert report.figures == []


def test_analysis_report_states_a_collapsing_grad_scaler_in_halvings_from_one(tmp_path):
    analysis_inputs(tmp_path, verdict="grad_scaler_collapsed", provenance=[])
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["state"].update(grad_scaler_scale=2.0 ** -20, inverse_scale_finite=True)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    markdown = analysis_report.render(tmp_path).markdown.read_text()
    # 2^-20 is -20 halvings from 1; GradScaler starts at 2^16 = 65536; 1/2^-20 = 1048576.
    assert "The scale is 9.54e-07, -20.0 halvings from 1 (the initial scale 65536 is 2^16); 1/scale = 1.05e+06." \
        in markdown


def test_analysis_report_rejects_an_unknown_verdict(tmp_path):
    analysis_inputs(tmp_path, verdict="probably_fine")
    with pytest.raises(ReportInputError, match="unknown verdict 'probably_fine'"):
        analysis_report.render(tmp_path)


def test_screenshot_without_a_browser_is_a_clear_error(tmp_path):
    with pytest.raises(ScreenshotError, match="no headless browser found"):
        find_browser((str(tmp_path / "no-such-browser"),))


def browser_or_skip() -> str:
    """The installed browser; skip without one, except in CI, which installs Chromium (.ci/run) and sets
    GEODIAG_REQUIRE_BROWSER: there a missing browser is a failure, not a skip."""
    try:
        return find_browser(BROWSERS)
    except ScreenshotError:
        if os.environ.get("GEODIAG_REQUIRE_BROWSER"):
            raise
        pytest.skip("no Chromium or Chrome installed")


def test_screenshot_of_a_report_is_a_png(sweep_dir, tmp_path):
    browser_or_skip()
    out = screenshot(sweep_dir / "report.html", tmp_path / "shot.png")
    with Image.open(out) as image:
        assert image.size == (1280, 2000)
