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


@dataclass(frozen=True)
class StabilizersPerImage:
    """Image ``i`` of a batch under ``stabilizers[i]``, as ``GeometricLoss.stabilizer``: a sweep evaluates every
    setting on copies of one prediction in one batched call. Each image gets the values and the gradient its own
    stabiliser gives it (the same fp32 eps, sqrt(eps) and clamp rule, elementwise)."""

    stabilizers: tuple[SqrtStabilizer, ...]

    def _per_image(self, values: list, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.stabilizers):
            raise ValueError(f"{len(self.stabilizers)} stabilisers for a batch of {like.shape[0]}")
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))

    def sqrt_input(self, s: torch.Tensor) -> torch.Tensor:
        eps = self._per_image([st.eps for st in self.stabilizers], s)
        clamped = self._per_image([float(st.name == "clamp") for st in self.stabilizers], s) > 0
        floored = torch.clamp(s, min=eps)
        # A clamp at a tensor bound passes the gradient at s == eps, one at a number does not (at eps = 0 that is
        # sqrt's inf): the gradient goes through only where s > eps, as for a single stabiliser.
        floored = torch.where(s > eps, floored, floored.detach())
        return torch.where(clamped, floored, s + eps)

    def finish(self, root: torch.Tensor) -> torch.Tensor:
        return root - self._per_image([math.sqrt(st.eps) if st.name == "shifted" else 0.0
                                       for st in self.stabilizers], root)

    def __str__(self) -> str:
        return "per image: " + ", ".join(map(str, self.stabilizers))
