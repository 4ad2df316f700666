"""Differentiable shape descriptors of soft masks, batched as [N, 1, *spatial] in 2D or 3D.

Everything here is elementwise products, sums and shifted slices: no einsum, matmul or convolution (the first two
run in fp16 under autocast; a one-channel 3x3 convolution takes oneDNN's slow path on the CPU once the batch is
large), no data-dependent control flow (no host sync).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F

_SMOOTH = (1.0, 2.0, 1.0)
_DIFF = (-1.0, 0.0, 1.0)

# How the Sobel derivative is taken:
# - "normalised": the kernel divided by its gain, so a unit ramp has gradient 1, with replicate padding, so a
#   constant map has gradient 0 up to the border. geodiag's own setting.
# - "seed": the raw kernel ([-1 0 1; -2 0 2; -1 0 1] in 2D) with zero padding, the seed's
#   F.conv2d(p, k, padding=1). Its s is gain^2 times the normalised s inside the image (64x in 2D) and the
#   perimeter gain times (8x); border pixels see a step down to 0. Every eps and every fraction of pixels
#   below an eps that the seed quotes is in these units.
SOBEL_FORMS = ("normalised", "seed")


def sobel_gain(form: str, ndim: int) -> float:
    """The factor between a Sobel form's derivative and the normalised one: 1, or the raw kernel's 8 (2D), 32 (3D)."""
    if form not in SOBEL_FORMS:
        raise ValueError(f"unknown sobel form {form!r}; choose one of {', '.join(SOBEL_FORMS)}")
    return 1.0 if form == "normalised" else 2.0 * 4.0 ** (ndim - 1)


def _filter(x: torch.Tensor, dim: int, taps: tuple[float, float, float]) -> torch.Tensor:
    """The 3-tap filter ``taps`` (``_DIFF`` or ``_SMOOTH``) along ``dim`` of a tensor padded by one there: the
    cross-correlation a x[i] + b x[i+1] + c x[i+2], as shifted slices (dim shrinks by 2)."""
    n = x.shape[dim] - 2
    before, middle, after = (x.narrow(dim, k, n) for k in range(3))
    if taps == _DIFF:
        return after - before
    return before + 2.0 * middle + after


def sobel_derivatives(p: torch.Tensor, form: str = "normalised") -> list[torch.Tensor]:
    """Sobel derivatives of one of ``SOBEL_FORMS``, one [N, 1, *S] map per axis of [N, 1, *S].

    The kernel is separable: the derivative along an axis is the difference along it of the map smoothed along
    every other axis, which is what the seed's ``F.conv2d(p, k, padding=1)`` computes, summed in another order.
    """
    ndim = p.dim() - 2
    scale = sobel_gain(form, ndim) / (2.0 * 4.0 ** (ndim - 1))  # the raw kernel's gain divided out, ``form``'s put in
    padded = F.pad(p, (1, 1) * ndim, mode="replicate" if form == "normalised" else "constant")
    derivatives = []
    for axis in range(ndim):
        d = padded
        for other in range(ndim):
            d = _filter(d, 2 + other, _DIFF if other == axis else _SMOOTH)
        derivatives.append(d if scale == 1.0 else d * scale)
    return derivatives


def grad_mag_squared(p: torch.Tensor, ndim: int, form: str = "normalised") -> torch.Tensor:
    """s = sum over axes of the squared Sobel derivative, per mask: [B, K, *S] -> [B, K, *S]."""
    lead, spatial = p.shape[:-ndim], p.shape[-ndim:]
    squares = [d.square() for d in sobel_derivatives(p.reshape(-1, 1, *spatial), form)]
    return sum(squares[1:], squares[0]).reshape(*lead, *spatial)


def spatial_sum(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum over the last ``ndim`` axes: areas, perimeters, moment sums."""
    return x.flatten(-ndim).sum(dim=-1)


