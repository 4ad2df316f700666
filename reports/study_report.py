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

from . import figures, seed, study_figures, study_screen
from .html import Figure, RenderedReport, Section, write_report
from .readme_block import README_BLOCK, readme_block
from .schema import write_text
from .screens import first_screen
from .study_answers import (datasets_section, nonfinite_section, replica_sweep_section, seed_statistics_section,
                            shares_section)
from .study_causes import causes, causes_section
from .study_tables import (StudyTables, nonfinite_per_precision, run_configurations, sqrt_clamp_rows, sqrt_sites,
                           switch_on_checkpoint, seeds_sentence, timing_sentence, user_runs, user_sites)
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
            + seeds_sentence(study) + timing_sentence(study) + "\n\n" + markdown_table(pd.DataFrame(rows)))
    return Section("What ran", body)


def _links(tables: StudyTables) -> list[str]:
    links = [f"- analysis of {name}: `analysis/{name}/report.md`" for name in tables.analyses]
    if tables.sweep is not None:
        links.append("- geodiag's clamp sweep: `sweep/report.md`")
    if tables.replica_sweep is not None:
        links.append("- the replica's clamps swept at their lines: `replica_sweep/report.md`")
    return links


def _first_screen(directory: Path, tables: StudyTables, sites: pd.DataFrame, clamps: pd.DataFrame,
                  numbers: dict[str, int], remaining: int) -> Section:
    """The answers with their evidence (``numbers``: question key -> its section's number), then the key figure."""
    analysed = sorted(sites["precision"].unique()) if not sites.empty else []
    bad = int(nonfinite_per_precision(sites)[["forward", "backward"]].to_numpy().sum()) if analysed else 0
    replica_sweep = f"§{numbers['sweep']}, `replica_sweep/report.md`"
    answers = [study_screen.reproduced(tables, bad, ", ".join(analysed) or "no precision", f"§{numbers['nan']}"),
               study_screen.precisions(tables, f"§{numbers['nan']}, `loss_precisions.csv`"),
               study_screen.clamp_change(tables, replica_sweep), study_screen.rule_pick(tables, replica_sweep),
               study_screen.prior_effect(tables, clamps, f"§{numbers['shares']}, §{numbers['s']}"),
               study_screen.next_run(remaining, f"§{numbers['causes']}")]
    configurations = run_configurations(tables.study)
    runs = {run["run"]: (f"replica {run['seed_version']}" if run["seed_version"] else configurations[run["run"]],
                         switch_on_checkpoint(run)) for run in user_runs(tables.study) or tables.study["runs"]}
    path = study_figures.s_distribution(tables.s_distribution, runs, directory / "figures" / "s_distribution.png")
    return first_screen([answer for answer in answers if answer is not None], Figure(
        path, "The distribution of the replica's s = gx² + gy² (raw Sobel, the seed's units) over the pixels of "
              f"{tables.study['cases']} whole images per run, against the seed's clamps (vertical lines): share of "
              "pixels per quarter decade (top) and below each s (bottom); untrained: nnU-Net's initialisation of "
              "the same network under each run's seed; each configuration pooled over its seeds (band: the range "
              "of the seeds); a configuration drawn wide and pale lies under the next, so one visible line means they "
              "coincide; stars: the seed's reported shares at its switch-on. A pixel below a clamp gets zero "
              "gradient from that sqrt."))


def render(directory: str | Path, title: str = "geodiag study") -> RenderedReport:
    """Write DIR/report.md and DIR/report.html (and DIR/figures/*.png) from the study's tables."""
    directory = Path(directory)
    tables = StudyTables.read(directory)
    sites = user_sites(tables.analyses, tables.study)
    clamps = sqrt_clamp_rows(sites, tables.study)

    curves = figures.training_curves(tables.runs, directory / "figures" / "training.png")
    answered = {"nan": nonfinite_section(tables, sites),
                "shares": shares_section(tables.gradients, clamps, tables.study),
                "s": seed_statistics_section(tables.small_s, tables.study),
                "sweep": replica_sweep_section(tables, sqrt_sites(tables.study))}
    compared = datasets_section(tables, clamps)
    if compared is not None:
        answered["datasets"] = compared
    answered["causes"] = causes_section(tables, sites, clamps)
    numbers = {key: number for number, key in enumerate(answered, start=1)}
    remaining = sum(cause.applicable for cause in causes(tables, sites, clamps))
    setup = setup_section(tables.study, tables.runs)
    setup = Section(setup.title, setup.body, figures=(Figure(
        curves, "Per run: the epoch mean of the training loss (Dice+CE plus the geometric terms once on); dashed: "
                "the switch-on epoch; a gap is a non-finite epoch."),))
    sections = [_first_screen(directory, tables, sites, clamps, numbers, remaining), setup]
    sections += [section for section, _ in answered.values()]
    sections.append(Section("Details", "\n".join(_links(tables)) or "No analysis or sweep was run."))
    data = [directory / name for name in ("runs.csv", "switch_on_s.csv", "s_distribution.csv", "term_gradients.csv",
                                          "loss_precisions.csv", "study.json")]
    rendered = write_report(directory, title, sections, data=data)
    block = write_text(directory / README_BLOCK, readme_block(directory))
    return RenderedReport(rendered.markdown, rendered.html, rendered.figures, [*rendered.data, block])
