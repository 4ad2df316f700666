"""Which torch device a command runs on: CUDA when present and asked for (auto), else the CPU."""
from __future__ import annotations

import torch

from .errors import GeodiagError


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GeodiagError("--device cuda asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise GeodiagError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name
