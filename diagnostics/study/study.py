"""A study: synthetic datasets, nnU-Net runs with the geometric term switching on, then analysis, sweep and report.

The demo (one dataset, one run) and the reference report (datasets 501 and 502 under the seed's V2.3, V2.4 and the
production settings) are two configurations of the same steps. Every step reuses what an earlier run left in the
study folder, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from geodiag.losses import GEOMETRIC_TERMS
from geodiag.reports import schema, tables

from ..nnunet.datasets import dataset_spec, generator_settings, make_dataset
from ..nnunet.environment import NnunetDirs, nnunet_env
from ..instruments.errors import GeodiagError
from ..progress import counter
from ..tools.run_record import check_out
from ..nnunet.plans import PLANS_NAME, TINY_CONFIGURATION, plan_and_preprocess

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """One training run: a geodiag trainer class on a dataset, with its schedule."""

    dataset_id: int
    trainer: str
    epochs: int
    iterations: int
    warmup: int
    val_iterations: int = 2

    @property
    def name(self) -> str:
        return f"{self.dataset_id}-{self.trainer.replace('nnUNetTrainerGeometric', '') or 'Production'}"


@dataclass
class Study:
    """What the steps share: settings, where things are, and what earlier steps produced."""

    out: Path
    datasets: tuple[int, ...]
    runs: tuple[RunSpec, ...]
    num_images: int
    image_size: int
    sweep_epochs: tuple[int, ...] = (-1, 0, 1)  # relative to the switch-on epoch
    # (run name, loss overrides such as {"stabilizer": "additive", "eps": 0.0}): switch-on checkpoints always analysed
    analyse: tuple[tuple[str, dict], ...] = ()
    cases: int = 8
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    seed: int = 0
    device: str = "cpu"
    log: Log = print
    products: dict = field(default_factory=dict)

    @property
    def dirs(self) -> NnunetDirs:
        return NnunetDirs.under(self.out / "nnunet")

    def fold_folder(self, run: RunSpec) -> Path:
        name = dataset_spec(run.dataset_id).folder_name
        return self.dirs.results / name / f"{run.trainer}__{PLANS_NAME}__{TINY_CONFIGURATION}" / "fold_0"


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Study], None]


@contextlib.contextmanager
def _nnunet_environment(study: Study):
    """What ``nnunet_env`` gives nnU-Net's tools, with the study's folders, for in-process training (nnU-Net reads
    its variables lazily); torch.compile stays off so hooks see every op. os.environ is restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(nnunet_env(study.dirs, nnUNet_compile="f"))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------------------------------- steps
def make_data(study: Study) -> None:
    for dataset_id in study.datasets:
        folder = study.dirs.raw / dataset_spec(dataset_id).folder_name
        wanted = {"num": study.num_images, "size": study.image_size, "seed": study.seed, "num_test": 0}
        if generator_settings(folder) == wanted:
            study.log(f"  reusing {folder}")
            continue
        make_dataset(dataset_id, study.dirs.create().raw, num=study.num_images, size=study.image_size, seed=study.seed)
        study.log(f"  wrote {study.num_images} images of {study.image_size}² to {folder}")


def plan(study: Study) -> None:
    for dataset_id in study.datasets:
        name = dataset_spec(dataset_id).folder_name
        plans_file = study.dirs.preprocessed / name / f"{PLANS_NAME}.json"
        raw_json = study.dirs.raw / name / "dataset.json"
        if plans_file.is_file() and plans_file.stat().st_mtime >= raw_json.stat().st_mtime:
            study.log(f"  reusing {plans_file}")
            continue
        study.log(f"  nnUNetv2_plan_and_preprocess -d {dataset_id} (about 20 s), then configuration {TINY_CONFIGURATION}")
        plan_and_preprocess(dataset_id, study.dirs)