def compactness(measure: torch.Tensor, size: torch.Tensor, ndim: int) -> torch.Tensor:
    """P^2 / (4 pi A) in 2D, S^3 / (36 pi V^2) in 3D: 1 for a disk or a ball.

    The size is floored at one pixel so an empty mask gives a finite value (the area ramp then weights it out).
    """
    size = size.clamp_min(1.0)
    if ndim == 2:
        return measure.square() / (4.0 * math.pi * size)
    return measure.pow(3) / (36.0 * math.pi * size.square())


def _coordinates(shape: tuple[int, ...], scale: float, device, dtype) -> list[torch.Tensor]:
    """One coordinate grid per spatial axis, broadcastable against [*S], multiplied by ``scale``."""
    grids = []
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        grids.append((torch.arange(n, device=device, dtype=dtype) * scale).view(view))
    return grids


def central_moments(p: torch.Tensor, size: torch.Tensor, ndim: int, normalized: bool = True) -> torch.Tensor:
    """Second central moments (covariance of each mask as a distribution): [B, K, *S] -> [B, K, ndim, ndim].

    Normalised coordinates divide pixel indices by the largest extent, so values stay O(1) and far from
    fp16's range; pixel units are kept for replaying the seed's formula. Two passes (mean first, then
    centred products) avoid the cancellation of E[x^2] - E[x]^2.
    """
    spatial = tuple(p.shape[-ndim:])
    scale = 1.0 / max(spatial) if normalized else 1.0
    size = size.clamp_min(1.0)
    expand = (...,) + (None,) * ndim
    centred = [c - (spatial_sum(p * c, ndim) / size)[expand]
               for c in _coordinates(spatial, scale, p.device, p.dtype)]
    weighted = [p * c for c in centred]
    # the upper triangle, mirrored: the matrix is exactly symmetric and ndim (ndim + 1) / 2 products are taken
    upper = {(a, b): spatial_sum(weighted[a] * centred[b], ndim) / size for a in range(ndim) for b in range(a, ndim)}
    rows = [torch.stack([upper[min(a, b), max(a, b)] for b in range(ndim)], dim=-1) for a in range(ndim)]
    return torch.stack(rows, dim=-2)


def anisotropy_discriminant(moments: torch.Tensor) -> torch.Tensor:
    """d/(d-1) * ||S - tr(S)/d I||_F^2, a sum of squares: (Sxx - Syy)^2 + 4 Sxy^2 in 2D.

    Equal to d/(d-1) * sum_i (lambda_i - mean lambda)^2, the eigenvalue spread, without computing
    eigenvalues: no cancellation (unlike tr^2 - 4 det), no eigen-solver (whose CUDA error check syncs).
    """
    ndim = moments.shape[-1]
    trace = torch.diagonal(moments, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(ndim, device=moments.device, dtype=moments.dtype)
    deviator = moments - trace[..., None, None] / ndim * eye
    return deviator.square().sum(dim=(-2, -1)) * (ndim / (ndim - 1))


def anisotropy(discriminant: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """disc / tr^2 in [0, 1]: 0 for a disk/ball, ((k^2-1)/(k^2+1))^2 for a 2D ellipse of axis ratio k."""
    trace = torch.diagonal(moments, dim1=-2, dim2=-1).sum(-1)
    return discriminant / trace.square().clamp_min(torch.finfo(trace.dtype).tiny)


def seed_discriminant(moments: torch.Tensor) -> torch.Tensor:
    """The seed's tr^2 - 4 det (2D): cancels to rounding noise of either sign for near-isotropic shapes."""
    sxx, syy, sxy = moments[..., 0, 0], moments[..., 1, 1], moments[..., 0, 1]
    trace = sxx + syy
    return trace.square() - 4.0 * (sxx * syy - sxy.square())


def seed_elongation(root: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """sqrt(lambda_max / lambda_min) from lambda = (tr +- sqrt(disc)) / 2, both floored at 1 px^2.

    Without the floor on lambda_max, an empty mask (tr = root = 0) puts the outer sqrt at its pole.
    """
    trace = moments[..., 0, 0] + moments[..., 1, 1]
    lam_max = ((trace + root) / 2.0).clamp_min(1.0)
    lam_min = ((trace - root) / 2.0).clamp_min(1.0)
    return torch.sqrt(lam_max / lam_min)
