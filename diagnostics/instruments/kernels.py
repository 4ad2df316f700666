"""The compiled CPU kernels (``_cpu_kernels.c``) where a build of this source is installed, else None.

Why a module of its own: the histogram and the provenance checks both use them, and both fall back to torch ops
without them; this is the one place that loads them (only a build whose ``VERSION`` is this source's: a stale one
is not used, and ``geodiag doctor`` says why), that checks what C cannot see before a call (the values on the CPU;
the histogram's buffers arrive as numpy views, host memory by construction), and that says which path is in use.
The C side checks the rest (item types, contiguity, lengths, the tables' indexes).
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator, Optional

import numpy as np
import torch

# GEODIAG_KERNEL_VERSION in _cpu_kernels.c (tests/test_cpu_kernels.py holds the two equal): bump both with any change
# there, so that a build left over from an older source is not loaded.
KERNEL_VERSION = 2
_TORCH_PATHS = "CPU histograms and provenance checks take slower torch paths"


def load(expected: int = KERNEL_VERSION) -> tuple[Optional[ModuleType], str]:
    """The compiled module and the line ``geodiag doctor`` prints; None and the reason where there is none built,
    or only one built from another version of the source."""
    try:
        from . import _cpu_kernels as module
    except ImportError:
        return None, f"not built (no C compiler at install): {_TORCH_PATHS}"
    built = getattr(module, "VERSION", None)
    if built != expected:
        return None, (f"not built from this source (the compiled module is version {built}, _cpu_kernels.c version "
                      f"{expected}): {_TORCH_PATHS}; rebuild with `pip install -e .` (or `make install`)")
    return module, f"compiled (version {built}): CPU histograms and provenance checks read each value once"


compiled, _state = load()


def state() -> str:
    """One line for ``geodiag doctor``: which path is in use, and why."""
    return _state


@contextlib.contextmanager
def unused() -> Iterator[None]:
    """The torch paths inside the block even where the kernels are built: what ``geodiag bench`` compares them to."""
    global compiled
    kept, compiled = compiled, None
    try:
        yield
    finally:
        compiled = kept


def count_fp32(values: torch.Tensor, tables: object, counts: np.ndarray, moments: np.ndarray,
               extrema: np.ndarray) -> None:
    """Count fp32 CPU ``values`` (``tables`` from ``compiled.make_tables``) into a LogHistogram's buffers, given as
    numpy views of its CPU tensors (host memory by construction: a CUDA or meta tensor has none), in pieces of at
    most ``compiled.MAX_VALUES`` (its per-lane counts are 32-bit)."""
    if not values.is_cpu:
        raise ValueError(f"the CPU kernel cannot read values on {values.device}: its buffers must all be on the CPU")
    array = (values.detach() if values.requires_grad else values).numpy()
    piece = compiled.MAX_VALUES
    if array.size <= piece:
        compiled.count_fp32(array, tables, counts, moments, extrema)
        return
    flat = array.reshape(-1)
    for start in range(0, flat.size, piece):
        compiled.count_fp32(flat[start:start + piece], tables, counts, moments, extrema)


def min_max(t: torch.Tensor) -> Optional[tuple[float, float]]:
    """(min, max) of an fp32 CPU tensor as floats, both NaN if it holds a NaN, read by the kernel (a strided view
    is copied first). None for an empty tensor (no extrema, nothing non-finite), and for other dtypes, other
    devices or without the kernel (then use ``torch.aminmax``)."""
    if compiled is None or t.dtype != torch.float32 or not t.is_cpu:
        return None
    if t.requires_grad or not t.is_contiguous():
        t = t.detach().contiguous()
    return compiled.min_max_fp32(t.numpy())
