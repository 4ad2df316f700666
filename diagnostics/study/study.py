"""A study: synthetic datasets, nnU-Net runs with a geometric term switching on, then measurements and a report.

The demo and the reference report are two configurations of the same steps. Runs go through nnU-Net's own
``nnUNetv2_train`` entry point, in process and under ``geodiag watch`` when this geodiag has it, with the trainer
nnU-Net resolves: geodiag's, or a user's found through ``nnUNet_extTrainer`` (the seed replica). The study imposes
only its schedule on the instance nnU-Net builds (epochs, iterations, warm-up, a checkpoint per epoch, no final
validation). Every step reuses what an earlier run left in the study folder, so an interrupted study continues.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from geodiag.losses.nnunet.patches import EnvironHandle, PatchHandle, patch, patch_environ
from geodiag.reports import schema, tables

from ..nnunet.datasets import dataset_spec, generator_settings, make_dataset
from ..nnunet.environment import EXT_TRAINER_VAR, NnunetDirs, ext_trainer_value, nnunet_env
from ..instruments.errors import GeodiagError
from ..progress import counter
from ..tools.run_record import check_out
from ..nnunet.first_nonfinite import JSON_FILE as FIRST_NONFINITE
from ..nnunet.plans import PLANS_NAME, TINY_CONFIGURATION, plan_and_preprocess
from ..nnunet.watch import LAST_GOOD, WATCH_FOLDER, WatchOptions, run_watched
from .replica import UserCode

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """One training run: a trainer on a dataset with its schedule; ``user`` when the trainer is a user's code."""

    dataset_id: int
    trainer: str
    epochs: int
    iterations: int
    warmup: int
    val_iterations: int = 2
    user: Optional[UserCode] = None

    @property
    def name(self) -> str:
        short = self.trainer.replace("nnUNetTrainerGeometric", "").replace("nnUNetTrainerSeed", "")
        return f"{self.dataset_id}-{short or 'Production'}"


@dataclass
class Study:
    """What the steps share: settings, where things are, and what earlier steps produced."""

    out: Path
    datasets: tuple[int, ...]
    runs: tuple[RunSpec, ...]
    num_images: int
    image_size: int
    sweep_epochs: tuple[int, ...] = (0,)  # relative to the switch-on epoch
    sweep_eps: tuple[float, ...] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
    batch_size: Optional[int] = None  # the tiny configuration's batch; None: what nnU-Net planned
    cases: int = 8
    term_batches: int = 4
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    watch_every: int = 16
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


def _nnunet_environment(study: Study) -> EnvironHandle:
    """What ``nnunet_env`` gives nnU-Net's tools, with the study's folders and every user trainer folder of its
    runs, for in-process training (nnU-Net reads its variables lazily); torch.compile stays off so hooks see every
    op. Each variable is restored when the handle is removed."""
    user_folders = [str(run.user.folder) for run in study.runs if run.user is not None]
    return patch_environ({**nnunet_env(study.dirs, nnUNet_compile="f"),
                          EXT_TRAINER_VAR: ext_trainer_value(os.pathsep.join(dict.fromkeys(user_folders)))})


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
        if not (plans_file.is_file() and plans_file.stat().st_mtime >= raw_json.stat().st_mtime):
            study.log(f"  nnUNetv2_plan_and_preprocess -d {dataset_id} (about 20 s), then configuration "
                      f"{TINY_CONFIGURATION}")
            plan_and_preprocess(dataset_id, study.dirs)
        plans = schema.read_json(plans_file)
        tiny = plans["configurations"][TINY_CONFIGURATION]
        if study.batch_size is not None and tiny.get("batch_size") != study.batch_size:
            tiny["batch_size"] = study.batch_size  # the seed's batch (the reference study sets it)
            plans_file.write_text(json.dumps(plans, indent=4) + "\n")
        study.log(f"  {plans_file}: {TINY_CONFIGURATION}, batch size "
                  f"{tiny.get('batch_size') or plans['configurations']['2d']['batch_size']}")


