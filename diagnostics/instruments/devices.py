"""Where and in which precision a command runs: the device (CUDA when present and asked for, else the CPU), the
autocast precisions. (The fp16 limits nnU-Net's CUDA training runs into live in ``geodiag.reports.schema``,
which the reports quote too.)"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .errors import ArgumentError, GeodiagError

# The precision vocabulary: autocast dtype per precision name; fp32 runs without autocast.
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("{device} cuda asked for, but torch sees no CUDA device", "device")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise GeodiagError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name


def parse_precisions(names: Sequence[str]) -> list[str]:
    """Validated precision names; a GeodiagError names the first unknown one."""
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise GeodiagError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    return list(names)
