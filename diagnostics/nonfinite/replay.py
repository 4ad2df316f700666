"""Re-run one failing step under NaN provenance, as it ran and at loss scale 1 in fp32 and fp64, to name the op and
source line that produced the first non-finite value and to tell maths from precision from the GradScaler.

Why the step's own code: the researcher's loss, masking, clipping and scaler handling live there; a replay through a
re-implementation would test something else. ``replay_train_step`` re-runs a trainer's own ``train_step`` (``geodiag
watch`` after a bad step, ``geodiag replay STEP_FOLDER``); ``replay`` re-runs any step function (``analyze-checkpoint``
its failing pass). Each run uses an uncompiled copy of the network in the run's dtype (the live weights are never
touched), the batch's floating tensors in that dtype, the same RNG state, and a host sync per op
(``NonFiniteProvenance(sync="op")``, so the producer's tensors are alive for the report). Runs, in this order:

- ``as-run``: the step's own setting (its GradScaler, its autocast);
- ``autocast at loss scale 1`` (only when the step had both): separates the scale from fp16/bf16 range;
- ``fp32 at loss scale 1`` (when it had either) and ``fp64 at loss scale 1``: no GradScaler, and every
  ``torch.autocast`` the step enters is forced off.

The classification is a name of ``reports.schema.REPLAY_CLASSIFICATIONS``: non-finite in fp64 -> maths; finite
in fp64, not in fp32 or not under autocast at scale 1 -> precision; finite at scale 1, non-finite as run -> scaler;
finite as run -> not-reproduced; NaN/Inf already in the batch or the weights -> non-finite-input (nothing runs: a
replay would only pass them on); a step that raises -> replay-failed (a replay never ends the run it explains).
Each run also says whether a non-finite value reached the parameters' gradients (checked as each gradient is
accumulated, before any clipping mixes them) or was absorbed on the way (a masked NaN: finite gradients).
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from geodiag.losses import GeometricLoss
from geodiag.losses.nnunet.guard import StepGuard
from geodiag.losses.nnunet.state_health import nonfinite_flags, nonfinite_names
from geodiag.reports.schema import (REPLAY_CLASSIFICATIONS, REPLAY_FAILED, REPLAY_MATHS, REPLAY_NON_FINITE_INPUT,
                                    REPLAY_NOT_REPRODUCED, REPLAY_PRECISION, REPLAY_SCALER)

from ..instruments.errors import GeodiagError
from .provenance import NonFiniteProvenance
from .provenance_report import ProvenanceReport
from .sites import format_site

AS_RUN = "as-run"
# How many tensor or parameter names a replay lists before counting the rest.
NAMES_SHOWN = 5
_SOURCE = re.compile(r"^(?P<file>.*?):(?P<line>\d+) in (?P<function>[^:]*): ?(?P<code>.*)$")


@dataclass(frozen=True)
class Setting:
    """One run: the network and batch dtype, whether the step's autocast stays on, whether its GradScaler is used."""

    name: str
    dtype: torch.dtype
    autocast: bool
    scaler: bool


@dataclass(frozen=True)
class ReplayRun:
    """One run: the loss (NaN/Inf kept), the provenance report (None when no op was flagged) and the parameters whose
    gradient went non-finite."""

    setting: Setting
    loss: float
    report: Optional[ProvenanceReport]
    nonfinite_gradients: tuple[str, ...]

    @property
    def nonfinite(self) -> bool:
        return self.report is not None or not math.isfinite(self.loss)

    def as_json(self) -> dict:
        return {"setting": self.setting.name, "loss": self.loss, "nonfinite": self.nonfinite, **describe(self.report),
                "reaches_parameter_gradients": bool(self.nonfinite_gradients),
                "nonfinite_parameter_gradients": len(self.nonfinite_gradients),
                "first_nonfinite_parameter_gradients": list(self.nonfinite_gradients[:NAMES_SHOWN])}


@dataclass(frozen=True)
class Replay:
    """The classification (a name of ``REPLAY_CLASSIFICATIONS``), why, and the runs (none when none ran)."""

    classification: str
    explanation: str
    runs: tuple[ReplayRun, ...] = ()

    def as_json(self) -> dict:
        """As first_nonfinite.json's "replay" and replay_<device>.json hold it."""
        first = next((run for run in self.runs if run.nonfinite), None)
        reaches = bool(first and first.nonfinite_gradients) if self.runs else None
        return {"classification": self.classification, "explanation": self.explanation,
                "reaches_parameter_gradients": reaches, "runs": [run.as_json() for run in self.runs]}


StepFn = Callable[[nn.Module, dict, Setting], Any]