def train(study: Study) -> None:
    """Each run through nnU-Net's own trainer loop, in process, its console output in the fold's train.log."""
    import torch

    from ..nnunet.checkpoint import geodiag_trainer

    for run in study.runs:
        folder = study.fold_folder(run)
        if (folder / "checkpoint_final.pth").is_file():
            study.log(f"  {run.name}: reusing {folder}")
            continue
        trainer_class = geodiag_trainer(run.trainer)
        if trainer_class is None:
            raise GeodiagError(f"unknown geodiag trainer {run.trainer!r}")
        name = dataset_spec(run.dataset_id).folder_name
        plans = schema.read_json(study.dirs.preprocessed / name / f"{PLANS_NAME}.json")
        plans["continue_training"] = False
        dataset_json = schema.read_json(study.dirs.preprocessed / name / "dataset.json")
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        console = sys.stdout  # nnU-Net's own prints go to train.log, the progress to the console

        def to_console(message: str) -> None:
            with contextlib.redirect_stdout(console):
                study.log(message)

        with _nnunet_environment(study), open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log), \
                counter(run.epochs, f"  {run.name}", "epoch", to_console) as advance:
            trainer = trainer_class(plans, TINY_CONFIGURATION, 0, dataset_json, torch.device(study.device))
            trainer.num_epochs = run.epochs
            trainer.num_iterations_per_epoch = run.iterations
            trainer.num_val_iterations_per_epoch = run.val_iterations
            trainer.warmup_epochs = run.warmup
            trainer.save_every_epoch = True
            end_epoch = trainer.on_epoch_end

            def on_epoch_end() -> None:
                end_epoch()
                advance()

            trainer.on_epoch_end = on_epoch_end
            trainer.run_training()
        study.log(f"  {run.name}: {run.epochs} epochs of {run.iterations} iterations, geometric term from epoch "
                  f"{run.warmup}, in {time.perf_counter() - start:.0f} s")


def summarize(study: Study) -> None:
    """runs.csv: per run and epoch, what nnU-Net logged (Dice+CE, each geometric term, skips, gradient norm)."""
    from ..nnunet.checkpoint import load_checkpoint

    rows = []
    for run in study.runs:
        checkpoint = load_checkpoint(study.fold_folder(run) / "checkpoint_final.pth")
        logging = checkpoint.data["logging"]
        settings = schema.read_json(study.fold_folder(run) / "geometric_settings.json") \
            if (study.fold_folder(run) / "geometric_settings.json").exists() else {}
        for epoch in range(len(logging["train_losses"])):
            def value(key: str) -> float:
                series = logging.get(key, [])
                return float(series[epoch]) if epoch < len(series) else math.nan

            rows.append({
                "run": run.name, "dataset": run.dataset_id, "trainer": run.trainer,
                "preset": settings.get("geometric_preset"), "stabilizer": settings.get("stabilizer"),
                "eps": settings.get("eps"), "warmup": run.warmup, "epoch": epoch,
                "geometric_active": bool(logging["geometric_active"][epoch]), "train_loss": value("train_losses"),
                "train_dc_ce": value("train_dc_ce"), "train_geometric": value("train_geometric"),
                **{f"train_{term}": value(f"train_{term}") for term in GEOMETRIC_TERMS},
                "val_loss": value("val_losses"), "pseudo_dice": value("mean_fg_dice"),
                "skipped_steps": value("skipped_steps"), "grad_norm_max": value("grad_norm_max")})
    frame = pd.DataFrame(rows, columns=schema.RUN_COLUMNS)
    tables.write_table(frame, study.out / "runs.csv")
    last = frame.groupby("run").tail(1)
    for row in last.itertuples():
        bad = frame[(frame.run == row.run) & frame.train_loss.map(lambda v: not math.isfinite(v))]
        study.log(f"  {row.run}: final train loss {row.train_loss:.4g}, pseudo Dice {row.pseudo_dice:.3f}, "
                  f"non-finite epochs {len(bad)}, skipped steps {int(frame[frame.run == row.run].skipped_steps.sum())}")
    study.products["runs"] = frame


def _checkpoint(study: Study, run: RunSpec, epoch: int) -> Path:
    return study.fold_folder(run) / f"checkpoint_epoch_{epoch:04d}.pth"


def small_s_shares(path: Path, max_cases: int, device: str = "cpu") -> list[dict]:
    """Per case of a checkpoint, the share of pixels whose s = gx^2 + gy^2 lies below each threshold the seed quotes
    (``SEED_BELOW``), with s in the seed's units (raw Sobel, zero padding: the ``v2.3`` preset's s) and in
    geodiag's normalised units (the ``production`` preset's, 1/64 of it in 2D). Whole-image fp32 predictions."""
    import torch

    from geodiag.losses import GeometricLoss
    from geodiag.reports.study_report import SEED_BELOW

    from ..nnunet.cases import find_cases, predict_logits, preprocess
    from ..nnunet.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    classes = checkpoint.foreground_classes
    patch_size = checkpoint.patch_size
    network = checkpoint.network().to(device)
    losses = {units: GeometricLoss.from_preset(preset, classes=classes, softmax=True, reference="prior",
                                               aspect_weight=0)
              for units, preset in (("seed", "v2.3"), ("normalised", "production"))}
    rows = []
    for files in find_cases(checkpoint)[:max_cases]:
        case = preprocess(checkpoint, files)
        with torch.no_grad():
            logits = predict_logits(network, case.image, patch_size).float()
            for units, loss in losses.items():
                seen = {}
                with loss.register_tap(lambda name, t: seen.__setitem__(name, t),
                                       names=("compactness.grad_mag_squared",)):
                    loss(logits)
                s = seen["compactness.grad_mag_squared"]
                shares = torch.stack([(s < eps).double().mean() for eps in SEED_BELOW]).tolist()
                rows += [{"case": files.name, "units": units, "eps": eps, "fraction_below": share,
                          "pixels": s.numel()} for eps, share in zip(SEED_BELOW, shares)]
    return rows


