"""What one forward and backward pass of a loss measures on a case: the loss, its gradient at the logits (largest,
L2, share of elements exactly zero), the perimeter gradient against its analytic bound, and for a user's loss the
share of each clamp's elements held at its bound; and the losses measured (built-in settings or a user's)."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from geodiag.losses import GeometricLoss, preset_kwargs
from geodiag.losses.geometry import sobel_gain
from geodiag.reports.schema import FP16_MAX, GRAD_SCALER_INITIAL_SCALE

from ...instruments.devices import PRECISIONS
from ...instruments.errors import GeodiagError
from ...nonfinite.autotaps import AutoTaps
from ...nonfinite.loss_spec import UserLoss
from .cases import _validated

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def perimeter_grad_bound(ndim: int) -> float:
    """Largest possible |dP/dp_j| for P = sum_i stab(|g_i|), g = normalised Sobel (/8 in 2D, /32 in 3D).

    Derivation: dP/dp_j = sum_i u_i . K(i - j), where u_i = d stab(|g|)/dg at pixel i has |u_i| <= 1 for
    every stabiliser (g / sqrt(max(s, eps)), g / sqrt(s + eps), or 0 below a clamp) and K(o) is the vector
    of the ndim Sobel kernel weights at offset o. By Cauchy-Schwarz |dP/dp_j| <= sum_o ||K(o)||_2, which is
    attained when every u_i points along K(i - j). With the weight (1, 2, 1) across an axis and (-1, 0, 1)
    along it, component a of K(o) is o_a * prod_{b != a} w(o_b) / norm:
      2D, norm 8: 4 corners sqrt(1 + 1), 4 edge neighbours 2   -> (4 sqrt2 + 8) / 8          = 1.70711
      3D, norm 32: 8 corners sqrt(3), 12 edges sqrt(2^2 + 2^2), 6 faces 4
                                                             -> (8 sqrt3 + 24 sqrt2 + 24) / 32 = 2.24367
    Replicate padding folds outside taps onto the border pixel, where the antisymmetric kernel partly
    cancels, and zero padding drops them, so border pixels stay below the interior bound (exact Jacobians: 2D corner 1.498, 3D corner
    1.883; tests/test_bounds.py recomputes both bounds from the Jacobian of an independent Sobel).
    """
    if ndim == 2:
        return (4.0 * math.sqrt(2.0) + 8.0) / 8.0
    if ndim == 3:
        return (8.0 * math.sqrt(3.0) + 24.0 * math.sqrt(2.0) + 24.0) / 32.0
    raise ValueError(f"no Sobel perimeter bound for {ndim}D")


# ---------------------------------------------------------------------------------------------- cases


# ---------------------------------------------------------------------------------------------- settings
SETTINGS: dict[str, dict] = {
    "production": preset_kwargs("production"),
    "v2.3": preset_kwargs("v2.3"),
    "v2.4": preset_kwargs("v2.4"),
    **{f"{name}-{eps:.0e}".replace("e-0", "e-"): dict(stabilizer=name, eps=eps)
       for name in ("shifted", "additive", "clamp") for eps in (1e-4, 1e-2)},
}


def builtin_losses(names: Optional[Iterable[str]] = None) -> dict[str, LossFn]:
    """GeometricLoss under each named setting (all of ``SETTINGS`` when ``names`` is None)."""
    return {name: GeometricLoss(**SETTINGS[name]) for name in _validated(names, SETTINGS, "setting")}


# ---------------------------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class Measurement:
    """What one forward and backward pass measured; non-finite values are counted, maxima taken over finite ones."""

    case: str
    setting: str
    precision: str
    loss: float
    loss_nonfinite: int
    grad_max: float
    grad_l2: float
    grad_nonfinite: int
    headroom_log2: float
    perimeter_grad_max: Optional[float]
    perimeter_bound: Optional[float]
    seconds: float
    zero_grad_fraction: float = math.nan
    # A user's loss: each clamp site (``file.py:LINE``, the file's name only) -> share of its elements at a bound.
    clamp_at_bound: Optional[dict[str, float]] = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.case, self.setting, self.precision


class _PerimeterProbe:
    """Keeps the live ``probabilities`` and ``perimeter`` tensors of a tappable loss for one forward pass."""

    NAMES = ("probabilities", "perimeter")

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    @classmethod
    def attach(cls, loss: LossFn) -> tuple[Optional["_PerimeterProbe"], contextlib.AbstractContextManager]:
        if not (hasattr(loss, "register_tap") and set(cls.NAMES) <= set(getattr(loss, "TAP_NAMES", ()))):
            return None, contextlib.nullcontext()
        probe = cls()
        return probe, loss.register_tap(probe, names=cls.NAMES)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor

    def grad_max(self) -> Optional[torch.Tensor]:
        """max |dP/dp| over every pixel (NaN if any is NaN), on the device; None if P was not computed."""
        if set(self.tensors) != set(self.NAMES) or not self.tensors["perimeter"].requires_grad:
            return None
        (grad,) = torch.autograd.grad(self.tensors["perimeter"].sum(), self.tensors["probabilities"],
                                      retain_graph=True)
        return grad.abs().amax()


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def site_key(site: str) -> str:
    """A site as the baseline keys it: the file's name and the line, so a baseline holds on another checkout."""
    path, _, line = site.rpartition(":")
    return f"{os.path.basename(path)}:{line}"


