"""The study report: the seed's design (its loss and trainer, replayed as a user's code) beside geodiag's production
loss, and the seed's questions answered from the study's own tables.

Inputs (written by ``geodiag.diagnostics.study``): DIR/study.json (settings, runs, watch's first_nonfinite.json of
each run), DIR/runs.csv, DIR/switch_on_s.csv, DIR/term_gradients.csv, DIR/analysis/<run>/summary.json, and the
sweeps when present: DIR/sweep/ (geodiag's loss at each clamp eps) and DIR/replica_sweep/ (the replica's own
sqrt clamps replaced at their lines). Every number in the report is read or computed from those tables; the
thresholds behind words such as "inert" or "differ" are printed beside them.

Units: the seed computes s = gx^2 + gy^2 with the raw Sobel kernel and zero padding, ``seed.UNITS_FACTOR`` times
geodiag's normalised s (2D). Shares of pixels below the seed's thresholds are compared with the seed's in its units
(switch_on_s.csv); geodiag's sweep eps act on the normalised s.

The work is split by job: ``study_tables`` reads and aggregates, ``study_answers`` and ``study_causes`` word the
answers, this module lays out the report.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import figures, seed
from .html import Figure, RenderedReport, Section, write_report
from .study_answers import (datasets_section, nonfinite_section, replica_sweep_section, seed_statistics_section,
                            shares_section)
from .study_causes import causes_section
from .study_tables import StudyTables, sqrt_clamp_rows, sqrt_sites, user_sites
from .tables import markdown_table


def setup_section(study: dict, runs: pd.DataFrame) -> Section:
    """What ran, at which size, relative to the seed's run."""
    rows = []
    for run in study["runs"]:
        loss = run["loss"]
        if run["code"] == "user":
            what, eps = f"`{Path(loss.rsplit(':', 1)[0]).name}:{loss.rsplit(':', 1)[1]}`", None
        else:
            what, eps = (f"GeometricLoss {loss['geometric_preset']} ({loss['stabilizer']})", loss["eps"]) \
                if loss else ("GeometricLoss", None)
        frame = runs[runs["run"] == run["run"]]
        rows.append({"run": run["run"], "code": run["code"], "trainer": run["trainer"], "loss": what,
                     "GeometricLoss eps": eps, "epochs trained": len(frame), "iterations/epoch": run["iterations"],
                     "switch-on epoch": run["warmup"], "batch": run["batch_size"],
                     "patch": "×".join(str(p) for p in run["patch_size"]),
                     "under geodiag watch": run["watched"]})
    first = study["runs"][0]
    size, batch, iterations = study["image_size"], first["batch_size"], first["iterations"]
    body = (f"{study['images']} synthetic images of {size}² per dataset, nnU-Net's `2d_tiny` configuration, "
            f"{study['device']}. Relative to the seed's run ({seed.IMAGE_SIZE}², batch {seed.BATCH_SIZE}, "
            f"{seed.ITERATIONS} iterations per epoch, {seed.EPOCHS} epochs, switch-on at epoch {seed.WARMUP}): "
            f"{(seed.IMAGE_SIZE / size) ** 2:.3g}x fewer pixels per image, batch {batch} (the seed's: "
            f"{seed.BATCH_SIZE}; the replica's loss sees the first {min(batch, first.get('samples') or batch)} "
            f"samples, the seed's {seed.LOSS_SAMPLES}), {iterations} instead of {seed.ITERATIONS} iterations per "
            f"epoch ({seed.ITERATIONS * seed.WARMUP} steps before the seed's switch-on, "
            f"{iterations * first['warmup']} here). Runs whose code is `user` are the seed "
            "replica: a trainer nnU-Net found through `nnUNet_extTrainer`, its loss read through `--loss`; "
            "geodiag imports nothing from it."
            + (" The CUDA regime (the seed's own size, nnU-Net's default AMP path) needs a GPU and was not run."
               if study["device"] == "cpu" else "")
            + "\n\n" + markdown_table(pd.DataFrame(rows)))
    return Section("What ran", body)


def _links(tables: StudyTables) -> list[str]:
    links = [f"- analysis of {name}: `analysis/{name}/report.md`" for name in tables.analyses]
    if tables.sweep is not None:
        links.append("- geodiag's clamp sweep: `sweep/report.md`")
    if tables.replica_sweep is not None:
        links.append("- the replica's clamps swept at their lines: `replica_sweep/report.md`")
    return links


def render(directory: str | Path, title: str = "geodiag study") -> RenderedReport:
    """Write DIR/report.md and DIR/report.html (and DIR/figures/training.png) from the study's tables."""
    directory = Path(directory)
    tables = StudyTables.read(directory)
    sites = user_sites(tables.analyses, tables.study)
    clamps = sqrt_clamp_rows(sites, tables.study)

    curves = figures.training_curves(tables.runs, directory / "figures" / "training.png")
    answered = [nonfinite_section(tables, sites), shares_section(tables.gradients, clamps, tables.study),
                seed_statistics_section(tables.small_s, tables.study),
                replica_sweep_section(tables, sqrt_sites(tables.study))]
    compared = datasets_section(tables, clamps)
    if compared is not None:
        answered.append(compared)
    answered.append(causes_section(tables, sites, clamps))
    summary = "\n".join(f"{i}. {answer}" for i, (_, answer) in enumerate(answered, start=1))
    setup = setup_section(tables.study, tables.runs)
    setup = Section(setup.title, setup.body, figures=(Figure(
        curves, "Per run: the epoch mean of the training loss (Dice+CE plus the geometric terms once on); dashed: "
                "the switch-on epoch; a gap is a non-finite epoch."),))
    sections = [Section("Answers", summary), setup] + [section for section, _ in answered]
    sections.append(Section("Details", "\n".join(_links(tables)) or "No analysis or sweep was run."))
    data = [directory / name for name in ("runs.csv", "switch_on_s.csv", "term_gradients.csv", "loss_precisions.csv",
                                          "study.json")]
    return write_report(directory, title, sections, data=data)
