"""Replay one failing batch in fp32, fp64 and its original setting to tell broken maths from fp16 overflow.

The batch is re-run with full provenance checks (``NonFiniteProvenance(sync="op")``: a host sync per op,
live tensors in the report) once per precision, each on a fresh copy of the model:

- still non-finite in fp64 at loss scale 1          -> ``maths``: the formula itself (e.g. sqrt at 0);
- finite in fp64 but not in fp32                    -> ``fp32-range``: needs more range/precision than fp32;
- finite in fp32 and fp64, not in the original run  -> ``low-precision``: fp16/bf16 overflow or underflow, or
  the loss scale (benign for the maths, but the fp16 path needs a fix such as fp32 moments);
- finite everywhere                                 -> ``not-reproduced``: look at the weights, optimizer state
  or the data pipeline instead (the batch alone does not fail);
- NaN/Inf already in the batch or the weights       -> ``non-finite-input`` (nothing is run).

``step_fn(model, batch, precision) -> loss`` runs the forward pass and the loss and returns a scalar tensor;
the replay owns everything else: it casts a copy of the model and the batch's floating tensors to
``precision.dtype``, enters autocast when ``precision.autocast`` is set, multiplies the loss by
``precision.loss_scale`` and calls ``backward()``. ``step_fn`` may read ``precision`` (e.g. to cast a tensor it
builds itself) but must not call backward or an optimizer. For nnU-Net::

    def step_fn(network, batch, precision):
        output = network(batch["data"])
        return dice_ce(output, batch["target"]) + geometric(output.softmax(1), batch["target"])
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from geodiag.losses.nnunet.state_health import nonfinite_names
from geodiag.reports.schema import GRAD_SCALER_INITIAL_SCALE

from ..instruments.devices import PRECISIONS
from ..instruments.errors import GeodiagError
from .provenance import NonFiniteProvenance
from .provenance_report import ProvenanceReport

VERDICTS = ("maths", "fp32-range", "low-precision", "not-reproduced", "non-finite-input")

# The autocast vocabulary (fp32, bf16, fp16), plus fp64: a replay may also run the whole model in fp64.
_NAMES = ("fp64", *PRECISIONS)


@dataclass(frozen=True)
class Precision:
    """How to run one replay: model/batch dtype, optional autocast dtype, loss scale."""

    name: str
    dtype: torch.dtype = torch.float32
    autocast: Optional[torch.dtype] = None
    loss_scale: float = 1.0

    @classmethod
    def parse(cls, spec: Union[str, "Precision"]) -> "Precision":
        """``fp64``, ``fp32``: model and batch in that dtype, no autocast; ``fp16`` / ``bf16``: an fp32 model under
        autocast to that dtype (nnU-Net's CUDA setting); an optional ``@SCALE`` sets the loss scale, e.g.
        ``fp16@65536`` (GradScaler's initial scale, ``GRAD_SCALER_INITIAL_SCALE``)."""
        if isinstance(spec, Precision):
            return spec
        name, _, scale_text = str(spec).partition("@")
        if name not in _NAMES:
            raise GeodiagError(f"unknown precision {spec!r}; use {', '.join(_NAMES)}, optionally "
                               f"@SCALE (e.g. fp16@{GRAD_SCALER_INITIAL_SCALE:g})")
        try:
            scale = float(scale_text) if scale_text else 1.0
        except ValueError:
            raise GeodiagError(f"bad loss scale in precision {spec!r}: {scale_text!r} is not a number") from None
        if not (math.isfinite(scale) and scale > 0):
            raise GeodiagError(f"loss scale in precision {spec!r} must be a finite number > 0")
        if PRECISIONS.get(name) is not None:
            return cls(str(spec), torch.float32, PRECISIONS[name], scale)
        return cls(str(spec), torch.float64 if name == "fp64" else torch.float32, None, scale)


@dataclass(frozen=True)
class ReplayRun:
    """One replay: the loss value (NaN/Inf kept) and the provenance report (None when everything was finite)."""

    precision: Precision
    loss: float
    report: Optional[ProvenanceReport]

    @property
    def finite(self) -> bool:
        return self.report is None and math.isfinite(self.loss)


@dataclass(frozen=True)
class ReplayResult:
    """The verdict, why, and each run's report."""

    verdict: str
    explanation: str
    runs: tuple[ReplayRun, ...]

    @property
    def reports(self) -> dict[str, Optional[ProvenanceReport]]:
        return {run.precision.name: run.report for run in self.runs}

    def run(self, name: str) -> ReplayRun:
        return next(r for r in self.runs if r.precision.name == name)


StepFn = Callable[[Optional[nn.Module], Any, Precision], torch.Tensor]


def replay(step_fn: StepFn, batch: Any, *, model: Optional[nn.Module] = None,
           precisions: Sequence[Union[str, Precision]] = ("fp32", "fp64"),
           original: Union[str, Precision, None] = None, loss: Optional[nn.Module] = None,
           allow: Iterable[str] = (), seed: int = 0) -> ReplayResult:
    """Re-run ``batch`` in each precision (and ``original``, if given) with full checks; classify the failure.

    ``model`` is deep-copied per run (the caller's weights and buffers are untouched); ``loss`` (a module with
    taps, e.g. GeometricLoss) gives the reports their tap context; ``allow`` is passed to the provenance;
    every run starts from the same RNG ``seed`` (dropout, augmentation inside ``step_fn``).
    """
    runs_wanted = [Precision.parse(p) for p in ([original] if original is not None else []) + list(precisions)]
    if not runs_wanted:
        raise GeodiagError("nothing to replay: give at least one precision")
    bad_inputs = _non_finite_inputs(model, batch)
    if bad_inputs:
        return ReplayResult("non-finite-input", f"NaN/Inf before any op ran, in {bad_inputs}: fix the data or the "
                            "checkpoint first (a replay would only pass them on)", ())
    allow = tuple(allow)
    runs = tuple(_run_once(step_fn, batch, model, p, loss, allow, seed) for p in runs_wanted)
    original_run = runs[0] if original is not None else None
    verdict, explanation = _classify(original_run, runs[1:] if original is not None else runs)
    return ReplayResult(verdict, explanation, runs)


def _run_once(step_fn: StepFn, batch: Any, model: Optional[nn.Module], precision: Precision,
              loss: Optional[nn.Module], allow: tuple[str, ...], seed: int) -> ReplayRun:
    device = _device_of(model, batch)
    replica = copy.deepcopy(model).to(precision.dtype) if model is not None else None
    cast_batch = tree_map(lambda v: v.detach().to(precision.dtype)
                          if isinstance(v, torch.Tensor) and v.is_floating_point() else v, batch)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.enable_grad(), NonFiniteProvenance(replica, loss, allow=allow, sync="op") as prov:
            autocast = (torch.autocast(device.type, dtype=precision.autocast) if precision.autocast is not None
                        else contextlib.nullcontext())
            with autocast:
                value = step_fn(replica, cast_batch, precision)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise GeodiagError(f"step_fn must return the loss as a one-element tensor, got {type(value).__name__}"
                                   + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
            if value.requires_grad:
                (value * precision.loss_scale).backward()
            loss_value = float(value.detach())
    return ReplayRun(precision, loss_value, prov.report())


def _classify(original: Optional[ReplayRun], runs: Sequence[ReplayRun]) -> tuple[str, str]:
    def failing(dtype: torch.dtype) -> list[ReplayRun]:
        return [r for r in runs if r.precision.dtype == dtype and r.precision.autocast is None
                and r.precision.loss_scale == 1.0 and not r.finite]

    def names(selected: Iterable[ReplayRun]) -> str:
        return ", ".join(r.precision.name for r in selected)

    fp64, fp32 = failing(torch.float64), failing(torch.float32)
    checked = [r for r in runs if r.precision.autocast is None and r.precision.loss_scale == 1.0]
    if fp64:
        return "maths", (f"non-finite even in fp64 at loss scale 1: the formula itself fails "
                         f"({_first_op(fp64)}); no change of precision fixes it")
    if fp32:
        return "fp32-range", f"finite in fp64, non-finite in fp32 ({_first_op(fp32)}): fp32 lacks range or precision"
    others = [r for r in runs if r not in checked and not r.finite]
    failed = ([original] if original is not None and not original.finite else []) + others
    if failed:
        basis = f"finite in {names(checked)}" if checked else "no fp32/fp64 run to compare with"
        return "low-precision", (f"{basis} but non-finite in {names(failed)} ({_first_op(failed)}): "
                                 "fp16/bf16 overflow or underflow or the loss scale, not the maths")
    return "not-reproduced", "finite in every run: the batch alone does not fail; check weights, optimizer state and data"


def _first_op(runs: Sequence[ReplayRun]) -> str:
    report = next((r.report for r in runs if r.report is not None), None)
    if report is None:
        return "non-finite loss, no op flagged"
    return f"{report.phase} {report.op}" + (f" in {report.node}" if report.node else "")


def _non_finite_inputs(model: Optional[nn.Module], batch: Any) -> str:
    """Names of the batch entries and model tensors holding NaN/Inf, comma-separated ('' when all finite)."""
    named = [(f"batch[{i}]", v) for i, v in enumerate(tree_flatten(batch)[0])]
    if model is not None:
        named += list(model.named_parameters()) + list(model.named_buffers())
    return ", ".join(nonfinite_names([(name, v) for name, v in named if isinstance(v, torch.Tensor)]))


def _device_of(model: Optional[nn.Module], batch: Any) -> torch.device:
    for value in (list(model.parameters()) if model is not None else []) + tree_flatten(batch)[0]:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
