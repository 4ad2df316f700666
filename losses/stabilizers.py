"""The sqrt stabilisers that keep d sqrt(s)/ds finite at s = 0, selectable by name.

- ``clamp``:    sqrt(clamp(s, min=eps))         the seed's V2.3 / V2.4; zero gradient for s < eps,
                                                and a bias of sqrt(eps) per flat pixel.
- ``additive``: sqrt(s + eps)                   gradient everywhere, same sqrt(eps) bias per flat pixel.
- ``shifted``:  sqrt(s + eps) - sqrt(eps)       gradient everywhere and zero on flat regions: no bias
                                                from the background, so a larger eps is cheap.
All three bound the local derivative by 1/(2 sqrt(eps)). With eps = 0, ``additive`` and ``shifted`` are a
bare sqrt, NaN in backward at s = 0 (kept on purpose: it is the failure the diagnostics must find), while
``clamp`` stays finite there: its backward is where(s > eps, grad, 0), which drops sqrt's inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STABILIZERS = ("clamp", "additive", "shifted")


@dataclass(frozen=True)
class SqrtStabilizer:
    name: str = "shifted"
    eps: float = 1e-10

    def __post_init__(self) -> None:
        if self.name not in STABILIZERS:
            raise ValueError(f"unknown stabilizer {self.name!r}; choose one of {', '.join(STABILIZERS)}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")

    def sqrt_input(self, s: torch.Tensor) -> torch.Tensor:
        """What the sqrt is applied to."""
        if self.name == "clamp":
            return torch.clamp(s, min=self.eps)
        return s + self.eps

    def finish(self, root: torch.Tensor) -> torch.Tensor:
        """The stabilised magnitude from the sqrt's output."""
        if self.name == "shifted":
            return root - math.sqrt(self.eps)
        return root

    def __str__(self) -> str:
        return f"{self.name}(eps={self.eps:g})"