def _finished(folder: Path) -> bool:
    """A run is done when nnU-Net wrote its final checkpoint or watch stopped it at a non-finite step."""
    return (folder / "checkpoint_final.pth").is_file() or (folder / WATCH_FOLDER / FIRST_NONFINITE).is_file()


def _schedule(run: RunSpec, advance: Callable[[], None]) -> PatchHandle:
    """The study's schedule on the trainer nnU-Net's entry point builds (any trainer class): epochs, iterations,
    the warm-up, a checkpoint after every epoch, no final validation (the study reads checkpoints)."""
    import nnunetv2.run.run_training as entry

    build = entry.get_trainer_from_args

    def scheduled(*args, **kwargs):
        trainer = build(*args, **kwargs)
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
        trainer.perform_actual_validation = lambda *a, **k: trainer.print_to_log_file("final validation skipped")
        return trainer

    return patch(entry, "get_trainer_from_args", scheduled)


def train(study: Study) -> None:
    """Each run as ``geodiag watch -- nnUNetv2_train DATASET 2d_tiny 0 -tr TRAINER -device DEVICE``, in process;
    nnU-Net's and watch's console output goes to the fold's train.log, the progress to the console."""
    for run in study.runs:
        folder = study.fold_folder(run)
        if _finished(folder):
            study.log(f"  {run.name}: reusing {folder}")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        args = [str(run.dataset_id), TINY_CONFIGURATION, "0", "-tr", run.trainer, "-device", study.device]
        console = sys.stdout
        start = time.perf_counter()
        threads = torch.get_num_threads()

        def to_console(message: str) -> None:
            with contextlib.redirect_stdout(console):
                study.log(message)

        with _nnunet_environment(study), open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log), \
                counter(run.epochs, f"  {run.name}", "epoch", to_console) as advance, _schedule(run, advance):
            watch = run_watched(args, WatchOptions(every=study.watch_every), progress=print)
        torch.set_num_threads(threads)  # nnU-Net's entry point sets it for -device cpu
        study.log(f"  {run.name}: {run.epochs} epochs of {run.iterations} iterations under geodiag watch, geometric "
                  f"term from epoch {run.warmup}, in {time.perf_counter() - start:.0f} s"
                  + (f"; STOPPED: {watch.stopped}" if watch.stopped else ""))


def _last_checkpoint(folder: Path) -> Path:
    final = folder / "checkpoint_final.pth"
    if final.is_file():
        return final
    epochs = sorted(folder.glob("checkpoint_epoch_*.pth"))
    if not epochs:
        raise GeodiagError(f"{folder} holds no checkpoint")
    return epochs[-1]


def watch_rows(folder: Path) -> pd.DataFrame:
    """Every training step geodiag watch recorded in the run (empty without watch)."""
    files = sorted(glob.glob(str(folder / WATCH_FOLDER / "iterations_epoch_*.csv")))
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True) if files else pd.DataFrame()


def _step_column(steps: pd.DataFrame, *names: str) -> Optional[pd.Series]:
    """The first of ``names`` that the trainer's train_step returned (geodiag's and the replica's differ)."""
    return next((steps[name] for name in names if name in steps), None)


def _describe(study: Study, run: RunSpec, checkpoint) -> dict:
    """What study.json says about a run: its code, loss, schedule and the batch nnU-Net trained it on."""
    configuration = checkpoint.configuration_manager
    folder = study.fold_folder(run)
    settings = folder / "geometric_settings.json"
    described = {"run": run.name, "dataset": run.dataset_id, "trainer": run.trainer, "epochs": run.epochs,
                 "iterations": run.iterations, "warmup": run.warmup, "patch_size": list(configuration.patch_size),
                 "batch_size": int(configuration.batch_size), "watched": bool(watch_rows(folder).size)}
    if run.user is not None:
        from .replica import sqrt_clamp_sites

        described.update(code="user", loss=run.user.loss, samples=run.user.samples,
                         sqrt_clamp_sites=sqrt_clamp_sites() if run.user.sites else {},
                         seed_version=run.user.seed_version)
    else:
        described.update(code="geodiag", loss=schema.read_json(settings) if settings.is_file() else None,
                         seed_version=None)
    first = folder / WATCH_FOLDER / FIRST_NONFINITE
    described["first_nonfinite"] = schema.read_json(first) if first.is_file() else None
    return described


