"""The clamp sweep: one network forward per case and precision, then every (stabiliser, eps) re-evaluates only the loss.

Each row measures what a setting costs in bias (against an fp64 eps -> 0 reference of the same prediction) and what
it does to the gradient that reaches the logits. Rows are written per case as they are computed (atomic files under
DIR/cases/), so an interrupted sweep resumes without recomputing them and the final tables are the same.
"""
from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pandas as pd
import torch

from geodiag.losses import STABILIZERS, GeometricLoss, SqrtStabilizer, StabilizersPerImage
from geodiag.reports import schema, tables

from ..nnunet.cases import Case, find_cases, predict_logits, preprocess
from ..nnunet.checkpoint import Checkpoint, build_network, find_checkpoints, load_checkpoint
from ..instruments.devices import PRECISIONS
from ..instruments.errors import ArgumentError, GeodiagError
from ..instruments.histograms import LogHistogram
from ..progress import Progress, progress_over
from . import run_record

DEFAULT_EPS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
ASPECT_FORMULAS = ("seed", "anisotropy")


@dataclass(frozen=True)
class Setting:
    stabilizer: str
    eps: float


@dataclass
class SweepTiming:
    """Wall time of the network forwards (plain inference of the cases) and of everything else."""

    forward_s: float = 0.0
    total_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.total_s / self.forward_s if self.forward_s > 0 else math.nan


def parse_settings(stabilizers: Sequence[str], eps: Sequence[float]) -> list[Setting]:
    """Validated (stabiliser, eps) pairs; a GeodiagError names the bad value."""
    settings = []
    for name, value in itertools.product(stabilizers, eps):
        try:
            SqrtStabilizer(name, value)
        except ValueError as exc:
            raise GeodiagError(str(exc)) from None
        settings.append(Setting(name, float(value)))
    if not settings:
        raise GeodiagError("no settings to sweep: give at least one stabiliser and one eps")
    return settings


