"""What the training runs did: runs.csv (per run and epoch, nnU-Net's log and what watch recorded per step) and
study.json (the study's settings, its seeds, a description of each run, and the wall time, load and machine of the
invocation that ran it)."""
from __future__ import annotations

import glob
import math
import os
import platform
from pathlib import Path
from typing import Optional

import pandas as pd

from geodiag.reports import schema, tables

from ..instruments.errors import GeodiagError
from ..nnunet.first_nonfinite import JSON_FILE as FIRST_NONFINITE
from ..nnunet.watch import WATCH_FOLDER
from .definition import RunSpec, Study


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
    described = {"run": run.name, "configuration": run.configuration, "seed": study.run_seed(run),
                 "dataset": run.dataset_id, "trainer": run.trainer, "epochs": run.epochs,
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
        "sweep_eps": list(study.sweep_eps), "device": study.device, "data_seed": study.seed,
        "seeds": sorted({study.run_seed(run) for run in study.runs}),
        "analysed_seeds": sorted({study.run_seed(run) for run in study.analysed_runs}),
        "reductions": list(study.reductions), "runs": described})
    for name, runs in frame.groupby("run", sort=False):
        last = runs.iloc[-1]
        study.log(f"  {name}: {len(runs)} epochs, final train loss {last.train_loss:.4g}, pseudo Dice "
                  f"{last.pseudo_dice:.3f}, non-finite steps {int(runs.nonfinite_steps.fillna(0).sum())}, "
                  f"largest gradient norm before clipping {runs.grad_norm_max.max():.4g}")
    study.products["runs"] = frame


def _machine() -> dict:
    """What the wall time was measured on: the CPU's model and count, the platform, torch's threads."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
              if line.startswith("model name")]
    return {"cpu": models[0] if models else platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def record_time(study: Study, wall_s: float, loads: list[float], steps: dict[str, float]) -> None:
    """study.json's ``timing``: the wall time of this invocation and of each step (a study that reused earlier
    runs says so by its shorter times), the 1-minute load average sampled between steps, and the machine."""
    path = study.out / "study.json"
    if not path.is_file():
        return
    described = schema.read_json(path)
    described["timing"] = {"wall_s": round(wall_s, 1), "load_min": round(min(loads), 2),
                           "load_max": round(max(loads), 2),
                           "steps_s": {name: round(seconds, 1) for name, seconds in steps.items()},
                           "machine": _machine()}
    schema.write_json(path, described)
