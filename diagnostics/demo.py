"""The demo as a list of named steps: data, planning, a CPU nnU-Net run with the geometric term switching on.

Later work appends steps (analysis of the switch-on checkpoint, a clamp sweep, a report) to ``DEMO_STEPS``; each
step reads and writes the shared ``DemoContext``. Steps reuse what an earlier run left in the output folder.
"""
from __future__ import annotations

import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .datasets import dataset_spec, generator_settings, make_dataset
from .environment import NnunetDirs, nnunet_env
from .errors import GeodiagError
from .nnunet_plans import PLANS_NAME, TINY_CONFIGURATION, nnunet_tool, plan_and_preprocess

Log = Callable[[str], None]
# nnU-Net's own console lines worth echoing while the demo trains.
_PROGRESS = re.compile(r"(Epoch \d+$|geometric term|train Dice\+CE|Pseudo dice|Using trainer)")


@dataclass
class DemoContext:
    """What the demo's steps share: where things are and what earlier steps produced."""

    out: Path
    dataset_id: int = 502
    num_images: int = 24
    image_size: int = 96
    seed: int = 0
    configuration: str = TINY_CONFIGURATION
    trainer: str = "nnUNetTrainerGeometricQuick"
    fold: int = 0
    log: Log = print
    products: dict = field(default_factory=dict)

    @property
    def dirs(self) -> NnunetDirs:
        return NnunetDirs.under(self.out)

    @property
    def dataset_name(self) -> str:
        return dataset_spec(self.dataset_id).folder_name

    @property
    def fold_folder(self) -> Path:
        return (self.dirs.results / self.dataset_name / f"{self.trainer}__{PLANS_NAME}__{self.configuration}"
                / f"fold_{self.fold}")


@dataclass(frozen=True)
class DemoStep:
    name: str
    run: Callable[[DemoContext], None]


def make_data(ctx: DemoContext) -> None:
    folder = ctx.dirs.raw / ctx.dataset_name
    wanted = {"num": ctx.num_images, "size": ctx.image_size, "seed": ctx.seed, "num_test": 0}
    if generator_settings(folder) == wanted:
        ctx.log(f"reusing {folder}")
        return
    make_dataset(ctx.dataset_id, ctx.dirs.create().raw, num=ctx.num_images, size=ctx.image_size, seed=ctx.seed)
    ctx.log(f"wrote {ctx.num_images} images of {ctx.image_size}x{ctx.image_size} to {folder}")


def plan(ctx: DemoContext) -> None:
    preprocessed = ctx.dirs.preprocessed / ctx.dataset_name
    plans_file = preprocessed / f"{PLANS_NAME}.json"
    raw_json = ctx.dirs.raw / ctx.dataset_name / "dataset.json"
    if plans_file.is_file() and (preprocessed / f"{PLANS_NAME}_2d").is_dir() \
            and plans_file.stat().st_mtime >= raw_json.stat().st_mtime:
        ctx.log(f"reusing {plans_file}")
        return
    ctx.log("running nnUNetv2_plan_and_preprocess (about 20 s)")
    ctx.products["plans_file"] = plan_and_preprocess(ctx.dataset_id, ctx.dirs)
    ctx.log(f"planned and preprocessed; added configuration {TINY_CONFIGURATION}")


def train(ctx: DemoContext) -> None:
    final = ctx.fold_folder / "checkpoint_final.pth"
    if final.is_file():
        ctx.log(f"reusing the finished run in {ctx.fold_folder}")
        return
    command = [nnunet_tool("nnUNetv2_train"), str(ctx.dataset_id), ctx.configuration, str(ctx.fold), "-tr", ctx.trainer,
               "-device", "cpu"]
    ctx.log("running " + " ".join(command[1:]))
    ctx.out.mkdir(parents=True, exist_ok=True)
    log_path = ctx.out / "train.log"
    with open(log_path, "w") as log, subprocess.Popen(command, env=nnunet_env(ctx.dirs), stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            if _PROGRESS.search(line):
                ctx.log("  " + line.strip())
    if proc.returncode != 0 or not final.is_file():
        raise GeodiagError(f"nnUNetv2_train failed (exit {proc.returncode}); see {log_path}")


def summarize(ctx: DemoContext) -> None:
    import torch

    checkpoint = torch.load(ctx.fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    terms = [key for key in logging if key.startswith("train_") and key not in ("train_losses", "train_dc_ce",
                                                                               "train_geometric")]
    columns = ["train_dc_ce", "train_geometric", *terms, "val_losses", "mean_fg_dice", "skipped_steps"]
    ctx.log("epoch  active  " + "  ".join(f"{c:>15}" for c in columns))
    for epoch, active in enumerate(logging["geometric_active"]):
        cells = []
        for column in columns:
            value = float(logging[column][epoch])
            cells.append(f"{'-':>15}" if math.isnan(value) else f"{value:>15.5g}")
        ctx.log(f"{epoch:>5}  {'on' if active else 'off':>6}  " + "  ".join(cells))
    checkpoints = sorted(ctx.fold_folder.glob("checkpoint_epoch_*.pth"))
    switch_on = next((e for e, active in enumerate(logging["geometric_active"]) if active), None)
    ctx.products.update(fold_folder=ctx.fold_folder, checkpoints=checkpoints, switch_on_epoch=switch_on)
    ctx.log(f"per-epoch checkpoints: {ctx.fold_folder}/checkpoint_epoch_0000.pth .. "
            f"{checkpoints[-1].name if checkpoints else '(none)'}")
    if switch_on is not None:
        ctx.log(f"the geometric term switched on in epoch {switch_on}: checkpoint_epoch_{switch_on - 1:04d}.pth is "
                f"the last Dice+CE-only state, checkpoint_epoch_{switch_on:04d}.pth the first trained with it")
    ctx.log(f"progress plots: {ctx.fold_folder / 'progress.png'}, {ctx.fold_folder / 'progress_geometric.png'}")


DEMO_STEPS: list[DemoStep] = [
    DemoStep("make-data", make_data),
    DemoStep("plan", plan),
    DemoStep("train", train),
    DemoStep("summarize", summarize),
]


def run_demo(out: str | Path, steps: Optional[list[DemoStep]] = None, log: Log = print, **settings) -> DemoContext:
    """Run ``steps`` (default DEMO_STEPS) in order, printing each step's name and duration."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise GeodiagError(f"--out {out} exists and is not a folder")
    ctx = DemoContext(out=out, log=log, **settings)
    steps = DEMO_STEPS if steps is None else steps
    for index, step in enumerate(steps, start=1):
        log(f"[{index}/{len(steps)}] {step.name}")
        start = time.perf_counter()
        step.run(ctx)
        log(f"[{index}/{len(steps)}] {step.name} done in {time.perf_counter() - start:.1f} s")
    return ctx
