"""The reference study behind reports/reference/: datasets 501 and 502 under the seed's V2.3, V2.4 and production.

The seed trained 512^2 images for 100 epochs on a GPU with a warm-up of 5 epochs; here 40 images of 128^2, 10
epochs of 10 iterations with the same warm-up of 5, on the CPU. Checkpoints of the first
epoch (uncertain predictions) and of the epochs before, at and after the switch-on are swept; the V2.3 run on 502 (the seed's incident) is always analysed, as
trained and with a bare sqrt, and so is any run that goes non-finite.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .study import Log, RunSpec, Study, run_study

TRAINERS = ("nnUNetTrainerGeometricV23", "nnUNetTrainerGeometricV24", "nnUNetTrainerGeometric")
RUNS = tuple(RunSpec(dataset, trainer, epochs=10, iterations=10, warmup=5)
             for dataset in (501, 502) for trainer in TRAINERS)
# What is committed: Markdown, PNG figures and tables; never checkpoints, data or per-case files, and not the HTML
# renderings (they embed the same PNGs again; the study folder keeps them).
EXCLUDED = ("nnunet", "cases")
EXCLUDED_SUFFIXES = (".parquet", ".html")


def reference_study(work: str | Path, device: str = "cpu", log: Log = print) -> Study:
    """The seed's incident (V2.3 on 502) is analysed as trained and with a bare sqrt (additive, eps 0), which shows
    what a sqrt without protection does on the same predictions."""
    incident = next(run.name for run in RUNS if run.dataset_id == 502 and run.trainer.endswith("V23"))
    return Study(out=Path(work).absolute(), datasets=(501, 502), runs=RUNS, num_images=40, image_size=128,
                 analyse=((incident, {}), (incident, {"stabilizer": "additive", "eps": 0.0})), cases=8,
                 sweep_epochs=(-5, -1, 0, 1), device=device, log=log)


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
        s.out, "geodiag reference study: datasets 501 and 502 under V2.3, V2.4 and production").markdown)
    report_dir = Path(report_dir)
    if report_dir.exists():
        shutil.rmtree(report_dir)
    files = publish(study.out, report_dir)
    log(f"published {len(files)} files to {report_dir}")
    return report_dir / "report.md"
