"""Re-run one nnU-Net training step, the trainer's own ``train_step`` code, under NaN provenance, to name the op and
source line that produced the first non-finite value and to tell maths from precision from the GradScaler.

Why the trainer's own ``train_step``: the researcher's loss, masking, clipping and scaler handling live there; a
replay through a re-implementation would test something else. Each run uses an uncompiled fp-cast copy of the
network swapped into ``trainer.network`` (the live weights are never touched), the step's RNG state, and the
guard's ``neutralise_all`` so that ``optimizer.step`` is a no-op. Runs, in this order:

- ``as-run``: the run's own setting (its GradScaler state and, on CUDA, nnU-Net's autocast);
- ``autocast at loss scale 1`` (only when the run had a GradScaler): separates the scale from fp16 range;
- ``fp32 at loss scale 1`` and ``fp64 at loss scale 1``: no scaler, no autocast.

Classification: non-finite in fp64 -> ``maths`` (no change of precision fixes it); finite in fp64 but not fp32 ->
``precision``; finite in fp32, non-finite with autocast at scale 1 -> ``precision`` (fp16/bf16); finite with
autocast at scale 1, non-finite as run -> ``scaler``; finite as run -> ``not-reproduced``. Each run also says
whether a non-finite value reached the parameters' gradients (checked as each gradient is accumulated, before any
clipping mixes them) or was absorbed on the way (a masked NaN: finite gradients).
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from geodiag.losses import GeometricLoss
from geodiag.losses.nnunet.guard import StepGuard
from geodiag.losses.nnunet.state_health import nonfinite_flags

from ..nonfinite.provenance import NonFiniteProvenance
from ..nonfinite.provenance_report import ProvenanceReport

CLASSIFICATIONS = ("maths", "precision", "scaler", "not-reproduced")
_SOURCE = re.compile(r"^(?P<file>.*?):(?P<line>\d+) in (?P<function>[^:]*): ?(?P<code>.*)$")


@dataclass(frozen=True)
class Setting:
    """One replay: the network and batch dtype, whether nnU-Net's autocast stays on, whether the scaler is used."""

    name: str
    dtype: torch.dtype
    autocast: bool
    scaler: bool


def settings_for(trainer) -> list[Setting]:
    """The replays worth running for this trainer (see the module docstring)."""
    uses_autocast = trainer.device.type == "cuda"
    has_scaler = getattr(trainer, "grad_scaler", None) is not None
    runs = [Setting("as-run", torch.float32, uses_autocast, has_scaler)]
    if has_scaler and uses_autocast:
        runs.append(Setting("autocast at loss scale 1", torch.float32, True, False))
    if has_scaler or uses_autocast:
        runs.append(Setting("fp32 at loss scale 1", torch.float32, False, False))
    runs.append(Setting("fp64 at loss scale 1", torch.float64, False, False))
    return runs


def plain_network(network: nn.Module) -> nn.Module:
    """The module under DDP and torch.compile wrappers: replays run uncompiled."""
    network = getattr(network, "module", network) if type(network).__name__ == "DistributedDataParallel" else network
    return getattr(network, "_orig_mod", network)


def replay_train_step(trainer, train_step: Callable[[dict], dict], batch: dict, *,
                      rng_state: Optional[torch.Tensor] = None, scaler_state: Optional[dict] = None) -> dict:
    """Run ``train_step(batch)`` once per setting under provenance; the runs and the classification, as JSON."""
    runs = [_run(trainer, train_step, batch, setting, rng_state, scaler_state) for setting in settings_for(trainer)]
    classification, explanation = _classify(runs)
    first = next((run for run in runs if run["nonfinite"]), None)
    return {"classification": classification, "explanation": explanation,
            "reaches_parameter_gradients": bool(first and first["reaches_parameter_gradients"]),
            "runs": runs}


def _run(trainer, train_step, batch: dict, setting: Setting, rng_state, scaler_state) -> dict:
    replica = _replica(plain_network(trainer.network), setting.dtype)
    gradient_flags: dict[str, torch.Tensor] = {}
    handles = [p.register_post_accumulate_grad_hook(_flag_gradient(gradient_flags, name))
               for name, p in replica.named_parameters() if p.requires_grad]
    loss_module = getattr(trainer, "geometric_loss", None)
    loss_module = loss_module if isinstance(loss_module, GeometricLoss) else None
    cast = {key: _cast(value, setting.dtype) for key, value in batch.items()}
    saved = trainer.network, trainer.optimizer, trainer.grad_scaler
    trainer.network = replica
    # An optimizer over the replica, for GradScaler.unscale_/step to see its gradients; its steps are no-ops.
    trainer.optimizer = torch.optim.SGD(replica.parameters(), lr=0.0)
    trainer.grad_scaler = _scaler(saved[2], trainer.device, scaler_state) if setting.scaler else None
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), _autocast_disabled(not setting.autocast), \
                StepGuard.wrap(trainer).replaying():
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            with NonFiniteProvenance(replica, loss_module, sync="op") as provenance:
                result = train_step(cast)
            report = provenance.report()
    finally:
        trainer.network, trainer.optimizer, trainer.grad_scaler = saved
        for handle in handles:
            handle.remove()
    bad = [name for name, flag in gradient_flags.items() if bool(flag)]
    loss = float(result["loss"]) if isinstance(result, dict) and "loss" in result else math.nan
    return {"setting": setting.name, "loss": loss, "nonfinite": report is not None or not math.isfinite(loss),
            **describe(report), "reaches_parameter_gradients": bool(bad),
            "nonfinite_parameter_gradients": len(bad), "first_nonfinite_parameter_gradients": bad[:5]}


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


def describe(report: Optional[ProvenanceReport]) -> dict:
    """A provenance report as the JSON fields of first_nonfinite.json (all None when nothing was flagged)."""
    if report is None:
        return {"phase": None, "op": None, "aten_op": None, "node": None, "module": None, "site": None,
                "source": None, "dtype": None, "inputs": [], "outputs": [], "produced": None}
    forward = report.forward_op or report.op
    match = _SOURCE.match(report.source or "")
    site = f"{match['file'].rsplit('/', 1)[-1]}:{match['line']}" if match else None
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


def _classify(runs: list[dict]) -> tuple[str, str]:
    by_name = {run["setting"]: run for run in runs}
    as_run, fp64 = by_name["as-run"], by_name["fp64 at loss scale 1"]
    fp32 = by_name.get("fp32 at loss scale 1", as_run)
    autocast = by_name.get("autocast at loss scale 1")
    if not as_run["nonfinite"]:
        return "not-reproduced", ("finite when replayed as run: the batch and weights alone do not fail; look at "
                                  "state the replay does not restore (data pipeline, other side effects)")
    if fp64["nonfinite"]:
        return "maths", (f"non-finite even in fp64 at loss scale 1 ({_where(fp64)}): the formula itself fails; "
                         "no change of precision fixes it")
    if fp32["nonfinite"]:
        return "precision", f"finite in fp64, non-finite in fp32 ({_where(fp32)}): fp32 lacks range or precision"
    if autocast is not None and autocast["nonfinite"]:
        return "precision", (f"finite in fp32 and fp64, non-finite under autocast at loss scale 1 "
                             f"({_where(autocast)}): fp16/bf16 overflow or underflow")
    return "scaler", (f"finite at loss scale 1, non-finite with the GradScaler's scale ({_where(as_run)}): the "
                      "scaled loss or gradients overflow")


def _where(run: dict) -> str:
    if run["op"] is None:
        return "non-finite loss, no op flagged"
    return f"{run['phase']} {run['op']}" + (f" at {run['site']}" if run["site"] else "")