def small_s(study: Study) -> None:
    """switch_on_s.csv: the shares of small s at each run's switch-on checkpoint, in the seed's units and ours."""
    rows = []
    for run in study.runs:
        with _nnunet_environment(study):
            shares = small_s_shares(_checkpoint(study, run, run.warmup), study.cases, study.device)
        rows += [{"run": run.name, "dataset": run.dataset_id, "epoch": run.warmup, **row} for row in shares]
        seed = pd.DataFrame(shares, columns=schema.SWITCH_ON_S_COLUMNS[3:]).query("units == 'seed'")
        means = seed.groupby("eps")["fraction_below"].mean()
        study.log(f"  {run.name} epoch {run.warmup}: " + ", ".join(
            f"{100 * share:.3g}% below {eps:g}" for eps, share in means.items()) + " (mean over cases, seed's units)")
    tables.write_table(pd.DataFrame(rows, columns=schema.SWITCH_ON_S_COLUMNS), study.out / "switch_on_s.csv")


def analyze(study: Study) -> None:
    """The switch-on checkpoint of the chosen runs, and the first bad epoch of any run that went non-finite."""
    from geodiag.reports import analysis_report

    from ..tools.analyze import analyze_checkpoint

    runs = study.products.get("runs")
    targets = []
    for run in study.runs:
        frame = runs[runs.run == run.name] if runs is not None else pd.DataFrame()
        bad = frame[frame.train_loss.map(lambda v: not math.isfinite(v)) | (frame.skipped_steps > 0)]
        if len(bad):
            targets.append((run, int(bad.epoch.iloc[0]), {}, "first epoch with a non-finite loss or a skipped step"))
        targets += [(run, run.warmup, overrides, "switch-on epoch")
                    for name, overrides in study.analyse if name == run.name]
    summaries = {}
    for run, epoch, overrides, why in targets:
        suffix = "".join(f"-{value:g}" if isinstance(value, float) else f"-{value}" for value in overrides.values())
        out = study.out / "analysis" / f"{run.name}-epoch{epoch}{suffix}"
        study.log(f"  {run.name} epoch {epoch} ({why}{', loss ' + str(overrides) if overrides else ''})")
        with _nnunet_environment(study):
            summary = analyze_checkpoint(str(_checkpoint(study, run, epoch)), out, max_cases=study.cases,
                                         precisions=study.precisions, device=study.device,
                                         resume=(out / "cases").is_dir(), **overrides)
        analysis_report.render(out)
        study.log(f"    verdict {summary['verdict']}: {summary['verdict_reason']}")
        summaries[out.name] = summary
    study.products["analyses"] = summaries


def sweep(study: Study) -> None:
    """Every (stabiliser, eps) on the checkpoints around each run's switch-on."""
    from geodiag.reports import sweep_report

    from ..tools.sweep import run_sweep

    specs = []
    for run in study.runs:
        for offset in study.sweep_epochs:
            epoch = run.warmup + offset
            if 0 <= epoch < run.epochs:
                specs.append(f"{run.name}-e{epoch}={_checkpoint(study, run, epoch)}")
    out = study.out / "sweep"
    with _nnunet_environment(study):
        frame, timing = run_sweep(specs, out, cases=None, precisions=study.precisions, device=study.device,
                                  resume=(out / "cases").is_dir(), max_cases=study.cases,
                                  progress=lambda message: study.log("  " + message))
    sweep_report.render(out)
    study.log(f"  {len(frame)} rows; network forward {timing.forward_s:.1f} s of {timing.total_s:.1f} s")


STEPS = (Step("make-data", make_data), Step("plan", plan), Step("train", train), Step("summarize", summarize),
         Step("small-s", small_s), Step("analyze", analyze), Step("sweep", sweep))


def run_study(study: Study, steps: tuple[Step, ...] = STEPS, report: Optional[Callable[[Study], Path]] = None) -> Path:
    """Run the steps in order with progress lines; then the study's report. Returns the report's path."""
    check_out(study.out).mkdir(parents=True, exist_ok=True)
    total = len(steps) + (report is not None)
    for index, step in enumerate(steps, start=1):
        study.log(f"[{index}/{total}] {step.name}")
        start = time.perf_counter()
        step.run(study)
        study.log(f"[{index}/{total}] {step.name} done in {time.perf_counter() - start:.1f} s")
    if report is None:
        return study.out
    study.log(f"[{total}/{total}] report")
    return report(study)
