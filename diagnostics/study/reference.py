"""The reference study behind reports/reference/: the seed's design (the replica at V2.3 and V2.4, a user's code
to geodiag) and geodiag's production loss for contrast, on datasets 501 and 502, under geodiag watch.

The seed trained 512² images, batch 8, 250 iterations per epoch, the geometric term from epoch 5; here images of
``IMAGE_SIZE``², batch 8, ``ITERATIONS`` per epoch with the same warm-up of 5 epochs, on the CPU (the size
``geodiag reference-report`` can afford; the README gives its measured time). Each run's first and switch-on
checkpoints are measured; the switch-on checkpoints are analysed and swept.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .replica import seed_replica
from .definition import Log, RunSpec, Study
from .study import run_study

IMAGE_SIZE = 256
IMAGES = 40
ITERATIONS = 20
WARMUP = 5
EPOCHS = WARMUP + 2
TRAINERS = (("nnUNetTrainerSeedReplicaV23", seed_replica("V2.3")),
            ("nnUNetTrainerSeedReplicaV24", seed_replica("V2.4")),
            ("nnUNetTrainerGeometric", None))
RUNS = tuple(RunSpec(dataset, trainer, epochs=EPOCHS, iterations=ITERATIONS, warmup=WARMUP, user=user)
             for dataset in (501, 502) for trainer, user in TRAINERS)
# What is committed: Markdown, PNG figures and tables; never checkpoints, data or per-case files, and not the HTML
# renderings (they embed the same PNGs again; the study folder keeps them).
EXCLUDED = ("nnunet", "cases")
EXCLUDED_SUFFIXES = (".parquet", ".html", ".log")


def reference_study(work: str | Path, device: str = "cpu", log: Log = print) -> Study:
    return Study(out=Path(work).absolute(), datasets=(501, 502), runs=RUNS, num_images=IMAGES,
                 image_size=IMAGE_SIZE, batch_size=8, cases=8, term_batches=4, device=device, log=log)


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
    run_study(study, report=lambda s: study_report.render(
        s.out, "geodiag reference study: the seed's design (replica V2.3, V2.4) and production on 501 and 502"
    ).markdown)
    report_dir = Path(report_dir)
    if report_dir.exists():
        shutil.rmtree(report_dir)
    files = publish(study.out, report_dir)
    log(f"published {len(files)} files to {report_dir}")
    return report_dir / "report.md"
