"""The state of training around a non-finite value: GradScaler scale and skips, clip norm, weight and momentum
finiteness; per step on the device, and from a saved nnU-Net checkpoint.

Why: a NaN in a logged epoch loss can be one skipped batch (harmless under a GradScaler), a scale that has
collapsed until 1/scale is inf in fp32 (the next clean step then writes NaN into the weights, notes §4), or
weights and momentum already non-finite (permanent). Telling these apart needs the scale history, the skipped
steps, the norm ``clip_grad_norm_`` returned and the finiteness of every weight and momentum buffer.
``TrainingStateRecorder.record`` reads only device tensors (``scaler._scale``, never ``get_scale()``, which
syncs) into preallocated device buffers; ``rows()`` reads everything back in one transfer.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from geodiag.losses.nnunet.state_health import (DEFAULT_SCALE_FLOOR, momentum_buffers, nonfinite_flags, nonfinite_names,
                                         rot_event)

from .errors import GeodiagError

# Per-step scalars, in buffer order; NaN where the quantity was not given.
STEP_FIELDS = ("scale", "scale_decreased", "found_inf", "skipped", "inv_scale_finite", "grad_norm",
               "grad_norm_finite")

Number = Union[torch.Tensor, float, bool]


class _DeviceSeries:
    """Rows of a fixed width appended on the device into preallocated chunks (no reallocation per step)."""

    def __init__(self, width: int, device: torch.device, chunk: int = 1024) -> None:
        self.width, self.device, self.chunk = width, device, chunk
        self._chunks: list[torch.Tensor] = []
        self.length = 0

    def append(self, row: torch.Tensor) -> None:
        if self.length == len(self._chunks) * self.chunk:
            self._chunks.append(torch.full((self.chunk, self.width), math.nan, dtype=torch.float64,
                                           device=self.device))
        self._chunks[-1][self.length % self.chunk].copy_(row)
        self.length += 1

    def read(self) -> torch.Tensor:
        """All rows on the host, [length, width] (one transfer)."""
        if not self._chunks:
            return torch.empty(0, self.width, dtype=torch.float64)
        return torch.cat(self._chunks).cpu()[:self.length]


class TrainingStateRecorder:
    """Per-step GradScaler / clipping / finiteness record, kept on the device until ``rows()``."""

    def __init__(self, chunk: int = 1024) -> None:
        self.chunk = chunk
        self.parameter_names: list[str] = []
        self.steps: list[int] = []
        self._series: Optional[_DeviceSeries] = None
        self._previous_scale: Optional[torch.Tensor] = None

    @torch.no_grad()
    def record(
        self,
        *,
        scaler: Optional[torch.amp.GradScaler] = None,
        found_inf: Optional[Number] = None,
        grad_norm: Optional[Number] = None,
        model: Optional[nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        step: Optional[int] = None,
        check_parameters: bool = True,
    ) -> None:
        """Record one step; call it after ``scaler.update()`` (a skip shows as a decreased scale).

        ``found_inf``: the step's overflow flag if known (GradScaler forgets it in ``update()``).
        ``grad_norm``: what ``clip_grad_norm_`` returned. ``model`` / ``optimizer``: whose weights and momentum
        buffers to check; parameters are named after ``model`` (else ``param[i]`` in optimizer order).
        ``check_parameters=False`` skips that scan (a pass over every weight and buffer) for this step and
        records it as not checked: weights only turn non-finite through a step whose gradient norm is not.
        """
        params = self._parameters(model, optimizer)
        device = self._device(scaler, grad_norm, params)
        if self._series is None:
            self._series = _DeviceSeries(len(STEP_FIELDS) + 2 * len(params), device, self.chunk)
        elif self._series.width != len(STEP_FIELDS) + 2 * len(params):
            raise ValueError("the set of recorded parameters changed between steps")

        def as_tensor(value: Optional[Number]) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.detach().to(device, torch.float64).reshape(())
            # A fill, not torch.as_tensor: copying a host value to a CUDA device synchronises.
            return torch.full((), math.nan if value is None else float(value), dtype=torch.float64, device=device)

        nan = as_tensor(None)
        scaler_scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        if scaler_scale is not None:
            scale32 = scaler_scale.reshape(()).to(device)
            scale = scale32.to(torch.float64)
            decreased = (scale < self._previous_scale) if self._previous_scale is not None else torch.zeros_like(scale)
            self._previous_scale = scale
            inv_finite = torch.isfinite(torch.reciprocal(scale32))  # in fp32, as GradScaler unscales
        else:
            scale = decreased = inv_finite = nan
        found = as_tensor(found_inf)
        if scaler_scale is None and found_inf is None:
            skipped = nan  # nothing tells: unknown, not False
        else:
            skipped = ((decreased == 1) | (found > 0)).to(torch.float64)
        norm = as_tensor(grad_norm)
        values = [scale, decreased.to(torch.float64), found, skipped, inv_finite.to(torch.float64), norm,
                  torch.isfinite(norm).to(torch.float64)]
        if check_parameters:
            weight_flags = nonfinite_flags(params, device)
            momentum_flags = nonfinite_flags(momentum_buffers(params, optimizer), device)
        else:
            weight_flags = momentum_flags = torch.full((len(params),), math.nan, dtype=torch.float64, device=device)
        self._series.append(torch.cat([torch.stack(values), weight_flags, momentum_flags]))
        self.steps.append(len(self.steps) if step is None else step)

    def _parameters(self, model: Optional[nn.Module], optimizer) -> list[torch.Tensor]:
        if model is not None:
            named = list(model.named_parameters())
        elif optimizer is not None:
            named = [(f"param[{i}]", p) for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]
        else:
            named = []
        if not self.parameter_names:
            self.parameter_names = [name for name, _ in named]
        return [p for _, p in named]

    @staticmethod
    def _device(scaler, grad_norm, params) -> torch.device:
        for candidate in (getattr(scaler, "_scale", None), grad_norm, *params[:1]):
            if isinstance(candidate, torch.Tensor):
                return candidate.device
        return torch.device("cpu")

    def clear(self) -> None:
        """Drop the recorded rows (e.g. after writing an epoch); the last scale is kept to detect the next skip."""
        if self._series is not None:
            self._series = _DeviceSeries(self._series.width, self._series.device, self.chunk)
        self.steps.clear()

    # ------------------------------------------------------------------ read back
    def rows(self) -> list[dict]:
        """One dict per recorded step, with the names of non-finite weights and momentum buffers."""
        if self._series is None:
            return []
        table = self._series.read()
        n_fields, n_params = len(STEP_FIELDS), len(self.parameter_names)
        rows = []
        for step, values in zip(self.steps, table.tolist()):
            row = {"step": step, **dict(zip(STEP_FIELDS, values[:n_fields]))}
            for field in ("scale_decreased", "skipped", "inv_scale_finite", "grad_norm_finite"):
                row[field] = None if math.isnan(row[field]) else bool(row[field])
            weights = values[n_fields:n_fields + n_params]
            momentum = values[n_fields + n_params:]
            row["parameters_checked"] = not any(math.isnan(flag) for flag in weights)
            row["nonfinite_weights"] = [n for n, flag in zip(self.parameter_names, weights) if flag == 1.0]
            row["nonfinite_momentum"] = [n for n, flag in zip(self.parameter_names, momentum) if flag == 1.0]
            rows.append(row)
        return rows

    def summary(self, rows: Optional[list[dict]] = None) -> dict:
        """Counts and first occurrences over all recorded steps (or over ``rows`` already read back)."""
        rows = self.rows() if rows is None else rows

        def first(predicate) -> Optional[int]:
            return next((r["step"] for r in rows if predicate(r)), None)

        scales = [r["scale"] for r in rows if not math.isnan(r["scale"])]
        norms = [r["grad_norm"] for r in rows if not math.isnan(r["grad_norm"])]
        return {
            "steps": len(rows),
            "skipped_steps": sum(bool(r["skipped"]) for r in rows),
            "first_skipped_step": first(lambda r: r["skipped"]),
            "min_scale": min(scales) if scales else None,
            "last_scale": scales[-1] if scales else None,
            "first_inv_scale_inf_step": first(lambda r: r["inv_scale_finite"] is False),
            "max_grad_norm": max(norms) if norms else None,
            "first_nonfinite_grad_norm_step": first(lambda r: r["grad_norm_finite"] is False),
            "first_nonfinite_weights_step": first(lambda r: r["nonfinite_weights"]),
            "first_nonfinite_momentum_step": first(lambda r: r["nonfinite_momentum"]),
        }


# ---------------------------------------------------------------------- checkpoints
def checkpoint_health(state_dict: dict, scale_floor: float = DEFAULT_SCALE_FLOOR) -> dict:
    """Non-finite weights and optimizer state, and the GradScaler's scale, of a loaded nnU-Net checkpoint.

    ``state_dict`` is what ``torch.load(path, weights_only=False)`` returns for nnU-Net: keys
    ``network_weights``, ``optimizer_state`` and ``grad_scaler_state`` (None or {} without a scaler).
    Optimizer entries are named after the network's parameters when their counts match (nnU-Net's
    networks have no buffers), else ``param[i]``.
    """
    if not isinstance(state_dict, dict) or "network_weights" not in state_dict:
        raise GeodiagError("not an nnU-Net checkpoint: expected a dict with a 'network_weights' entry")
    weights = state_dict["network_weights"]
    if not hasattr(weights, "items"):
        raise GeodiagError("checkpoint 'network_weights' is not a state dict")
    weight_report = _nonfinite_report({name: t for name, t in weights.items() if isinstance(t, torch.Tensor)})

    optimizer_state = state_dict.get("optimizer_state") or {}
    per_param = optimizer_state.get("state", {}) if isinstance(optimizer_state, dict) else {}
    order = [i for group in optimizer_state.get("param_groups", []) for i in group.get("params", [])] \
        if isinstance(optimizer_state, dict) else []
    names = list(weights.keys())
    label = {i: names[pos] for pos, i in enumerate(order)} if len(order) == len(names) else {}
    optimizer_tensors = {
        f"{label.get(index, f'param[{index}]')}.{key}": value
        for index, entries in per_param.items() for key, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    optimizer_report = _nonfinite_report(optimizer_tensors)

    scaler_report = _scaler_report(state_dict.get("grad_scaler_state"), scale_floor)
    healthy = rot_event(scaler_report["scale"] if scaler_report else None, scale_floor,
                        len(weight_report["nonfinite"]), len(optimizer_report["nonfinite"])) is None
    return {"weights": weight_report, "optimizer": optimizer_report, "grad_scaler": scaler_report,
            "healthy": healthy}


def _nonfinite_report(tensors: dict[str, torch.Tensor]) -> dict:
    """Element counts of NaN / Inf per tensor, listing only the tensors that have any.

    A tensor saved under several names (nnU-Net's PlainConvUNet state dict holds each encoder weight as
    ``encoder.*``, ``decoder.encoder.*`` and ``...all_modules.*``) is counted once, under its first name.
    """
    unique: dict[tuple, tuple[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        t = tensor.detach()
        unique.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())),
                          (name, t))
    nonfinite = {}
    for name in nonfinite_names(list(unique.values())):  # element counts only where the scan found any
        t = tensors[name].detach()
        nonfinite[name] = {"nan": int(torch.isnan(t).sum()), "inf": int(torch.isinf(t).sum()), "numel": t.numel()}
    total = sum(entry["nan"] + entry["inf"] for entry in nonfinite.values())
    elements = sum(t.numel() for _, t in unique.values())
    return {"tensors": len(unique), "elements": elements, "nonfinite_elements": total, "nonfinite": nonfinite}


def _scaler_report(scaler_state: Optional[dict], scale_floor: float) -> Optional[dict]:
    if not scaler_state:
        return None
    if not isinstance(scaler_state, dict) or "scale" not in scaler_state:
        raise GeodiagError("checkpoint 'grad_scaler_state' has no 'scale' (not a GradScaler.state_dict())")
    scale = float(scaler_state["scale"])
    scale32 = torch.tensor(scale, dtype=torch.float32)  # GradScaler keeps and inverts the scale in fp32
    return {
        "scale": scale,
        "inv_scale_finite": bool(torch.isfinite(torch.reciprocal(scale32))),
        "collapsed": not scale >= scale_floor,
        "scale_floor": scale_floor,
        "growth_tracker": scaler_state.get("_growth_tracker"),
        "growth_interval": scaler_state.get("growth_interval"),
    }
