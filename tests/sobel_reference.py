"""An independent fp64 numpy Sobel, the reference the tests hold geodiag's torch implementation to.

Written from the textbook definition, not from losses/geometry.py: the separable kernel (-1, 0, 1) along the
derivative's axis and (1, 2, 1) across the others, applied as a cross-correlation after padding the image by
one pixel.
"""
from __future__ import annotations

import numpy as np


def sobel_squared_magnitude(image: np.ndarray, raw: bool, padding: str) -> np.ndarray:
    """s = sum over axes of the squared Sobel derivative of an n-D image.

    ``raw`` keeps the kernel's gain (2 * 4^(n-1): 8 in 2D, the seed's), otherwise divides by it so a unit ramp
    has derivative 1. ``padding`` is numpy's pad mode: "edge" (replicate) or "constant" (zeros).
    """
    image = np.asarray(image, dtype=np.float64)
    padded = np.pad(image, 1, mode=padding)
    ndim = image.ndim
    gain = 1.0 if raw else 2.0 * 4.0 ** (ndim - 1)
    total = np.zeros_like(image)
    for axis in range(ndim):
        derivative = padded
        for other in range(ndim):
            lo = [slice(None)] * ndim
            mid = [slice(None)] * ndim
            hi = [slice(None)] * ndim
            lo[other], mid[other], hi[other] = slice(0, -2), slice(1, -1), slice(2, None)
            if other == axis:
                derivative = derivative[tuple(hi)] - derivative[tuple(lo)]
            else:
                derivative = derivative[tuple(lo)] + 2.0 * derivative[tuple(mid)] + derivative[tuple(hi)]
        total += (derivative / gain) ** 2
    return total


def sobel_perimeter(image: np.ndarray) -> float:
    """The normalised, replicate-padded Sobel perimeter (2D) or surface (3D) with an exact sqrt."""
    return float(np.sqrt(sobel_squared_magnitude(image, raw=False, padding="edge")).sum())
