"""Whether a training state can still give a good model: the one finiteness scan of weights, momentum buffers and
gradients, and the one rot rule (a collapsed GradScaler, NaN/Inf in any weight or momentum buffer).

Defined once here because the trainer wrapper (``guard.StepGuard``, which stops training on rot) and the
diagnostics that explain it (``geodiag.diagnostics.instruments.checkpoint_health``, watch's step replay,
``replay``) must agree on what "rotten" means. It lives in ``geodiag.losses`` because the guard needs it and
``geodiag.losses`` never imports ``geodiag.diagnostics``; torch and numpy only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

# Below this a GradScaler shrinks gradients instead of protecting them from fp16 underflow.
DEFAULT_SCALE_FLOOR = 1.0
# What the rot rule can name, in the order it checks them (the first that holds is the reason).
ROT_EVENTS = ("scale", "weights", "momentum")


def nonfinite_flags(tensors: Sequence[Optional[torch.Tensor]], device: torch.device) -> torch.Tensor:
    """float64 flags on ``device``, one per tensor: 1.0 if it holds a NaN or Inf, 0.0 if not, absent, empty or not
    floating point. No host read: the caller reads the flags together with whatever else it reads.

    A tensor holds NaN/Inf exactly when its min or max is non-finite (NaN propagates through both; no overflow of
    finite values, unlike a sum of squares). One aminmax per tensor: ``_foreach_norm(inf)`` does the same in one
    call but, measured on the CPU, over ten times slower.
    """
    finite = torch.zeros((), dtype=torch.float64, device=device)
    extrema = [torch.stack(torch.aminmax(t.detach())).to(device, torch.float64)
               if t is not None and t.numel() and t.is_floating_point() else finite.expand(2) for t in tensors]
    if not extrema:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return (~torch.isfinite(torch.stack(extrema)).all(dim=1)).to(torch.float64)


def nonfinite_names(named: Sequence[tuple[str, Optional[torch.Tensor]]]) -> list[str]:
    """The names of the tensors holding NaN/Inf, in order: one scan and one host read."""
    if not named:
        return []
    device = next((t.device for _, t in named if t is not None), torch.device("cpu"))
    flags = nonfinite_flags([t for _, t in named], device).tolist()
    return [name for (name, _), flag in zip(named, flags) if flag == 1.0]


def momentum_buffers(parameters: Sequence[torch.Tensor], optimizer) -> list[Optional[torch.Tensor]]:
    """The SGD momentum buffer of each parameter (None where it has none yet, or without an optimizer)."""
    if optimizer is None:
        return [None] * len(parameters)
    return [optimizer.state.get(p, {}).get("momentum_buffer") for p in parameters]


def state_tensors(network, optimizer) -> list[tuple[str, Optional[torch.Tensor]]]:
    """Every weight ("weight NAME") and momentum buffer ("momentum NAME") of a network and its optimizer."""
    named = list(network.named_parameters())
    buffers = momentum_buffers([p for _, p in named], optimizer)
    return ([(f"weight {name}", p) for name, p in named]
            + [(f"momentum {name}", b) for (name, _), b in zip(named, buffers) if b is not None])


def grad_scale_collapsed(scale: float, floor: float) -> bool:
    """Whether a GradScaler scale is below ``floor`` or so small that 1/scale overflows in fp32.

    GradScaler unscales with an fp32 reciprocal: below about 2.9e-39 it is inf, and the next finite step is
    unscaled to NaN. Below 1 the scale already shrinks gradients instead of protecting them from fp16 underflow,
    and it regrows only after 2000 clean steps per doubling.
    """
    with np.errstate(over="ignore", divide="ignore"):
        inverse = np.reciprocal(np.float32(scale))
    return not (scale >= floor and np.isfinite(inverse))


def rot_event(scale: Optional[float], scale_floor: float, nonfinite_weights: int,
              nonfinite_momentum: int) -> Optional[str]:
    """The rot rule: which of ``ROT_EVENTS`` makes the state unfit to go on with (None: it is fit).

    ``scale``: the GradScaler's scale, None without a scaler (a NaN scale is collapsed); the other two: how many
    weight and momentum tensors hold NaN/Inf.
    """
    if scale is not None and grad_scale_collapsed(scale, scale_floor):
        return "scale"
    if nonfinite_weights:
        return "weights"
    if nonfinite_momentum:
        return "momentum"
    return None
