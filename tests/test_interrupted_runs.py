"""A long run killed mid-way loses nothing: --resume keeps every finished case and ends with the same tables."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from geodiag.diagnostics.cli import main

CASES = "shapes_one_000,shapes_one_001,shapes_one_002,shapes_one_003"
START_TIMEOUT_S = 300


def _kill_after_first_case(argv: list[str], out: Path, finished: str, tmp_path: Path) -> None:
    """Run the real CLI in a subprocess and SIGKILL it as soon as the first per-case file is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same single thread as the in-process reference run
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "geodiag.diagnostics.cli", *argv], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while not list((out / "cases").glob(finished)):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "no case finished in time"
                time.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL


def _leave_a_half_written_temporary(folder: Path, target: str) -> Path:
    """What a kill during an atomic write leaves: a hidden temporary sibling, never the target itself."""
    leftover = folder / f".{target}.k1ll3d.tmp"
    leftover.write_text('{"case": "half')
    return leftover


def _run(argv: list[str]) -> None:
    assert main(argv) == 0


# command, its extra arguments, the per-case files (folder under cases/, glob), the file written beside each, tables
RESUMABLE = {
    "analyze-checkpoint": ([], "fp32", "*.json", ".npz", ("tensors", "histograms", "eps_fractions", "terms")),
    "clamp-sweep": (["--stabilizers", "clamp,shifted", "--eps", "1e-4,1e-2", "--precision", "fp32"], "ckpt",
                    "*[0-9].csv", ".hist.csv", ("sweep", "sweep_hist")),
}


@pytest.mark.parametrize("command", list(RESUMABLE))
def test_killed_run_resumes_without_recomputing_and_equals_an_uninterrupted_one(geometric_run, tmp_path, command):
    extra, folder, pattern, partner, names = RESUMABLE[command]
    checkpoint = str(geometric_run.checkpoints[geometric_run.switch_on_epoch])
    spec = checkpoint if command == "analyze-checkpoint" else f"ckpt={checkpoint}"
    argv = [command, spec, "--cases", CASES, *extra]
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run([*argv, "--out", str(full)])

    _kill_after_first_case([*argv, "--out", str(killed)], killed, f"{folder}/{pattern}", tmp_path)
    cases = killed / "cases" / folder
    done = sorted(cases.glob(pattern))
    assert 1 <= len(done) < 4, "the kill must land mid-way"
    kept = {p: p.stat().st_mtime_ns for p in done + [p.with_suffix(partner) for p in done]}
    leftover = _leave_a_half_written_temporary(cases, f"shapes_one_003{done[0].suffix}")

    _run([*argv, "--out", str(killed), "--resume"])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "a finished case was recomputed"
    assert len(list(cases.glob(pattern))) == 4 and leftover.exists()
    for name in names:
        pd.testing.assert_frame_equal(pd.read_csv(killed / f"{name}.csv"), pd.read_csv(full / f"{name}.csv"))


@pytest.mark.parametrize("command", ["analyze-checkpoint", "clamp-sweep"])
def test_rerunning_into_a_killed_runs_folder_without_resume_is_refused(geometric_run, tmp_path, capsys, command):
    """A second run must not silently mix with (or overwrite) the finished cases of a killed one."""
    checkpoint = str(geometric_run.checkpoints[geometric_run.switch_on_epoch])
    folder = tmp_path / "cases" / ("fp32" if command == "analyze-checkpoint" else "ckpt")
    folder.mkdir(parents=True)
    (folder / ("shapes_one_000.json" if command == "analyze-checkpoint" else "shapes_one_000.csv")).write_text("{}")
    target = checkpoint if command == "analyze-checkpoint" else f"ckpt={checkpoint}"
    assert main([command, target, "--out", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


# first run's options, the resumed run's, and what the refusal must name
CHANGED_SETTINGS = {
    "analyze-eps": ("analyze-checkpoint", ["--eps", "1e-2"], ["--eps", "1e-4"], "eps was 0.01 and is now 0.0001"),
    "analyze-stabilizer": ("analyze-checkpoint", ["--stabilizer", "clamp"], ["--stabilizer", "additive"],
                           "stabilizer was clamp and is now additive"),
    "analyze-patches": ("analyze-checkpoint", ["--patches", "1"], ["--patches", "2"], "patches was 1 and is now 2"),
    "sweep-eps": ("clamp-sweep", ["--eps", "1e-2"], ["--eps", "1e-4"], "settings was [['clamp', 0.01]]"),
    "sweep-stabilizers": ("clamp-sweep", ["--stabilizers", "clamp"], ["--stabilizers", "shifted"], "settings was"),
    "sweep-precision": ("clamp-sweep", ["--precision", "fp32"], ["--precision", "bf16"],
                        "precisions was ['fp32'] and is now ['bf16']"),
}


@pytest.mark.parametrize("name", list(CHANGED_SETTINGS))
def test_resuming_with_other_settings_is_refused_naming_what_changed(stock_run, tmp_path, capsys, name):
    """Finished cases computed with one eps must never be merged with cases of another under one label."""
    command, first, changed, needle = CHANGED_SETTINGS[name]
    checkpoint = str(stock_run.final_checkpoint)
    target = checkpoint if command == "analyze-checkpoint" else f"ckpt={checkpoint}"
    fixed = [] if command == "analyze-checkpoint" else ["--stabilizers", "clamp", "--precision", "fp32"]
    argv = [command, target, "--cases", "shapes_one_000", "--out", str(tmp_path), "--device", "cpu"]
    _run([*argv, *fixed, *first])
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "cases").glob("*/*") if p.is_file()}
    capsys.readouterr()
    assert main([*argv, *fixed, *changed, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"geodiag {command}: error: --resume:") and needle in err[0], err
    assert {p: p.stat().st_mtime_ns for p in finished} == finished


def test_resuming_an_analysis_with_another_precision_computes_only_that_precision(stock_run, tmp_path):
    argv = ["analyze-checkpoint", str(stock_run.final_checkpoint), "--cases", "shapes_one_000", "--out",
            str(tmp_path), "--device", "cpu"]
    _run([*argv, "--precision", "fp32"])
    fp32 = tmp_path / "cases" / "fp32" / "shapes_one_000.json"
    before = fp32.stat().st_mtime_ns
    _run([*argv, "--precision", "fp32,bf16", "--resume"])
    assert fp32.stat().st_mtime_ns == before and (tmp_path / "cases" / "bf16" / "shapes_one_000.json").exists()
    assert set(pd.read_csv(tmp_path / "tensors.csv").precision) == {"fp32", "bf16"}
