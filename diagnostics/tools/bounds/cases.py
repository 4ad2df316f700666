"""The fixed inputs of check-bounds: each case builds logits and a target label map from a seed, on any device."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from ...instruments.errors import GeodiagError


@dataclass(frozen=True)
class Case:
    """A named input: builds fp32 logits [B, 2, *S] and an int64 label map [B, 1, *S] from geometry."""

    name: str
    description: str
    build: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The case's tensors on ``device``; seeded from the name, so every run sees the same numbers."""
        generator = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        logits, target = self.build(generator)
        return logits.to(device), target.to(device)


def _coords(shape: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))


def _ellipsoid_sdf(shape: Sequence[int], centre: Sequence[float], semi_axes: Sequence[float]) -> torch.Tensor:
    """Approximate signed distance (positive inside) to an axis-aligned ellipse or ellipsoid, in pixels."""
    grid = _coords(shape)
    rho = torch.sqrt(sum(((x - c) / a) ** 2 for x, c, a in zip(grid, centre, semi_axes)))
    return (1.0 - rho) * min(semi_axes)


def _disk_sdf(shape: Sequence[int], centre: Sequence[float], radius: float) -> torch.Tensor:
    return _ellipsoid_sdf(shape, centre, [radius] * len(shape))


def _logits(margin: torch.Tensor) -> torch.Tensor:
    """[B, 2, *S] logits (0, margin): softmax gives the foreground sigmoid(margin)."""
    return torch.stack([torch.zeros_like(margin), margin], dim=1)


def _edge_margin(sdf: torch.Tensor, limit: float = 8.0) -> torch.Tensor:
    """A confident prediction with a one-pixel soft edge."""
    return (2.0 * sdf).clamp(-limit, limit)


def _labels(sdf: torch.Tensor) -> torch.Tensor:
    return (sdf >= 0).long().unsqueeze(1)