def summarize(study: Study) -> None:
    """runs.csv: per run and epoch, nnU-Net's log (train and validation loss, pseudo Dice) and what watch recorded
    per step (largest gradient norm before clipping, non-finite and skipped steps, the term values train_step
    returned); study.json: the study's settings and each run's description (with watch's first_nonfinite.json)."""
    from geodiag.reports.schema import RUN_COLUMNS

    from ..nnunet.checkpoint import load_checkpoint

    rows, described = [], []
    for run in study.runs:
        folder = study.fold_folder(run)
        checkpoint = load_checkpoint(_last_checkpoint(folder))
        logging = checkpoint.data["logging"]
        described.append(_describe(study, run, checkpoint))
        steps = watch_rows(folder)
        for epoch in range(len(logging["train_losses"])):
            def logged(key: str) -> float:
                series = logging.get(key, [])
                return float(series[epoch]) if epoch < len(series) else math.nan

            row = {"run": run.name, "dataset": run.dataset_id, "trainer": run.trainer,
                   "code": "user (--loss)" if run.user else "geodiag", "warmup": run.warmup, "epoch": epoch,
                   "geometric_active": epoch >= run.warmup, "train_loss": logged("train_losses"),
                   "val_loss": logged("val_losses"), "pseudo_dice": logged("mean_fg_dice"),
                   "watched_steps": 0}
            mine = steps[steps["epoch"] == epoch] if len(steps) else steps
            if len(mine):
                loss = mine["loss"].astype(float)
                row.update(watched_steps=len(mine), grad_norm_max=mine["grad_norm"].astype(float).max(),
                           nonfinite_steps=int((~loss.map(math.isfinite)).sum()),
                           skipped_steps=int(mine["skipped"].sum()))
                for column, names in (("train_dc_ce", ("dc_ce", "train_dc_ce")),
                                      ("train_geometric", ("geometric", "train_geometric")),
                                      ("train_compactness", ("compactness", "train_compactness")),
                                      ("train_aspect", ("aspect", "train_aspect")),
                                      ("train_boundary", ("boundary", "train_boundary"))):
                    values = _step_column(mine, *names)
                    row[column] = values.astype(float).mean() if values is not None else math.nan
            rows.append(row)
    frame = pd.DataFrame(rows).reindex(columns=RUN_COLUMNS)
    tables.write_table(frame, study.out / "runs.csv")
    schema.write_json(study.out / "study.json", {
        "images": study.num_images, "image_size": study.image_size, "datasets": list(study.datasets),
        "cases": study.cases, "term_batches": study.term_batches, "precisions": list(study.precisions),
        "sweep_eps": list(study.sweep_eps), "device": study.device, "runs": described})
    for name, runs in frame.groupby("run", sort=False):
        last = runs.iloc[-1]
        study.log(f"  {name}: {len(runs)} epochs, final train loss {last.train_loss:.4g}, pseudo Dice "
                  f"{last.pseudo_dice:.3f}, non-finite steps {int(runs.nonfinite_steps.fillna(0).sum())}, "
                  f"largest gradient norm before clipping {runs.grad_norm_max.max():.4g}")
    study.products["runs"] = frame


def _checkpoint(study: Study, run: RunSpec, epoch: int) -> Path:
    return study.fold_folder(run) / f"checkpoint_epoch_{epoch:04d}.pth"


def switch_on_checkpoint(study: Study, run: RunSpec) -> Path:
    """The state after the first epoch trained with the geometric term; for a run watch stopped before that
    epoch ended, the last good state it saved before the first non-finite step."""
    path = _checkpoint(study, run, run.warmup)
    stopped = study.fold_folder(run) / WATCH_FOLDER / LAST_GOOD
    return path if path.is_file() or not stopped.is_file() else stopped


