"""`geodiag bench --quick` runs end to end and writes a well-formed CSV and Markdown table (no timed assertions)."""
import csv
import math

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments import kernels
from geodiag.diagnostics.instruments.errors import ArgumentError
from geodiag.diagnostics.instruments.host_sync import count_host_syncs
from geodiag.diagnostics.tools import bench, bench_common, bench_device, bench_histogram
from geodiag.reports.schema import BENCH_COLUMNS
from geodiag.diagnostics.cli import main


def test_quick_bench_writes_one_csv_row_per_printed_row_with_every_column(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert rows and tuple(rows[0]) == BENCH_COLUMNS
    assert {r["benchmark"] for r in rows} >= {"watch overhead", "provenance overhead", "loss share of a step",
                                              "vectorisation", "clamp sweep", "histogram", "host syncs",
                                              "peak memory"}
    assert ("kernel vs torch path" in {r["benchmark"] for r in rows}) == (kernels.compiled is not None)
    for row in rows:
        assert math.isfinite(float(row["value"])) and row["met"] in ("true", "false", "")
    markdown = (tmp_path / "bench.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == len(rows) + 1  # header + one line per CSV row
    assert markdown in capsys.readouterr().out


@pytest.mark.skipif(kernels.compiled is None, reason="the CPU kernel is not built here: the family has no rows")
def test_only_kernel_runs_the_kernel_against_the_torch_path_alone(tmp_path):
    assert main(["bench", "--quick", "--device", "cpu", "--only", "kernel", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    torch_path = "geodiag's torch path (kernel unused)"
    assert {r["benchmark"] for r in rows} == {"kernel vs torch path"}
    assert [(r["subject"], r["baseline"], r["target"]) for r in rows] == [
        ("LogHistogram.update, 1.04858M values", torch_path, ">= 3x"),
        ("watched nnU-Net step", torch_path, ">= 1.05x"),
        ("watched step, kernel", "plain step", ""), ("watched step, torch path", "plain step", "")]
    assert all(float(r["value"]) > 0 for r in rows)  # ratios of times: no timed assertion
    assert kernels.compiled is not None  # kernels.unused() gave it back


def test_loss_forward_and_backward_read_nothing_back_to_the_host():
    cpu = torch.device("cpu")
    rows = bench_device.bench_host_syncs(bench_common.SCALES["quick"], cpu, bench_common.Clock(cpu))
    assert [row.value for row in rows] == [0] * len(rows)


def test_host_read_detector_flags_an_item_call():
    count, _ = count_host_syncs(lambda: torch.ones(3).sum().item(), torch.device("cpu"))
    assert count == 1


def test_tensorboard_path_counts_match_numpy_on_tensorboards_default_edges():
    edges = bench_histogram.tensorboard_default_bins()
    assert edges[len(edges) // 2] == 0.0 and np.all(np.diff(edges) > 0)
    values = torch.tensor([-2.0, 1e-3, 0.5, 7.0])
    result = bench_histogram.tensorboard_histogram(values, edges)
    assert result["counts"].sum() == 4 and result["sum_squares"] == float((values.double() ** 2).sum())


def test_unknown_benchmark_is_a_one_line_user_error(tmp_path, capsys):
    assert main(["bench", "--quick", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope' in --only" in capsys.readouterr().err
    with pytest.raises(ArgumentError, match="unknown benchmark 'nope' in only;"):
        bench.run_bench("cpu", quick=True, only=["nope"])  # a library caller is told the argument's name


def _missed(scale, device, clock):
    return [bench_common.Result("histogram", "a subject", "a baseline", 2.0, "x faster", ">= 10x", False, "")]


def test_check_exits_non_zero_naming_each_missed_target_on_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.BENCHMARKS, "missed", _missed)
    arguments = ["bench", "--quick", "--device", "cpu", "--only", "host-syncs,missed", "--out", str(tmp_path)]
    assert main(arguments) == 0  # without --check a miss is reported, not an error
    assert main(arguments + ["--check"]) == 1
    err = capsys.readouterr().err
    assert "missed: histogram: a subject vs a baseline: 2 x faster, target >= 10x" in err.splitlines()
    assert "host syncs" not in err  # met targets are not listed
    assert main(["bench", "--quick", "--device", "cpu", "--only", "host-syncs", "--out", str(tmp_path),
                 "--check"]) == 0


def test_readme_table_lists_the_rows_with_a_target_and_the_header_names_versions_and_threads(tmp_path):
    assert main(["bench", "--quick", "--device", "cpu", "--only", "host-syncs", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    header, table = (tmp_path / "readme_table.md").read_text().split("\n\n", 1)
    assert f"torch {torch.__version__}" in header and f"numpy {np.__version__}" in header
    assert f"{torch.get_num_threads()} by default" in header
    lines = table.strip().splitlines()
    assert lines[0] == "| measured | vs | value | target | met |"
    assert len(lines) == 2 + sum(1 for r in rows if r["target"])


def test_the_timed_step_is_built_by_the_trainers_own_methods():
    """Its loss is nnU-Net's _build_loss (Dice+CE with the deep-supervision weights 1/2^i, the last 0), its optimizer
    configure_optimizers' SGD, its clip the trainer's: written out here from nnU-Net's code, independently."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from geodiag.diagnostics.tools.bench_step import NnUNetStep
    from geodiag.losses.nnunet.trainer import CLIP_NORM

    scale = bench_common.SCALES["quick"]
    step = NnUNetStep(scale, torch.device("cpu"))
    heads = len(scale.features) - 1
    weights = np.array([1 / 2 ** i for i in range(heads)])
    weights[-1] = 0
    assert np.allclose(step.dc_ce.weight_factors, weights / weights.sum())
    dc_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    with torch.no_grad():
        outputs = step.network(step.image)
        expected = sum(w * dc_ce(o, t) for w, o, t in zip(weights / weights.sum(), outputs, step.targets) if w)
        assert float(step.dc_ce(outputs, step.targets)) == pytest.approx(float(expected), rel=1e-6)
    group = step.optimizer.param_groups[0]
    assert type(step.optimizer) is torch.optim.SGD
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    assert step.clip_norm == CLIP_NORM