def _uncertain_margin(sdf: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Switch-on predictions: a faint shape under logit noise, tuned so the Sobel responses are noise-dominated.

    The noise is set so that the share of pixels whose s lies below 1e-2 and 1e-4 matches what the seed reports
    at its switch-on (28.3% and 0.3%), with s in the seed's units: raw Sobel, zero padding (the ``v2.3`` preset's
    s, 64x the normalised s). Pure noise of probability variance v gives raw Sobel derivatives of variance 12 v
    each, so s is close to a chi-squared with 2 degrees of freedom, P(s < t) = 1 - exp(-t / mean s): the seed's
    two shares both correspond to a mean s of about 0.03. tests/test_bounds.py checks the shares.
    """
    return 0.3 * torch.sign(sdf) + 0.14 * torch.randn(sdf.shape, generator=generator)


def _batch(*maps: torch.Tensor) -> torch.Tensor:
    return torch.stack(maps)


def _empty(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sdf = torch.full((2, 64, 64), -10.0)
    return _logits(_edge_margin(sdf)), _labels(sdf)


def _full(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sdf = torch.full((2, 64, 64), 10.0)
    return _logits(_edge_margin(sdf)), _labels(sdf)


def _single_pixel(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sdf = torch.full((2, 64, 64), -10.0)
    sdf[0, 31, 31] = sdf[1, 0, 63] = 10.0  # one in the interior, one in a corner (replicate padding)
    return _logits(_edge_margin(sdf)), _labels(sdf)


def _tiny_disk(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _batch(_disk_sdf((64, 64), (31.3, 32.6), 3.0), _disk_sdf((64, 64), (10.5, 50.2), 2.0))
    target = _batch(_ellipsoid_sdf((64, 64), (31.3, 32.6), (4.0, 2.5)), _disk_sdf((64, 64), (10.5, 50.2), 3.0))
    return _logits(_edge_margin(pred)), _labels(target)


def _large_disk(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _disk_sdf((256, 256), (128.3, 127.6), 100.0).unsqueeze(0)
    target = _ellipsoid_sdf((256, 256), (128.3, 127.6), (110.0, 80.0)).unsqueeze(0)
    return _logits(_edge_margin(pred)), _labels(target)


def _disks_2to5(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    preds, targets = [], []
    for _ in range(2):
        count = int(torch.randint(2, 6, (1,), generator=g))
        centres = (torch.rand(count, 2, generator=g) * 88 + 20).tolist()
        radii = (torch.rand(count, generator=g) * 10 + 6).tolist()
        preds.append(torch.stack([_disk_sdf((128, 128), c, r) for c, r in zip(centres, radii)]).amax(0))
        targets.append(torch.stack([_ellipsoid_sdf((128, 128), c, (r * 1.3, r / 1.3))
                                    for c, r in zip(centres, radii)]).amax(0))
    return _logits(_edge_margin(_batch(*preds))), _labels(_batch(*targets))


def _ring(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    outer = _disk_sdf((96, 96), (47.6, 48.2), 30.0)
    ring = torch.minimum(outer, -_disk_sdf((96, 96), (47.6, 48.2), 15.0))
    return _logits(_edge_margin(ring.unsqueeze(0))), _labels(outer.unsqueeze(0))


def _noise(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = _disk_sdf((64, 64), (32.2, 31.7), 16.0).expand(2, 64, 64)
    return _logits(3.0 * torch.randn((2, 64, 64), generator=g)), _labels(target)


def _uniform_half(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = _disk_sdf((64, 64), (32.2, 31.7), 16.0).expand(2, 64, 64)
    return _logits(torch.zeros(2, 64, 64)), _labels(target)


def _saturated(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _disk_sdf((64, 64), (32.2, 31.7), 16.0).expand(2, 64, 64)
    target = _ellipsoid_sdf((64, 64), (32.2, 31.7), (20.0, 12.0)).expand(2, 64, 64)
    return _logits(30.0 * torch.sign(pred)), _labels(target)


def _uncertain(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sdf = _disk_sdf((128, 128), (64.3, 63.8), 32.0).expand(2, 128, 128)
    return _logits(_uncertain_margin(sdf, g)), _labels(sdf)


def _large_1024(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sdf = _disk_sdf((1024, 1024), (512.3, 511.6), 256.0).unsqueeze(0)
    return _logits(_uncertain_margin(sdf, g)), _labels(sdf)


def _ball_3d(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _disk_sdf((40, 40, 40), (19.7, 20.2, 19.9), 12.0).unsqueeze(0)
    target = _ellipsoid_sdf((40, 40, 40), (19.7, 20.2, 19.9), (15.0, 12.0, 9.0)).unsqueeze(0)
    return _logits(_edge_margin(pred)), _labels(target)


CASES: dict[str, Case] = {case.name: case for case in (
    Case("empty", "2 x 64^2, confident background, empty target", _empty),
    Case("full", "2 x 64^2, confident foreground everywhere", _full),
    Case("single_pixel", "2 x 64^2, one foreground pixel (interior; image corner)", _single_pixel),
    Case("tiny_disk", "2 x 64^2, disks r = 3 and 2 against slightly larger targets", _tiny_disk),
    Case("large_disk", "256^2, disk r = 100 against an ellipse 110 x 80", _large_disk),
    Case("disks_2to5", "2 x 128^2, 2-5 disks r = 6-16 against ellipses", _disks_2to5),
    Case("ring", "96^2, annulus r = 15-30 against the filled disk", _ring),
    Case("noise", "2 x 64^2, logits N(0, 3^2) against a disk", _noise),
    Case("uniform_half", "2 x 64^2, every probability 0.5", _uniform_half),
    Case("saturated", "2 x 64^2, +-30 logits of a disk against an ellipse", _saturated),
    Case("uncertain", "2 x 128^2, switch-on predictions: noise-dominated Sobel responses", _uncertain),
    Case("large_1024", "1024^2, switch-on predictions over a disk r = 256", _large_1024),
    Case("ball_3d", "40^3, ball r = 12 against an ellipsoid 15 x 12 x 9", _ball_3d),
)}


def select_cases(names: Optional[Iterable[str]] = None) -> list[Case]:
    """The named cases (all when ``names`` is None), with a clear error for an unknown name."""
    return [CASES[name] for name in _validated(names, CASES, "case")]


def _validated(names: Optional[Iterable[str]], known: Mapping, what: str) -> list[str]:
    if names is None:
        return list(known)
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GeodiagError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if not names:
        raise GeodiagError(f"no {what} selected")
    return names
