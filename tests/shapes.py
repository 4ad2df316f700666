"""Test shapes drawn from geometry: disks, ellipses, squares, balls, as masks or soft probabilities."""
from __future__ import annotations

import math

import torch


def _grid(n: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(n, dtype=dtype)
    return torch.meshgrid(coords, coords, indexing="ij")


def disk(radius: float, n: int = 256, centre=(128.3, 127.9), softness: float = 0.0) -> torch.Tensor:
    """[1, 1, n, n] binary disk, or sigmoid((r - d) / softness) when softness > 0."""
    y, x = _grid(n)
    d = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2).sqrt()
    mask = torch.sigmoid((radius - d) / softness) if softness > 0 else (d <= radius).double()
    return mask[None, None]


def ellipse(a: float, b: float, n: int = 256, angle: float = 0.0, centre=(128.3, 127.8)) -> torch.Tensor:
    """[1, 1, n, n] binary ellipse with semi-axes a (along the rotated x axis) and b."""
    y, x = _grid(n)
    c, s = math.cos(angle), math.sin(angle)
    u = (x - centre[0]) * c + (y - centre[1]) * s
    v = -(x - centre[0]) * s + (y - centre[1]) * c
    return ((u / a) ** 2 + (v / b) ** 2 <= 1).double()[None, None]


def square(side: float, n: int = 256, angle: float = 0.0, centre=(128.3, 127.8)) -> torch.Tensor:
    """[1, 1, n, n] binary square of the given side, rotated by angle."""
    y, x = _grid(n)
    c, s = math.cos(angle), math.sin(angle)
    u = (x - centre[0]) * c + (y - centre[1]) * s
    v = -(x - centre[0]) * s + (y - centre[1]) * c
    return ((u.abs() <= side / 2) & (v.abs() <= side / 2)).double()[None, None]


def ball(radius: float, n: int = 48, centre=(24.2, 23.9, 24.1), semi_axes=None) -> torch.Tensor:
    """[1, 1, n, n, n] binary ball (or axis-aligned ellipsoid with semi_axes (z, y, x))."""
    coords = torch.arange(n, dtype=torch.float64)
    z, y, x = torch.meshgrid(coords, coords, coords, indexing="ij")
    az, ay, ax = semi_axes or (radius, radius, radius)
    inside = ((z - centre[0]) / az) ** 2 + ((y - centre[1]) / ay) ** 2 + ((x - centre[2]) / ax) ** 2 <= 1
    return inside.double()[None, None]


def two_class(foreground: torch.Tensor) -> torch.Tensor:
    """[B, 2, ...] probabilities (background, foreground) from a [B, 1, ...] foreground."""
    return torch.cat([1 - foreground, foreground], dim=1)


def logits_from(foreground: torch.Tensor, scale: float = 30.0) -> torch.Tensor:
    """[B, 2, ...] logits whose softmax is saturated towards the given binary foreground."""
    signed = scale * (2 * foreground - 1)
    return torch.cat([-signed / 2, signed / 2], dim=1)
