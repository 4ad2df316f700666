"""The demo: the main job on an embedded default, small enough for a 2-core CPU in a few minutes.

Dataset 502 (one circle per image), nnUNetTrainerGeometricQuick with the geometric term switching on at epoch 2,
the switch-on checkpoint analysed, the checkpoints around it swept over every (stabiliser, eps), one report.
"""
from __future__ import annotations

from pathlib import Path

from .study import Log, RunSpec, Study, run_study

QUICK = RunSpec(502, "nnUNetTrainerGeometricQuick", epochs=6, iterations=4, warmup=2)


def demo_study(out: str | Path, num_images: int = 24, image_size: int = 96, seed: int = 0, device: str = "cpu",
               log: Log = print) -> Study:
    return Study(out=Path(out).absolute(), datasets=(502,), runs=(QUICK,), num_images=num_images,
                 image_size=image_size, analyse=((QUICK.name, {}),), cases=4, seed=seed, device=device, log=log)


def run_demo(out: str | Path, log: Log = print, **settings) -> Path:
    """Run the demo study; returns the path of its Markdown report."""
    from geodiag.reports import study_report

    study = demo_study(out, log=log, **settings)
    return run_study(study, report=lambda s: study_report.render(s.out, "geodiag demo: dataset 502").markdown)