def _kth(rows: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (nearest rank) of each row of [N, M], as a tensor of N (no host read)."""
    n = rows.shape[1]
    k = min(n, max(1, math.ceil(q * n)))
    if k > n // 2:  # the k-th smallest is the (n - k + 1)-th largest: a short top-k (kthvalue crawls on |gradients|)
        return rows.topk(n - k + 1, dim=1).values[:, -1]
    return rows.kthvalue(k, dim=1).values


def _reference(logits: torch.Tensor, label: torch.Tensor, classes: tuple[int, ...],
               aspect_formula: str) -> dict[str, float]:
    """Descriptors of the prediction in fp64 with an exact sqrt (eps = 0), forward only, with the aspect formula
    whose bias is measured."""
    loss = GeometricLoss(classes, softmax=True, stabilizer="clamp", eps=0.0, aspect_formula=aspect_formula,
                         reduction="none")
    seen = _capture(loss, ("perimeter", "compactness", "aspect"))
    with torch.no_grad():
        loss(logits.detach().double(), label.double())
    return {name: float(value.mean()) for name, value in seen.items()}


def _capture(loss: GeometricLoss, names: Sequence[str]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    loss.register_tap(lambda name, t: seen.__setitem__(name, t), names=names)
    return seen


# Logit elements per batch of settings (memory): a two-channel case of 512^2 or 64^3 runs 8 settings per batch,
# one of 128^3 a single setting.
SETTINGS_BATCH_ELEMENTS = 1 << 22


def evaluate_settings(logits: torch.Tensor, label: torch.Tensor, classes: tuple[int, ...],
                      settings: Sequence[Setting], aspect_formula: str) -> list[tuple[dict, torch.Tensor]]:
    """Loss, descriptors and gradient statistics of one case [1, C, *S] under each setting, and its s.

    The settings run as one batch, image i under setting i (``StabilizersPerImage``): each image's loss and
    gradient are those of its setting alone, for one forward and backward of the loss instead of one per setting.
    The statistics are gathered on the device and read back once per batch.
    """
    per_batch = max(1, SETTINGS_BATCH_ELEMENTS // logits[0].numel())
    return [result for start in range(0, len(settings), per_batch)
            for result in _evaluate_batch(logits, label, classes, settings[start:start + per_batch], aspect_formula)]


def _evaluate_batch(logits: torch.Tensor, label: torch.Tensor, classes: tuple[int, ...],
                    settings: Sequence[Setting], aspect_formula: str) -> list[tuple[dict, torch.Tensor]]:
    """One batch of ``evaluate_settings``. 1/(2 sqrt(x)) decreases, so the sqrt's largest local derivative and its
    99th percentile come from the minimum and 1st percentile of its input."""
    n = len(settings)
    leaf = logits.detach().expand(n, *logits.shape[1:]).clone().requires_grad_(True)
    loss_fn = GeometricLoss(classes, softmax=True, aspect_formula=aspect_formula, reduction="none")
    loss_fn.stabilizer = StabilizersPerImage(tuple(SqrtStabilizer(s.stabilizer, s.eps) for s in settings))
    seen = _capture(loss_fn, ("compactness.grad_mag_squared", "compactness.sqrt_input", "perimeter", "compactness",
                              "aspect"))
    s_grad: dict[str, torch.Tensor] = {}
    loss_fn.register_tap(lambda name, t: t.register_hook(lambda g: s_grad.__setitem__("s", g)),
                         names=("compactness.grad_mag_squared",))
    value = loss_fn(leaf, label.expand(n, *label.shape[1:])).mean(dim=1)  # each setting's loss: mean over classes
    value.sum().backward()
    grad = leaf.grad.float().flatten(1)
    s = seen["compactness.grad_mag_squared"].detach()
    s_rows = s.flatten(1)
    sqrt_in = seen["compactness.sqrt_input"].detach().flatten(1)
    eps = torch.tensor([setting.eps for setting in settings], dtype=s.dtype, device=s.device)[:, None]
    magnitude = grad.abs().nan_to_num_(nan=0.0, posinf=0.0)  # non-finite entries read as 0
    s_gradient = s_grad.get("s")
    columns = torch.stack([
        value.detach().double(), *(seen[name].detach().flatten(1).mean(dim=1).double()
                                   for name in ("perimeter", "compactness", "aspect")),
        magnitude.amax(dim=1).double(), torch.linalg.vector_norm(magnitude, dim=1, dtype=torch.float64),
        _kth(magnitude, 0.999).double(), sqrt_in.amin(dim=1).double(), _kth(sqrt_in, 0.01).double(),
        (s_rows < eps).sum(dim=1).double(),
        (s_gradient.flatten(1) == 0).sum(dim=1).double() if s_gradient is not None else
        torch.full((n,), float(s_rows.shape[1]), dtype=torch.float64, device=s.device),
        grad.shape[1] - torch.isfinite(grad).sum(dim=1).double(),
    ], dim=1).tolist()
    results = []
    for setting, row, s_image in zip(settings, columns, s):
        (loss, perimeter, compactness, aspect, grad_max, grad_l2, grad_p999, sqrt_min, sqrt_p01, below, zero_grad,
         nonfinite_grad) = row
        results.append(({
            "loss": loss, "perimeter": perimeter, "compactness": compactness, "aspect": aspect,
            "grad_max": grad_max, "grad_l2": grad_l2, "grad_p999": grad_p999,
            "sqrt_deriv_max": _local_derivative(sqrt_min), "sqrt_deriv_p99": _local_derivative(sqrt_p01),
            "frac_below_eps": below / s_rows.shape[1], "frac_zero_grad": zero_grad / s_rows.shape[1],
            "nonfinite_loss": int(not math.isfinite(loss)), "nonfinite_grad": int(nonfinite_grad),
        }, s_image[None]))
    return results


def _local_derivative(x: float) -> float:
    """d sqrt(x)/dx = 1 / (2 sqrt(x)); inf at 0, NaN below."""
    if x > 0:
        return 0.5 / math.sqrt(x)
    return math.inf if x == 0 else math.nan


def device_clock(device: torch.device) -> float:
    """perf_counter once the device's queued work has finished: CUDA kernels run asynchronously, so an
    unsynchronised clock times the launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _bias(value: float, reference: float) -> float:
    return value / reference - 1.0 if reference != 0 and math.isfinite(reference) else math.nan


@dataclass
class CheckpointSweep:
    """What the sweep needs of one checkpoint: its label, metadata and rebuilt network."""

    label: str
    checkpoint: Checkpoint
    classes: tuple[int, ...]
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CaseToSweep:
    """One case of a checkpoint still to sweep: its preprocessed case, the checkpoint's network and the stem of
    the per-case files to write."""

    item: CheckpointSweep
    network: torch.nn.Module
    case: Case
    stem: Path

    def file(self, suffix: str) -> Path:
        """The per-case file with that suffix (the stem may hold dots: no ``with_suffix``)."""
        return self.stem.parent / f"{self.stem.name}{suffix}"


def _hist_rows(hist: LogHistogram) -> list[dict]:
    edges = hist.layout.edges()
    counts = hist.to_dict()["bin_counts"]
    return [{"bin_low": edges[i], "bin_high": edges[i + 1], "count": int(c)} for i, c in enumerate(counts) if c]


def sweep_case(item: CheckpointSweep, network, case: Case, patch_size, settings: Sequence[Setting],
               precisions: Sequence[str], aspect_formula: str, device: torch.device,
               timing: SweepTiming) -> tuple[list[dict], list[dict]]:
    """All rows of one case: per precision one forward, then every setting on the same logits."""
    label = case.label[None].to(device)
    rows: list[dict] = []
    hist_rows: list[dict] = []
    for precision in precisions:
        dtype = PRECISIONS[precision]
        start = device_clock(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = predict_logits(network, case.image, patch_size)
        timing.forward_s += device_clock(device) - start
        reference = _reference(logits, label, item.classes, aspect_formula)
        for setting, (measured, s) in zip(settings, evaluate_settings(logits, label, item.classes, settings,
                                                                       aspect_formula)):
            if precision == precisions[0] and setting == settings[0]:
                histogram = LogHistogram()
                histogram.update(s)
                hist_rows = [{**item.meta, "case": case.name, **r} for r in _hist_rows(histogram)]
            rows.append({
                **item.meta, "case": case.name, "stabilizer": setting.stabilizer, "eps": setting.eps,
                "precision": precision, **measured,
                "ref_perimeter": reference["perimeter"], "ref_compactness": reference["compactness"],
                "ref_aspect": reference["aspect"],
                "bias_perimeter": _bias(measured["perimeter"], reference["perimeter"]),
                "bias_compactness": _bias(measured["compactness"], reference["compactness"]),
                "bias_aspect": _bias(measured["aspect"], reference["aspect"]),
            })
    return rows, hist_rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "checkpoint"


def cases_to_sweep(items: Sequence[CheckpointSweep], cases: Optional[str], max_cases: Optional[int], case_dir: Path,
                   trust: bool, device: torch.device, progress: Optional[Progress]) -> Iterator[CaseToSweep]:
    """Each item's labelled cases (at most ``max_cases``) whose per-case file is not written yet, preprocessed, with
    the item's network on ``device`` (built once per item that has any): a resumed sweep computes only those."""
    for item in items:
        folder = case_dir / _slug(item.label)
        files = [f for f in find_cases(item.checkpoint, cases) if f.label is not None][: max_cases or None]
        if not files:
            raise GeodiagError(f"no labelled cases for {item.label}: the sweep compares against labels")
        todo = [f for f in files if not (folder / f"{_slug(f.name)}.csv").exists()]
        if not todo:
            continue
        network = build_network(item.checkpoint, trust=trust).to(device)
        for files_of_case in progress_over(todo, item.label, progress):
            yield CaseToSweep(item, network, preprocess(item.checkpoint, files_of_case),
                              folder / _slug(files_of_case.name))


def load_sweep_items(specs: Sequence[str], trust: bool = False, fold: Optional[str] = None) -> list[CheckpointSweep]:
    """``[LABEL=]PATH`` specs (files or results folders; ``fold`` picks fold_<fold> in a results folder) as
    labelled checkpoints."""
    items = []
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        for file in find_checkpoints(path, fold):
            ck = load_checkpoint(file, trust=trust)
            name = label or f"{ck.plans.get('dataset_name', '?')}/{ck.trainer_name}/{file.stem}"
            meta = {"checkpoint": name, "dataset": ck.dataset_id, "epoch": ck.epoch,
                    "geometric_active": ck.geometric_active}
            items.append(CheckpointSweep(name, ck, ck.foreground_classes, meta))
    labels = [i.label for i in items]
    if len(set(labels)) != len(labels):
        raise ArgumentError("two checkpoints share a label; name them LABEL=PATH, or pick one fold with {fold}", "fold")
    return items


def choose_aspect_formula(items: Sequence[CheckpointSweep], asked: Optional[str] = None) -> tuple[str, str]:
    """(aspect formula, why): the one asked for, else the seed's on 2D checkpoints (its sqrt of tr^2 - 4 det is
    where eps also acts) and anisotropy as soon as one is 3D (the seed's formula is 2D only)."""
    dims = sorted({len(item.checkpoint.patch_size) for item in items})
    if asked is not None:
        if asked not in ASPECT_FORMULAS:
            raise ArgumentError(f"{{aspect_formula}} {asked!r}: choose {' or '.join(ASPECT_FORMULAS)}",
                                "aspect_formula")
        if asked == "seed" and dims != [2]:
            three_d = next(item.label for item in items if len(item.checkpoint.patch_size) != 2)
            raise ArgumentError(f"{three_d} is a 3D checkpoint and the seed's aspect formula is 2D only: pass "
                                "{aspect_formula} anisotropy, or leave it out to have it chosen", "aspect_formula")
        return asked, "as asked"
    if dims == [2]:
        return "seed", ("every checkpoint is 2D: the seed's formula, sqrt(tr^2 - 4 det) of the second moments, "
                        "where eps also acts")
    return "anisotropy", (f"{'3D checkpoints' if dims == [3] else 'a 3D checkpoint among 2D ones'}: the seed's "
                          "formula is 2D only; anisotropy ((l1 - l2) / (l1 + l2))^2 of the moments' eigenvalues "
                          "holds in 2D and 3D and has no sqrt for eps to act on")


def run_sweep(specs: Sequence[str], out: str | Path, cases: Optional[str] = None,
              settings: Sequence[Setting] = (), precisions: Sequence[str] = ("fp32",),
              aspect_formula: Optional[str] = None, device: str = "cpu", trust: bool = False, resume: bool = False,
              max_cases: Optional[int] = None, fold: Optional[str] = None,
              progress: Optional[Progress] = None) -> tuple[pd.DataFrame, SweepTiming]:
    """Sweep every checkpoint × case × setting × precision; write DIR/sweep.csv and DIR/sweep_hist.csv.

    Each case is predicted whole (nnU-Net's sliding window, no gradients into the network); every gradient the
    sweep reports is the loss's gradient at those logits. ``aspect_formula`` None chooses it from the
    checkpoints' dimensionality (``choose_aspect_formula``); DIR/settings.json says which and why.
    """
    out = run_record.check_out(out)
    case_dir, has_results = run_record.open_cases(out, "*/*.csv", "sweep results", resume)
    settings = list(settings) or parse_settings(STABILIZERS, DEFAULT_EPS)
    dev = torch.device(device)
    timing = SweepTiming()
    start = device_clock(dev)
    items = load_sweep_items(specs, trust, fold)
    aspect_formula, why = choose_aspect_formula(items, aspect_formula)
    run_record.check_and_record(out, {"settings": [[s.stabilizer, s.eps] for s in settings],
                                      "precisions": list(precisions), "aspect_formula": aspect_formula,
                                      "aspect_formula_why": why}, resume, has_results)
    for todo in cases_to_sweep(items, cases, max_cases, case_dir, trust, dev, progress):
        rows, hist_rows = sweep_case(todo.item, todo.network, todo.case, todo.item.checkpoint.patch_size, settings,
                                     precisions, aspect_formula, dev, timing)
        schema.write_text(todo.file(".hist.csv"), pd.DataFrame(hist_rows).to_csv(index=False))
        schema.write_text(todo.file(".csv"), pd.DataFrame(rows).to_csv(index=False))
    timing.total_s = device_clock(dev) - start
    frame = collect(out)
    return frame, timing


def collect(out: Path) -> pd.DataFrame:
    """Concatenate the per-case files into DIR/sweep.csv and DIR/sweep_hist.csv (same result after a resume)."""
    row_files = sorted(p for p in (out / "cases").glob("*/*.csv") if not p.name.endswith(".hist.csv"))
    frame = pd.concat([pd.read_csv(p) for p in row_files], ignore_index=True)
    frame = frame[list(schema.SWEEP_COLUMNS)].sort_values(
        ["checkpoint", "case", "precision", "stabilizer", "eps"], kind="stable").reset_index(drop=True)
    tables.write_table(frame, out / "sweep.csv")
    hist_files = sorted((out / "cases").glob("*/*.hist.csv"))
    hists = [pd.read_csv(p) for p in hist_files if p.stat().st_size > 1]
    hist = pd.concat(hists, ignore_index=True) if hists else pd.DataFrame(columns=schema.SWEEP_HIST_COLUMNS)
    keys = ["checkpoint", "dataset", "epoch", "bin_low", "bin_high"]
    hist = hist.groupby(keys, dropna=False, as_index=False)["count"].sum()[list(schema.SWEEP_HIST_COLUMNS)]
    tables.write_table(hist, out / "sweep_hist.csv")
    return frame
