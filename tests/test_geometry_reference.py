"""GeometricLoss descriptors against geometry and against an independent fp64 numpy Sobel.

Two kinds of reference, named at each test: values from geometry (2 pi r, 4/pi, Ramanujan's ellipse perimeter,
4 pi r^2, the smoothing formula), with a tolerance for what digitising a shape into pixels does to them; and
``sobel_reference`` (numpy, fp64, written from the textbook definition), which the descriptors must equal to
rounding because it computes the same discrete quantity.
"""
import math

import pytest
import torch

from geodiag.losses import GeometricLoss
from shapes import ball, disk, ellipse, square
from sobel_reference import sobel_perimeter


def descriptors(mask: torch.Tensor, **kwargs) -> dict:
    """Every tapped intermediate of a single-channel mask, detached."""
    loss = GeometricLoss(classes=(0,), reference="prior", **kwargs)
    seen = {}
    with loss.register_tap(lambda name, t: seen.__setitem__(name, t.detach())):
        loss(mask)
    return seen


# eps = 0: the exact Sobel perimeter (forward only; a bare sqrt is NaN only in backward at s = 0).
EXACT = dict(stabilizer="shifted", eps=0.0)

# A binary shape's boundary is a staircase: the Sobel perimeter reads it longer than the smooth curve (a straight
# axis-aligned edge is read exactly, see the square below; oblique and curved runs of steps add length). Relative
# excess allowed over the geometric length for binary shapes: at most this much, never shorter.
STAIRCASE_EXCESS = 0.04


def _compactness(perimeter: float, area: float) -> float:
    return perimeter**2 / (4 * math.pi * area)


@pytest.mark.parametrize("radius", [5, 10, 20, 40, 80])
def test_binary_disk_perimeter_is_two_pi_r_within_the_staircase_excess(radius):
    mask = disk(radius)
    d = descriptors(mask, **EXACT)
    # numpy reference: the same discrete quantity, equal to rounding.
    assert d["perimeter"].item() == pytest.approx(sobel_perimeter(mask[0, 0].numpy()), rel=1e-12)
    # geometry: 2 pi r, plus the staircase excess.
    assert 1.0 <= d["perimeter"].item() / (2 * math.pi * radius) <= 1.0 + STAIRCASE_EXCESS
    assert d["compactness"].item() == pytest.approx(_compactness(d["perimeter"].item(), mask.sum().item()), rel=1e-12)


@pytest.mark.parametrize("centre", [(128.0, 128.0), (128.5, 127.25), (127.7, 128.9)])
def test_disk_compactness_is_stable_under_subpixel_offsets(centre):
    # geometry: a disk has compactness 1; the area is the pixel count, so the staircase excess counts twice.
    d = descriptors(disk(30, centre=centre), **EXACT)
    assert 1.0 <= d["compactness"].item() <= (1.0 + STAIRCASE_EXCESS) ** 2 * (1 + 0.01)


@pytest.mark.parametrize("radius,tau", [(20, 0.5), (40, 1.0), (80, 1.0), (30, 2.0)])
def test_soft_disk_perimeter_and_compactness_follow_the_smoothing_formula(radius, tau):
    # geometry: a sigmoid edge of width tau smooths the staircase away; the perimeter is 2 pi r within the
    # resolution of the Sobel kernel, and the soft area pi (r^2 + pi^2 tau^2 / 3) gives the compactness.
    d = descriptors(disk(radius, softness=tau), **EXACT)
    if tau <= 1:
        assert d["perimeter"].item() / (2 * math.pi * radius) == pytest.approx(1.0, abs=0.008)
    expected = 1.0 / (1.0 + math.pi**2 * tau**2 / (3 * radius**2))
    assert d["compactness"].item() == pytest.approx(expected, rel=0.004)


def test_axis_aligned_square_perimeter_is_the_hand_derived_sobel_sum():
    """geometry, exact: an axis-aligned binary square of side L (40 px here) under the normalised Sobel.

    Along a straight edge the pixels on both sides of the step each read |g| = 1/2: 1 per unit length, for the
    L - 2 columns of each side away from the corners. Each corner's 2 x 2 block reads sqrt2/8 (outside diagonal)
    + 2 sqrt10/8 (outside neighbours) + 3 sqrt2/8 (inside corner). So P = 4 (L - 2) + 4 (sqrt2/2 + sqrt10/4)
    and the compactness is P^2 / (4 pi L^2), which tends to 4/pi as L grows.
    """
    side = 40
    mask = square(side)
    assert mask.sum().item() == side * side
    d = descriptors(mask, **EXACT)
    perimeter = 4 * (side - 2) + 4 * (math.sqrt(2) / 2 + math.sqrt(10) / 4)
    assert d["perimeter"].item() == pytest.approx(perimeter, rel=1e-12)
    assert d["compactness"].item() == pytest.approx(_compactness(perimeter, side * side), rel=1e-12)


