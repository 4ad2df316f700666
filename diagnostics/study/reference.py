"""The reference study behind reports/reference/: the seed's design (the replica at each of its versions, a user's
code to geodiag) and geodiag's production loss for contrast, on datasets 501 and 502, under geodiag watch.

The seed's run (``geodiag.reports.seed``: its image size, batch, iterations per epoch and warm-up) does not fit on
the CPU; here images of ``IMAGE_SIZE``², the seed's batch, ``ITERATIONS`` per epoch and the seed's warm-up (the size
``geodiag reference-report`` can afford; study.json records its measured time). Every configuration runs with each
of ``SEEDS`` (initialisation, patches, batches), so the report gives each claim's median and range over seeds; each
run's first and switch-on checkpoints are measured, and the first seed's switch-on checkpoints analysed and swept.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from geodiag.reports import seed

from .replica import seed_replica
from .definition import Log, RunSpec, Study, seeded
from .study import run_study

IMAGE_SIZE = 192
IMAGES = 40
ITERATIONS = 10
SEEDS = (0, 1, 2)
ANALYSED_SEEDS = SEEDS[:1]
WARMUP = seed.WARMUP
EPOCHS = WARMUP + 1  # the switch-on epoch is the last
TRAINERS = (("nnUNetTrainerSeedReplicaV23", seed_replica(seed.V23)),
            ("nnUNetTrainerSeedReplicaV24", seed_replica(seed.V24)),
            ("nnUNetTrainerGeometric", None))
TITLE = (f"geodiag reference study: the seed's design (replica {', '.join(v.name for v in seed.VERSIONS)}) and "
         "production on 501 and 502")
RUNS = seeded(tuple(RunSpec(dataset, trainer, epochs=EPOCHS, iterations=ITERATIONS, warmup=WARMUP, user=user)
                    for dataset in (501, 502) for trainer, user in TRAINERS), SEEDS)
# What the budget (under 60 minutes on 2 shared cores) cut, relative to the single-seed reference before it.
REDUCTIONS = (f"images of {IMAGE_SIZE}² instead of 256², {ITERATIONS} iterations per epoch instead of 20 and "
              f"{EPOCHS} epochs instead of {WARMUP + 2} (the switch-on epoch is the last; the largest step norm after it "
              f"covers that epoch only), to train {len(SEEDS)} seeds of every configuration",
              f"analysis, clamp sweep and replica sweep on seed {', '.join(map(str, ANALYSED_SEEDS))}'s runs only")
# What is committed: Markdown, PNG figures and tables; never checkpoints, data or per-case files, and not the HTML
# renderings (they embed the same PNGs again; the study folder keeps them).
EXCLUDED = ("nnunet", "cases")
EXCLUDED_SUFFIXES = (".parquet", ".html", ".log")


def reference_study(work: str | Path, device: str = "cpu", log: Log = print) -> Study:
    return Study(out=Path(work).absolute(), datasets=(501, 502), runs=RUNS, num_images=IMAGES,
                 image_size=IMAGE_SIZE, batch_size=seed.BATCH_SIZE, cases=8, term_batches=4, seed=SEEDS[0],
                 analysed_seeds=ANALYSED_SEEDS, reductions=REDUCTIONS, device=device, log=log)


def publish(work: Path, report_dir: Path) -> list[Path]:
    """Copy the study's reports and tables (Markdown, PNG, CSV, JSON) into ``report_dir``."""
    written = []
    for path in sorted(work.rglob("*")):
        relative = path.relative_to(work)
        if not path.is_file() or set(relative.parts) & set(EXCLUDED) or path.suffix in EXCLUDED_SUFFIXES:
            continue
        target = report_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        written.append(target)
    return written


def run_reference(work: str | Path, report_dir: str | Path, device: str = "cpu", log: Log = print) -> Path:
    """Regenerate the reference study in ``work`` and publish its reports into ``report_dir``."""
    from geodiag.reports import study_report

    study = reference_study(work, device=device, log=log)
    run_study(study, report=lambda s: study_report.render(s.out, TITLE).markdown)
    report_dir = Path(report_dir)
    if report_dir.exists():
        shutil.rmtree(report_dir)
    files = publish(study.out, report_dir)
    log(f"published {len(files)} files to {report_dir}")
    return report_dir / "report.md"
