"""The demo: the reference study in miniature, small enough for a 2-core CPU in under 2 minutes.

Dataset 502 (one circle per image); the seed replica at V2.3 (a user's trainer and loss, found through
nnUNet_extTrainer and read through --loss) beside geodiag's production trainer, both switching the geometric term
on at epoch 2; their switch-on checkpoints measured, analysed and swept; one report.
"""
from __future__ import annotations

from pathlib import Path

from geodiag.reports import seed

from .replica import seed_replica
from .definition import Log, RunSpec, Study
from .study import run_study

RUNS = (RunSpec(502, "nnUNetTrainerSeedReplicaV23", epochs=3, iterations=4, warmup=2, user=seed_replica(seed.V23)),
        RunSpec(502, "nnUNetTrainerGeometric", epochs=3, iterations=4, warmup=2))


def demo_study(out: str | Path, num_images: int = 24, image_size: int = 96, seed: int = 0, device: str = "cpu",
               log: Log = print) -> Study:
    return Study(out=Path(out).absolute(), datasets=(502,), runs=RUNS, num_images=num_images,
                 image_size=image_size, cases=4, term_batches=2, sweep_eps=(1e-8, 1e-4, 1e-2, 1e-1),
                 watch_every=4, seed=seed, device=device, log=log)


def run_demo(out: str | Path, log: Log = print, **settings) -> Path:
    """Run the demo study; returns the path of its Markdown report."""
    from geodiag.reports import study_report

    study = demo_study(out, log=log, **settings)
    return run_study(study, report=lambda s: study_report.render(
        s.out, f"geodiag demo: the seed replica ({seed.V23.name}) beside production on dataset 502").markdown)