@pytest.mark.parametrize("angle", [0.175, 0.262, math.pi / 4])
def test_rotated_square_matches_numpy_and_four_over_pi(angle):
    mask = square(40, angle=angle)
    d = descriptors(mask, **EXACT)
    # numpy reference: exact.
    assert d["perimeter"].item() == pytest.approx(sobel_perimeter(mask[0, 0].numpy()), rel=1e-12)
    # geometry: 4/pi; the corners lose up to 2.1 px of the 160 (derived above for angle 0) and oblique edges
    # gain the staircase excess, so the compactness lies within (1 - 2.1/160)^2 and (1 + excess)^2 of 4/pi.
    ratio = d["compactness"].item() / (4 / math.pi)
    assert (1 - 2.1 / 160) ** 2 * (1 - 0.01) <= ratio <= (1 + STAIRCASE_EXCESS) ** 2


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ramanujan's second approximation of an ellipse's perimeter (relative error below 1e-9 for a/b = 2)."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def test_ellipse_perimeter_matches_ramanujan_and_numpy():
    a, b = 40, 20
    mask = ellipse(a, b)
    d = descriptors(mask, **EXACT)
    # numpy reference: exact.
    assert d["perimeter"].item() == pytest.approx(sobel_perimeter(mask[0, 0].numpy()), rel=1e-12)
    # geometry: Ramanujan's perimeter with the staircase excess; compactness P^2 / (4 pi^2 a b) likewise,
    # the pixel-count area being within 1% of pi a b at these sizes.
    perimeter = ramanujan_perimeter(a, b)
    assert 1.0 <= d["perimeter"].item() / perimeter <= 1.0 + STAIRCASE_EXCESS
    assert mask.sum().item() == pytest.approx(math.pi * a * b, rel=0.01)
    ideal = perimeter**2 / (4 * math.pi * math.pi * a * b)
    assert 1.0 - 0.02 <= d["compactness"].item() / ideal <= (1.0 + STAIRCASE_EXCESS) ** 2 * 1.02


def test_ball_surface_is_four_pi_r_squared_and_matches_numpy():
    r = 14
    mask = ball(r)
    d = descriptors(mask, **EXACT)
    # numpy reference (3D Sobel, /32, replicate padding): exact.
    assert d["perimeter"].item() == pytest.approx(sobel_perimeter(mask[0, 0].numpy()), rel=1e-12)
    # geometry: 4 pi r^2 with the staircase excess; compactness S^3 / (36 pi V^2) = 1 for a ball, with the
    # excess cubed and the voxel-count volume within 1% of 4/3 pi r^3.
    assert 1.0 <= d["perimeter"].item() / (4 * math.pi * r**2) <= 1.0 + STAIRCASE_EXCESS
    assert mask.sum().item() == pytest.approx(4 / 3 * math.pi * r**3, rel=0.01)
    assert 1.0 - 0.02 <= d["compactness"].item() <= (1.0 + STAIRCASE_EXCESS) ** 3 * 1.02


@pytest.mark.parametrize("centre", [(128.0, 128.0), (128.3, 127.9), (128.5, 128.5)])
@pytest.mark.parametrize("radius", [5, 40])
def test_moments_equal_the_pixel_coordinate_covariance(radius, centre):
    mask = disk(radius, centre=centre)
    ys, xs = torch.nonzero(mask[0, 0], as_tuple=True)
    reference = torch.cov(torch.stack([ys, xs]).double(), correction=0)
    moments = descriptors(mask, compactness_weight=0)["aspect.moments"][0, 0] * 256**2
    assert torch.allclose(moments, reference, rtol=1e-9, atol=1e-9)


def test_large_disk_variance_is_r_squared_over_four():
    r = 40
    moments = descriptors(disk(r), compactness_weight=0)["aspect.moments"][0, 0] * 256**2
    assert moments.diagonal() == pytest.approx([r * r / 4] * 2, rel=0.005)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("angle", [0.0, 0.5])
def test_ellipse_anisotropy_matches_axis_ratio(k, angle):
    d = descriptors(ellipse(60, 60 / k, angle=angle), compactness_weight=0)
    assert d["aspect"].item() == pytest.approx(((k * k - 1) / (k * k + 1)) ** 2, rel=0.003)


def test_disk_anisotropy_is_zero():
    assert descriptors(disk(50), compactness_weight=0)["aspect"].item() < 1e-4


@pytest.mark.parametrize("k", [2, 4])
def test_seed_formula_elongation_is_the_axis_ratio(k):
    d = descriptors(ellipse(60, 60 / k), compactness_weight=0, aspect_formula="seed", stabilizer="clamp", eps=1e-4)
    assert d["aspect"].item() == pytest.approx(k, rel=0.003)


def test_prolate_spheroid_anisotropy_matches_continuous_eigenvalues():
    a, b = 16.0, 8.0  # variances of a solid ellipsoid are semi_axis^2 / 5
    lam = torch.tensor([a * a, b * b, b * b], dtype=torch.float64) / 5
    expected = 1.5 * ((lam - lam.mean()) ** 2).sum() / lam.sum() ** 2
    d = descriptors(ball(0, n=48, semi_axes=(a, b, b)), compactness_weight=0)
    assert d["aspect"].item() == pytest.approx(expected.item(), rel=0.01)


@pytest.mark.parametrize("stabilizer,per_pixel", [("clamp", 0.1), ("additive", 0.1), ("shifted", 0.0)])
def test_flat_image_perimeter_is_the_stabilisers_background_bias(stabilizer, per_pixel):
    n = 64
    flat = torch.full((1, 1, n, n), 0.5, dtype=torch.float64)
    d = descriptors(flat, stabilizer=stabilizer, eps=1e-2, aspect_weight=0)
    assert d["perimeter"].item() == pytest.approx(n * n * per_pixel, abs=1e-9)
