"""The compiled CPU kernels (``_cpu_kernels.c``), or None where the install found no C compiler.

Why a module of its own: the histogram and the provenance checks both use them, and both fall back to torch ops
when they are missing; this is the one place that knows whether they were built (``geodiag doctor`` reports it).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    from . import _cpu_kernels as compiled
except ImportError:  # built without a C compiler
    compiled = None


def min_max(t: torch.Tensor) -> Optional[tuple[float, float]]:
    """(min, max) of an fp32 CPU tensor as floats, both NaN if it holds a NaN, read by the kernel (a strided view
    is copied first); None for other tensors or without the kernels (then use ``torch.aminmax``)."""
    if compiled is None or t.dtype != torch.float32 or not t.is_cpu:
        return None
    t = t.contiguous()
    return compiled.min_max_fp32(t.data_ptr(), t.numel())


def state() -> str:
    """One line for ``geodiag doctor``."""
    if compiled is None:
        return "not built (no C compiler at install): CPU histograms and provenance checks take slower torch paths"
    return "compiled: CPU histograms and provenance checks read each value once"