def small_s_shares(path: Path, max_cases: int, device: str = "cpu") -> list[dict]:
    """Per case of a checkpoint, the share of pixels whose s = gx^2 + gy^2 lies below each threshold the seed quotes
    (``seed.BELOW_AT_SWITCH_ON``), with s in the seed's units (raw Sobel, zero padding: the ``v2.3`` preset's s) and in
    geodiag's normalised units (the ``production`` preset's, 1/``seed.UNITS_FACTOR`` of it in 2D). Whole-image fp32
    predictions."""
    from geodiag.losses import GeometricLoss
    from geodiag.reports.seed import BELOW_AT_SWITCH_ON

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
                shares = torch.stack([(s < eps).double().mean() for eps in BELOW_AT_SWITCH_ON]).tolist()
                rows += [{"case": files.name, "units": units, "eps": eps, "fraction_below": share,
                          "pixels": s.numel()} for eps, share in zip(BELOW_AT_SWITCH_ON, shares)]
    return rows


def small_s(study: Study) -> None:
    """switch_on_s.csv: the shares of small s at each run's first (epoch 0) and switch-on checkpoints, in the
    seed's units and ours."""
    from geodiag.reports.schema import SWITCH_ON_S_COLUMNS

    rows = []
    for run in study.runs:
        for path in dict.fromkeys((_checkpoint(study, run, 0), switch_on_checkpoint(study, run))):
            with _nnunet_environment(study):
                shares = small_s_shares(path, study.cases, study.device)
            rows += [{"run": run.name, "dataset": run.dataset_id, "checkpoint": path.name, **row} for row in shares]
            seed = pd.DataFrame(shares, columns=SWITCH_ON_S_COLUMNS[3:]).query("units == 'seed'")
            means = seed.groupby("eps")["fraction_below"].mean()
            study.log(f"  {run.name} {path.name}: " + ", ".join(
                f"{100 * share:.3g}% below {eps:g}" for eps, share in means.items())
                + " (mean over cases, seed's units)")
    tables.write_table(pd.DataFrame(rows, columns=SWITCH_ON_S_COLUMNS), study.out / "switch_on_s.csv")


def term_gradients(study: Study) -> None:
    """term_gradients.csv: at each run's switch-on checkpoint, on training batches, what Dice+CE and each geometric
    term send to the logits and to the network, and their shares of the step's gradient."""
    from geodiag.reports.schema import TERM_GRADIENT_COLUMNS

    from . import term_gradients as measured

    rows = []
    for run in study.runs:
        path = switch_on_checkpoint(study, run)
        with _nnunet_environment(study), open(study.out / "term_gradients.log", "a") as log, \
                contextlib.redirect_stdout(log):  # nnU-Net's trainer prints its banner and split
            if run.user is not None:
                terms = measured.user_loss_terms(run.user.loss, dict(run.user.term_weights), run.user.samples)
            else:
                terms = measured.geometric_loss_terms(
                    schema.read_json(study.fold_folder(run) / "geometric_settings.json"))
            found = measured.measure(path, terms, study.term_batches, study.device, study.seed)
        rows += [{"run": run.name, "dataset": run.dataset_id, "checkpoint": path.name, **row} for row in found]
        frame = pd.DataFrame(found)
        shares = frame.groupby("term", sort=False)["share_of_step"].median()
        study.log(f"  {run.name} {path.name}: median share of the step's gradient " + ", ".join(
            f"{term} {share:.3g}" for term, share in shares.items()))
    tables.write_table(pd.DataFrame(rows, columns=TERM_GRADIENT_COLUMNS), study.out / "term_gradients.csv")


def loss_precisions(study: Study) -> None:
    """loss_precisions.csv: in which precisions each user run's loss runs at all under nnU-Net's autocast; the
    analysis and the replica sweep take those (a loss that raises in one precision would abort every other)."""
    from geodiag.reports.schema import LOSS_PRECISION_COLUMNS

    from .precision_probe import probe

    rows, running = [], {}
    for run in study.runs:
        if run.user is None:
            running[run.name] = study.precisions
            continue
        with _nnunet_environment(study):
            found = probe(switch_on_checkpoint(study, run), run.user.loss, study.precisions, study.device)
        rows += [{"run": run.name, **row} for row in found]
        running[run.name] = tuple(row["precision"] for row in found if row["runs"])
        for row in found:
            if not row["runs"]:
                study.log(f"  {run.name}: the loss raises under {row['precision']} autocast at {row['site']}: "
                          f"{row['error']}")
    tables.write_table(pd.DataFrame(rows, columns=LOSS_PRECISION_COLUMNS), study.out / "loss_precisions.csv")
    study.products["precisions"] = running


