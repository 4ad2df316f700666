"""The local derivative |d out / d x| of a risky op, from the input x and output y the automatic taps held.

Why apart from the taps: this is the maths of each op (1/(2 sqrt x) for sqrt, |a|/b^2 for a/b, 1/|x| for log...),
which the histograms of the taps only carry; the taps themselves are about where and when to measure.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_UNARY = {  # |d out / d x| from the input x and the output y, in fp32 or fp64
    "sqrt": lambda x, y: 0.5 / y.abs(),
    "rsqrt": lambda x, y: 0.5 * y.abs() ** 3,
    "reciprocal": lambda x, y: y * y,
    "log": lambda x, y: 1.0 / x.abs(),  # natural log; log2 / log10 differ by a constant factor
    "log1p": lambda x, y: 1.0 / (1.0 + x).abs(),
    "exp": lambda x, y: y.abs(),
    "acos": lambda x, y: 1.0 / (1.0 - x * x).abs().sqrt(),
    "asin": lambda x, y: 1.0 / (1.0 - x * x).abs().sqrt(),
}


def local_derivative(op: str, x: torch.Tensor, y: torch.Tensor,
                     exponents: Sequence[tuple[int, Optional[float]]] = ()) -> Optional[torch.Tensor]:
    """|d y / d x| element by element, None when the op has none here. ``x`` is the watched input (for a / b, b),
    flattened like ``y``; ``exponents`` gives a pow's (elements, exponent) per call, in the order of x."""
    if x.numel() != y.numel():
        return None
    if op in _UNARY:
        return _UNARY[op](x, y)
    if op == "div":            # y = a / b: |dy/db| = |a| / b^2 = |y / b|
        return (y / x).abs()
    if op == "pow" and exponents and all(e is not None for _, e in exponents):
        exponent = torch.cat([torch.full((n,), e, dtype=x.dtype, device=x.device) for n, e in exponents])
        return (exponent * x.abs() ** (exponent - 1)).abs()
    return None