def replay(step: StepFn, network: nn.Module, batch: dict, *, autocast: bool, scaler: bool = False,
           loss_module: Optional[nn.Module] = None, rng_state: Optional[torch.Tensor] = None) -> Replay:
    """Run ``step(network copy, batch copy, setting)`` once per setting; classify. The step is a training step's
    code: it runs forward and backward (the optimizer, if any, is the caller's to neutralise) and returns the loss.

    ``autocast`` and ``scaler`` say how the step ran (its own code enters autocast and uses the scaler; the runs at
    loss scale 1 switch them off); ``loss_module`` (a module with taps, e.g. GeometricLoss) gives the reports their
    tap context; every run starts from ``rng_state`` (else from the current CPU RNG state)."""
    inputs = _nonfinite_inputs(network, batch)
    if inputs:
        return Replay(REPLAY_NON_FINITE_INPUT, _explained(REPLAY_NON_FINITE_INPUT, f"in {inputs}"))
    try:
        runs = tuple(_run(step, network, batch, setting, loss_module, rng_state)
                     for setting in _settings(autocast, scaler))
    except Exception as exc:  # noqa: BLE001 - the user's step may fail in ways nobody can foresee
        return Replay(REPLAY_FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return Replay(*_classify(runs), runs)


def replay_train_step(trainer, train_step: Callable[[dict], dict], batch: dict, *,
                      rng_state: Optional[torch.Tensor] = None, scaler_state: Optional[dict] = None) -> dict:
    """Replay ``train_step(batch)`` of an nnU-Net trainer (nnU-Net's autocast on CUDA, the trainer's GradScaler in
    its pre-step ``scaler_state`` when it has one); the runs and the classification, as JSON."""
    geometric = getattr(trainer, "geometric_loss", None)
    return replay(_trainer_step(trainer, train_step, scaler_state), trainer.network, batch,
                  autocast=trainer.device.type == "cuda", scaler=getattr(trainer, "grad_scaler", None) is not None,
                  loss_module=geometric if isinstance(geometric, GeometricLoss) else None,
                  rng_state=rng_state).as_json()


def _settings(autocast: bool, scaler: bool) -> list[Setting]:
    runs = [Setting(AS_RUN, torch.float32, autocast, scaler)]
    if scaler and autocast:
        runs.append(Setting("autocast at loss scale 1", torch.float32, True, False))
    if scaler or autocast:
        runs.append(Setting("fp32 at loss scale 1", torch.float32, False, False))
    runs.append(Setting("fp64 at loss scale 1", torch.float64, False, False))
    return runs


def _trainer_step(trainer, train_step: Callable[[dict], dict], scaler_state: Optional[dict]) -> StepFn:
    """``train_step`` with the replica swapped into the trainer, an optimizer over it whose steps the guard makes
    no-ops (GradScaler.unscale_/step must see the replica's gradients), and the GradScaler if the setting uses it."""
    def step(replica: nn.Module, batch: dict, setting: Setting):
        saved = trainer.network, trainer.optimizer, trainer.grad_scaler
        trainer.network = replica
        trainer.optimizer = torch.optim.SGD(replica.parameters(), lr=0.0)
        trainer.grad_scaler = _scaler(saved[2], trainer.device, scaler_state) if setting.scaler else None
        try:
            with StepGuard.wrap(trainer).replaying():
                result = train_step(batch)
        finally:
            trainer.network, trainer.optimizer, trainer.grad_scaler = saved
        if not (isinstance(result, dict) and "loss" in result):
            raise GeodiagError("train_step returned no 'loss' (nnU-Net's train_step returns {'loss': ...})")
        return result["loss"]
    return step


def _run(step: StepFn, network: nn.Module, batch: dict, setting: Setting, loss_module: Optional[nn.Module],
         rng_state: Optional[torch.Tensor]) -> ReplayRun:
    replica = _replica(_plain_network(network), setting.dtype)
    gradient_flags: dict[str, torch.Tensor] = {}
    handles = [p.register_post_accumulate_grad_hook(_flag_gradient(gradient_flags, name))
               for name, p in replica.named_parameters() if p.requires_grad]
    cast = {key: _cast(value, setting.dtype) for key, value in batch.items()}
    device = next(replica.parameters(), torch.empty(0)).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                _autocast_disabled(not setting.autocast):
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            with NonFiniteProvenance(replica, loss_module, sync="op") as provenance:
                value = step(replica, cast, setting)
            report = provenance.report()
    finally:
        for handle in handles:
            handle.remove()
    bad = tuple(name for name, flag in gradient_flags.items() if bool(flag))
    return ReplayRun(setting, _loss_value(value), report, bad)


def _loss_value(value) -> float:
    """The step's loss as a float: a number, or a one-element tensor or array."""
    try:
        return float(value.detach() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise GeodiagError(f"the replayed step must return its loss as a number or a one-element tensor, got "
                           f"{type(value).__name__}" + (f" of shape {tuple(value.shape)}" if hasattr(value, "shape")
                                                        else "")) from None


def _plain_network(network: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers: replays run uncompiled."""
    network = getattr(network, "module", network) if type(network).__name__ == "DistributedDataParallel" else network
    return getattr(network, "_orig_mod", network)


def _replica(network: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``network`` in ``dtype`` whose hooks are the original hook callables, not copies of them (a
    hook bound to a trainer would copy the trainer; a fault-injecting hook must act on the replay too)."""
    memo: dict[int, object] = {}
    for module in network.modules():
        for name, hooks in vars(module).items():
            if name.endswith("hooks") and isinstance(hooks, dict):
                memo.update((id(hook), hook) for hook in hooks.values())
    for parameter in network.parameters():
        memo.update((id(hook), hook) for hook in (parameter._backward_hooks or {}).values())
    return copy.deepcopy(network, memo).to(dtype)


def _flag_gradient(flags: dict, name: str):
    def hook(parameter: torch.Tensor) -> None:
        flags[name] = nonfinite_flags([parameter.grad], parameter.grad.device)[0]
    return hook


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


def _scaler(live, device: torch.device, state: Optional[dict]):
    """A GradScaler in the step's pre-step state (else a copy of the live one): the replay must not move its scale."""
    if state is None:
        return copy.deepcopy(live)
    scaler = torch.amp.GradScaler(device.type)
    scaler.load_state_dict(state)
    return scaler


@contextlib.contextmanager
def _autocast_disabled(disabled: bool):
    """Force every ``torch.autocast(...)`` entered inside to ``enabled=False`` (nnU-Net enables it on CUDA)."""
    if not disabled:
        yield
        return
    autocast = torch.amp.autocast_mode.autocast
    original = autocast.__init__

    def init(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        original(self, device_type, dtype=dtype, enabled=False, cache_enabled=cache_enabled)

    autocast.__init__ = init
    try:
        yield
    finally:
        autocast.__init__ = original


def _nonfinite_inputs(network: nn.Module, batch: dict) -> str:
    """The batch entries and network tensors holding NaN/Inf, comma-separated ('' when all are finite)."""
    network = _plain_network(network)
    names = nonfinite_names([*_named_tensors(batch), *network.named_parameters(), *network.named_buffers()])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def _named_tensors(batch: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The batch's tensors by key (``target[0]`` for the first of a list, as nnU-Net's deep-supervision targets)."""
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            yield str(key), value
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor))


def _classify(runs: tuple[ReplayRun, ...]) -> tuple[str, str]:
    """The first of fp64, fp32, autocast (each at loss scale 1) that fails names the cause; none: the scale does.
    The as-run setting is one of them when the step had no GradScaler, so ``scaler`` needs one."""
    as_run, fp64 = runs[0], runs[-1]
    if not as_run.nonfinite:
        return REPLAY_NOT_REPRODUCED, REPLAY_CLASSIFICATIONS[REPLAY_NOT_REPRODUCED]
    if fp64.nonfinite:
        return REPLAY_MATHS, _explained(REPLAY_MATHS, _where(fp64))
    at_scale_1 = [run for run in runs if not run.setting.scaler and run.setting.dtype == torch.float32]
    ordered = sorted(at_scale_1, key=lambda run: run.setting.autocast)  # fp32 first, then autocast
    failing = next((run for run in ordered if run.nonfinite), None)
    if failing is not None:
        return REPLAY_PRECISION, _explained(REPLAY_PRECISION, _where(failing))
    return REPLAY_SCALER, _explained(REPLAY_SCALER, _where(as_run))


def _explained(classification: str, detail: str) -> str:
    return f"{REPLAY_CLASSIFICATIONS[classification]}; {detail}"


def _where(run: ReplayRun) -> str:
    report = run.report
    if report is None:
        return f"in {run.setting.name}, a non-finite loss, no op flagged"
    fields = describe(report)
    site = f" at {fields['site']}" if fields["site"] else ""
    outside = "" if report.produced else " (received NaN/Inf from outside the step)"
    return f"in {run.setting.name}, {report.phase} {fields['op']}{site}{outside}"


def describe(report: Optional[ProvenanceReport]) -> dict:
    """A provenance report as the JSON fields of first_nonfinite.json (all None when nothing was flagged)."""
    if report is None:
        return {"phase": None, "op": None, "aten_op": None, "node": None, "module": None, "site": None,
                "source": None, "dtype": None, "inputs": [], "outputs": [], "produced": None}
    forward = report.forward_op or report.op
    match = _SOURCE.match(report.source or "")
    site = format_site(match["file"], int(match["line"])) if match else None
    return {"phase": report.phase, "op": _short(forward), "aten_op": report.op, "node": report.node,
            "module": report.module, "site": site, "source": report.source,
            "dtype": str(report.outputs[0].dtype).replace("torch.", "") if report.outputs else None,
            "inputs": [_tensor(t) for t in report.inputs], "outputs": [_tensor(t) for t in report.outputs],
            "produced": report.produced}


def _short(op: str) -> str:
    """aten.sqrt.default -> sqrt."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else op


def _tensor(summary) -> dict:
    return {"dtype": str(summary.dtype).replace("torch.", ""), "shape": list(summary.shape),
            "origin": summary.origin, "max_abs_finite": summary.max_abs_finite,
            "nan": summary.nan, "posinf": summary.posinf, "neginf": summary.neginf}
