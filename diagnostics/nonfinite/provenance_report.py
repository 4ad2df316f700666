"""What ``NonFiniteProvenance`` reports about the op it blames: the op and its context (``ProvenanceReport``), and
what is known about each tensor that went in or came out (``TensorSummary``), with the text a user reads.

Kept apart from the dispatch mode that finds the op: the replay's results and first_nonfinite.json read these
reports without ever running the mode.
"""
from __future__ import annotations

import linecache
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TensorSummary:
    """What is known about one input or output of the blamed op; counts are None when its values were freed."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    origin: str
    max_abs_finite: Optional[float] = None
    nan: Optional[int] = None
    posinf: Optional[int] = None
    neginf: Optional[int] = None

    @property
    def dtype_max(self) -> float:
        return torch.finfo(self.dtype).max

    @property
    def finite(self) -> Optional[bool]:
        if self.nan is None:
            return None
        return self.nan + self.posinf + self.neginf == 0

    def describe(self) -> str:
        text = f"{str(self.dtype).replace('torch.', '')}{list(self.shape)}"
        if self.nan is not None and not self.finite:
            text += f" with {self.nan} NaN, {self.posinf} +Inf, {self.neginf} -Inf"
        if self.max_abs_finite is not None:
            text += f", max abs finite {self.max_abs_finite:.3g} vs {_dtype_name(self.dtype)} max {self.dtype_max:.3g}"
        if self.origin:
            text += f" ({self.origin})"
        return text


@dataclass(frozen=True)
class ProvenanceReport:
    """The op that produced the first non-finite value of a step, with where it was and what went in and out.

    ``produced`` is False when no op of the step produced one and this is the first op that received NaN/Inf
    from outside the step (the batch, the weights): then the inputs say which.
    """

    step: int
    phase: str
    produced: bool
    op: str
    node: Optional[str]
    forward_op: Optional[str]
    module: Optional[str]
    tap: Optional[str]
    source: Optional[str]
    inputs: tuple[TensorSummary, ...]
    outputs: tuple[TensorSummary, ...]

    @property
    def message(self) -> str:
        """One human-readable paragraph."""
        where = []
        if self.node:
            where.append(f"autograd node {self.node}" + (f" of forward {self.forward_op}" if self.forward_op else ""))
        if self.module:
            where.append(f"module {self.module}")
        if self.tap:
            where.append(f"loss tap context {self.tap!r}")
        if self.source:
            where.append(f"source {self.source}")
        what = ("produced the first non-finite value from finite inputs" if self.produced else
                "received NaN/Inf from outside the step (no op of the step produced one)")
        return (f"Step {self.step}, {self.phase}: {self.op}" + (f" [{'; '.join(where)}]" if where else "")
                + f" {what}. Output " + "; ".join(o.describe() for o in self.outputs)
                + ". Inputs: " + ("; ".join(i.describe() for i in self.inputs) or "none") + ".")

    def __str__(self) -> str:
        return self.message


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def summarize(t: torch.Tensor, origin: str) -> TensorSummary:
    """Counts and max abs finite value of a live tensor (failure path only: a few syncs are fine here)."""
    with torch.no_grad():
        finite = torch.isfinite(t)
        magnitude = torch.where(finite, t.abs(), torch.zeros((), dtype=t.dtype, device=t.device))
        stats = torch.stack([
            torch.isnan(t).sum().double(), torch.isposinf(t).sum().double(), torch.isneginf(t).sum().double(),
            finite.any().double(), magnitude.max().double(),
        ]).tolist()
    nan, posinf, neginf, any_finite, max_abs = stats
    return TensorSummary(t.dtype, tuple(t.shape), origin, max_abs_finite=max_abs if any_finite else None,
                         nan=int(nan), posinf=int(posinf), neginf=int(neginf))


def source_line(code, line: Optional[int]) -> Optional[str]:
    if code is None:
        return None
    text = linecache.getline(code.co_filename, line).strip()
    return f"{code.co_filename}:{line} in {code.co_name}: {text}"