def _clamp_shares(taps: AutoTaps) -> dict[str, float]:
    """Each clamp site's share of elements held at a bound, in order of first call."""
    return {site_key(row["site"]): row["at_bound_fraction"] for row in taps.result().sites
            if row["op"] == "clamp" and row["at_bound_fraction"] is not None}


def measure(loss: LossFn, logits: torch.Tensor, target: torch.Tensor, precision: str,
            case: str = "", setting: str = "") -> Measurement:
    """One forward and backward pass of ``loss`` from ``logits`` under ``precision``; one host sync at the end
    (two for a user's loss, whose clamp sites are read back from its automatic taps).

    Under bf16/fp16 the logits are rounded to that dtype (a network's output under autocast) and the softmax
    is taken in fp32 (CUDA autocast's policy for softmax); the loss runs inside autocast.
    """
    start = time.perf_counter()
    dtype = PRECISIONS[precision]
    leaf = logits.detach().clone().requires_grad_(True)
    probe, tap = _PerimeterProbe.attach(loss.fn if isinstance(loss, UserLoss) else loss)
    taps = AutoTaps() if isinstance(loss, UserLoss) else None
    with tap, _autocast(leaf.device, dtype):
        network_output = leaf if dtype is None else leaf.to(dtype)
        if isinstance(loss, UserLoss) and loss.input_kind == "logits":
            value = taps.run(loss.call, network_output, target)
        else:
            probabilities = torch.softmax(network_output, dim=1, dtype=torch.float32)
            value = taps.run(loss.call, probabilities, target) if taps is not None else loss(probabilities, target)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise GeodiagError(f"the loss returned {shape}; check-bounds needs a scalar tensor (use reduction='mean')")
    value = value.reshape(())
    perimeter_max = probe.grad_max() if probe is not None else None
    if value.requires_grad:
        value.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    finite = torch.isfinite(grad)
    magnitude = torch.where(finite, grad, 0.0).abs().double()
    nan = torch.tensor(math.nan, dtype=torch.float64, device=leaf.device)
    stats = torch.stack([
        value.detach().double(), (~finite).sum().double(), magnitude.amax(), magnitude.square().sum().sqrt(),
        perimeter_max.double() if perimeter_max is not None else nan, (grad == 0).sum().double(),
    ]).tolist()
    loss_value, grad_nonfinite, grad_max, grad_l2, perimeter_value, zero_grad = stats
    ndim = logits.dim() - 2
    return Measurement(
        case=case, setting=setting, precision=precision,
        loss=loss_value, loss_nonfinite=int(not math.isfinite(loss_value)),
        grad_max=grad_max, grad_l2=grad_l2, grad_nonfinite=int(grad_nonfinite),
        headroom_log2=headroom_log2(grad_max),
        perimeter_grad_max=perimeter_value if perimeter_max is not None else None,
        perimeter_bound=perimeter_grad_bound(ndim) * sobel_gain(getattr(loss, "sobel", "normalised"), ndim)
        if perimeter_max is not None else None,
        seconds=time.perf_counter() - start,
        zero_grad_fraction=zero_grad / grad.numel(),
        clamp_at_bound=_clamp_shares(taps) if taps is not None else None,
    )


def headroom_log2(grad_max: float) -> float:
    """log2(65504 / (max|grad| * 65536)): doublings left before GradScaler's first scaled gradient overflows fp16."""
    if grad_max == 0:
        return math.inf
    return math.log2(FP16_MAX / (grad_max * GRAD_SCALER_INITIAL_SCALE))
