"""Faults written into copies of real nnU-Net checkpoints (trusted test files, so full pickle is fine here)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


def write_modified(source: Path, target: Path, change: Callable[[dict], None]) -> Path:
    """Copy ``source`` to ``target`` with ``change`` applied to the loaded checkpoint dict."""
    data = torch.load(source, map_location="cpu", weights_only=False)
    change(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, target)
    return target


def nan_weights(data: dict) -> None:
    first = next(iter(data["network_weights"].values()))
    first.view(-1)[:5] = float("nan")


def collapsed_scaler(data: dict) -> None:
    """A GradScaler state after ~144 skipped steps from 65536: 2^16 * 0.5^144 = 2^-128, whose fp32 reciprocal is inf."""
    data["grad_scaler_state"] = {"scale": 2.9e-39, "growth_factor": 2.0, "backoff_factor": 0.5,
                                 "growth_interval": 2000, "_growth_tracker": 0}


def nan_momentum(data: dict) -> None:
    state = data["optimizer_state"]["state"]
    buffer = next(v["momentum_buffer"] for v in state.values() if v.get("momentum_buffer") is not None)
    buffer.view(-1)[0] = float("inf")
