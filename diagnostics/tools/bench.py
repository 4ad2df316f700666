"""`geodiag bench`: what geodiag costs, measured side by side with a plain nnU-Net step and the tools used today.

This module is the runner and the table: which benchmarks exist (``BENCHMARKS``, one module per family:
``bench_watch``, ``bench_overheads``, ``bench_histogram`` (with the CPU kernel against the torch path),
``bench_device``, ``bench_autotaps``; the shared sizes, row and clock in ``bench_common``, the nnU-Net step they
time in ``bench_step``), how a run selects them (``only``: e.g. just "kernel"), and how the rows are written (CSV in
``BENCH_COLUMNS``, Markdown, the README's cost table) through the shared atomic writers.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from geodiag.reports.schema import BENCH_COLUMNS, write_text

from ..instruments.errors import ArgumentError, GeodiagError
from .bench_autotaps import bench_autotaps
from .bench_common import SCALES, Clock, Result, Scale
from .bench_device import bench_host_syncs, bench_memory
from .bench_histogram import bench_histogram, bench_kernel
from .bench_overheads import bench_loss_fraction, bench_provenance, bench_sweep, bench_vectorised
from .bench_watch import bench_watch

BENCHMARKS: dict[str, Callable[[Scale, torch.device, Clock], list[Result]]] = {
    "watch": bench_watch,
    "provenance": bench_provenance,
    "loss-share": bench_loss_fraction,
    "vectorisation": bench_vectorised,
    "sweep": bench_sweep,
    "histogram": bench_histogram,
    "kernel": bench_kernel,
    "host-syncs": bench_host_syncs,
    "memory": bench_memory,
    "autotaps": bench_autotaps,
}


def run_bench(device: str = "cpu", quick: bool = False, only: Optional[Iterable[str]] = None,
              progress: Optional[Callable[[str], None]] = None, scale_name: Optional[str] = None) -> list[Result]:
    """Run the selected benchmarks (all by default) at ``scale_name`` (default: quick or full) and return their
    rows."""
    names = list(only) if only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ArgumentError(f"unknown benchmark {unknown[0]!r} in {{only}}; choose from {', '.join(BENCHMARKS)}",
                            "only")
    scale_name = scale_name or ("quick" if quick else "full")
    if scale_name not in SCALES:
        raise GeodiagError(f"unknown bench scale {scale_name!r}; choose from {', '.join(SCALES)}")
    dev = torch.device(device)
    scale = SCALES[scale_name]
    clock = Clock(dev)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        # numpy's BLAS at one thread too: after TensorBoard's dot its idle workers spun on the other core and
        # slowed whatever ran next (LogHistogram.update took up to twice its time, by chance, sample to sample).
        with threadpool_limits(limits=1 if dev.type == "cpu" else None):
            results: list[Result] = []
            for name in names:
                if progress:
                    progress(f"bench {name} ({scale.name})")
                results += BENCHMARKS[name](scale, dev, clock)
            return results
    finally:
        torch.set_num_threads(threads)


def environment_line(device: str) -> str:
    """What the figures depend on besides the code: library versions, the device, the threads the run used."""
    dev = torch.device(device)
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
             f"CPU ({os.cpu_count()} cores; torch and numpy's BLAS set to 1 thread, torch {torch.get_num_threads()} "
             "by default here)")
    return f"torch {torch.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}; {where}"


def to_markdown(results: Sequence[Result], header: str) -> str:
    lines = ["# geodiag bench", "", header, "",
             "| benchmark | subject | vs | value | target | met | method |", "|---|---|---|---|---|---|---|"]
    for r in results:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.benchmark} | {r.subject} | {r.baseline} | {_format(r.value)} {r.unit} | {r.target} "
                     f"| {met} | {r.method} |")
    return "\n".join(lines) + "\n"


def to_csv(results: Sequence[Result]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=BENCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({**asdict(r), "met": "" if r.met is None else str(r.met).lower()})
    return buffer.getvalue()


def readme_table(results: Sequence[Result]) -> str:
    """The rows with a target, as the README's "What it costs" table (paste it there)."""
    lines = ["| measured | vs | value | target | met |", "|---|---|---|---|---|"]
    for r in results:
        if r.target:
            lines.append(f"| {r.benchmark}: {r.subject} | {r.baseline} | {_format(r.value)} {r.unit} | {r.target} "
                         f"| {'yes' if r.met else '**no**'} |")
    return "\n".join(lines) + "\n"


def missed_targets(results: Sequence[Result]) -> list[str]:
    """One line per missed target."""
    return [f"missed: {r.benchmark}: {r.subject} vs {r.baseline or 'nothing'}: {_format(r.value)} {r.unit}, "
            f"target {r.target}" for r in results if r.met is False]


def write_results(results: Sequence[Result], out: Path, header: str) -> tuple[Path, Path]:
    """DIR/bench.csv, DIR/bench.md and DIR/readme_table.md."""
    try:
        csv_path = write_text(out / "bench.csv", to_csv(results))
        md_path = write_text(out / "bench.md", to_markdown(results, header))
        write_text(out / "readme_table.md", header + "\n\n" + readme_table(results))
    except OSError as exc:
        raise GeodiagError(f"cannot write the bench results into {out}: {exc.strerror or exc}") from None
    return csv_path, md_path


def _format(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
