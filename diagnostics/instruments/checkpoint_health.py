"""The health of a saved nnU-Net checkpoint: non-finite weights and optimizer state, and the GradScaler's scale.

Why: a NaN in a logged epoch loss can be one skipped batch (harmless under a GradScaler), a scale that has
collapsed until 1/scale is inf in fp32 (the next clean step then writes NaN into the weights), or weights and
momentum already non-finite (permanent). A checkpoint tells which of these it was saved in; the live run's side of
the same question is the step guard's record (``geodiag.losses.nnunet.guard.StepRecord``).
"""
from __future__ import annotations

from typing import Optional

import torch

from geodiag.losses.nnunet.state_health import DEFAULT_SCALE_FLOOR, nonfinite_names, rot_event

from .errors import GeodiagError


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
