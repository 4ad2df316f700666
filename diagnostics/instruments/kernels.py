"""The compiled CPU kernels (``_cpu_kernels.c``) where a build of this source is installed, else None.

Why a module of its own: the histogram and the provenance checks both use them, and both fall back to torch ops
without them; this is the one place that loads them (only a build whose ``VERSION`` is this source's: a stale one
is not used, and ``geodiag doctor`` says why), that checks what C cannot see before a call (every buffer on the
CPU: a CUDA or meta tensor's address is no host memory), and that says which path is in use. The C side checks
the rest (item types, contiguity, lengths, the tables' indexes).
"""
from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator, Optional

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


def _require_cpu(**buffers: torch.Tensor) -> None:
    for name, t in buffers.items():
        if t.device.type != "cpu":
            raise ValueError(f"the CPU kernel cannot use {name} on {t.device}: its buffers must all be on the CPU")


def count_fp32(values: torch.Tensor, tables: object, counts: torch.Tensor, moments: torch.Tensor,
               extrema: torch.Tensor) -> None:
    """Count contiguous fp32 ``values`` into a LogHistogram's buffers (``tables`` from ``compiled.make_tables``),
    in pieces of at most ``compiled.MAX_VALUES`` (its per-lane counts are 32-bit)."""
    _require_cpu(values=values, counts=counts, moments=moments, extrema=extrema)
    flat = values.detach().reshape(-1).numpy()
    outputs = counts.numpy(), moments.numpy(), extrema.numpy()
    piece = compiled.MAX_VALUES
    for start in range(0, flat.size, piece):
        compiled.count_fp32(flat[start:start + piece], tables, *outputs)


def min_max(t: torch.Tensor) -> Optional[tuple[float, float]]:
    """(min, max) of an fp32 CPU tensor as floats, both NaN if it holds a NaN, read by the kernel (a strided view
    is copied first). None for an empty tensor (no extrema, nothing non-finite), and for other dtypes, other
    devices or without the kernel (then use ``torch.aminmax``)."""
    if compiled is None or t.dtype != torch.float32 or not t.is_cpu:
        return None
    t = t.contiguous()
    return compiled.min_max_fp32((t.detach() if t.requires_grad else t).numpy())