def _precisions(study: Study, run: RunSpec) -> tuple[str, ...]:
    return study.products.get("precisions", {}).get(run.name, study.precisions)


def analyze(study: Study) -> None:
    """Each run's switch-on checkpoint: a user's loss through its SPEC (its sites table), geodiag's as recorded."""
    from geodiag.reports import analysis_report

    from ..tools.analyze import analyze_checkpoint

    summaries = {}
    for run in study.runs:
        path = switch_on_checkpoint(study, run)
        out = study.out / "analysis" / run.name
        study.log(f"  {run.name} {path.name}" + (f" --loss {run.user.loss}" if run.user else ""))
        with _nnunet_environment(study):
            summary = analyze_checkpoint(str(path), out, max_cases=study.cases, precisions=_precisions(study, run),
                                         device=study.device, resume=(out / "cases").is_dir(),
                                         **({"loss_spec": run.user.loss} if run.user else {}))
        analysis_report.render(out)
        study.log(f"    verdict {summary['verdict']}: {summary['verdict_reason']}")
        summaries[out.name] = summary
    study.products["analyses"] = summaries


def sweep(study: Study) -> None:
    """geodiag's loss at every clamp eps on the checkpoints around its runs' switch-on (sweep/)."""
    from geodiag.reports import sweep_report

    from ..tools.sweep import parse_settings, run_sweep

    specs = []
    for run in study.runs:
        if run.user is not None:
            continue
        for offset in study.sweep_epochs:
            epoch = run.warmup + offset
            if 0 <= epoch < run.epochs and _checkpoint(study, run, epoch).is_file():
                specs.append(f"{run.name}-e{epoch}={_checkpoint(study, run, epoch)}")
    if not specs:
        study.log("  no geodiag run to sweep")
        return
    out = study.out / "sweep"
    with _nnunet_environment(study):
        frame, timing = run_sweep(specs, out, cases=None, settings=parse_settings(("clamp",), study.sweep_eps),
                                  precisions=study.precisions, device=study.device,
                                  resume=(out / "cases").is_dir(), max_cases=study.cases,
                                  progress=lambda message: study.log("  " + message))
    sweep_report.render(out)
    study.log(f"  {len(frame)} rows; network forward {timing.forward_s:.1f} s of {timing.total_s:.1f} s")


def replica_sweep(study: Study) -> None:
    """The user runs' own sqrt clamps replaced at their lines by each eps (``clamp-sweep --loss SPEC --site
    FILE:LINE,FILE:LINE --eps …``) on their switch-on checkpoints (replica_sweep/): one loss serves every version,
    since the swept value replaces the only setting the versions differ in."""
    from geodiag.reports import site_sweep_report

    from ..tools.site_sweep import run_site_sweep

    users = [run for run in study.runs if run.user is not None]
    if not users:
        return
    specs = [f"{run.name}-e{run.warmup}={switch_on_checkpoint(study, run)}" for run in users]
    precisions = [p for p in study.precisions if all(p in _precisions(study, run) for run in users)]
    out = study.out / "replica_sweep"
    with _nnunet_environment(study):
        frame = run_site_sweep(specs, out, users[0].user.loss, list(users[0].user.sites), study.sweep_eps,
                               precisions=precisions, device=study.device, resume=(out / "cases").is_dir(),
                               max_cases=study.cases, progress=lambda message: study.log("  " + message))
    site_sweep_report.render(out)
    study.log(f"  {len(frame)} rows at {', '.join(users[0].user.sites)}")


STEPS = (Step("make-data", make_data), Step("plan", plan), Step("train", train), Step("summarize", summarize),
         Step("small-s", small_s), Step("term-gradients", term_gradients),
         Step("loss-precisions", loss_precisions), Step("analyze", analyze),
         Step("sweep", sweep), Step("replica-sweep", replica_sweep))


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
