"""CI regression of gradient bounds: a fixed suite of inputs, what a loss's gradients measure on them, and checks.

A change to a loss that lets a gradient grow or a NaN appear should fail CI, not epoch 5 of a training run.
Each case x setting x precision runs one forward and backward pass from logits and is checked against

- analytic bounds: a finite loss and gradient everywhere, and ``max |dP/dp| <= perimeter_grad_bound(ndim)``
  (times the Sobel gain of a loss with ``sobel="seed"``, whose kernel is not normalised) for losses exposing
  the ``perimeter`` and ``probabilities`` taps;
- a committed baseline (``bounds_baseline.json``): max |dL/dlogits| and its L2 norm may not grow by more
  than the baseline's tolerance (relative or absolute, whichever is larger).

The loss signature checked here is ``loss(probabilities, target) -> scalar tensor``: ``probabilities`` is the
softmax of a 2-channel [B, 2, *S] prediction (channel 1 the foreground, fp32 as CUDA autocast makes it),
``target`` the [B, 1, *S] int64 label map, nnU-Net's format. Gradients are taken with respect to the logits.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence
from xml.etree import ElementTree

import torch
from torch import nn

from geodiag.losses import GeometricLoss, preset_kwargs
from geodiag.losses.geometry import sobel_gain

from ..instruments.devices import FP16_MAX, GRAD_SCALER_INITIAL_SCALE, PRECISIONS
from ..instruments.errors import ArgumentError, GeodiagError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BASELINE_PATH = Path(__file__).with_name("bounds_baseline.json")
BASELINE_FORMAT = 1


# A measured |dP/dp| may exceed the exact-arithmetic bound by fp32 rounding only.
BOUND_ROUNDING_SLACK = 1e-3


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


# ---------------------------------------------------------------------------------------------- user losses
def load_loss(spec: str) -> LossFn:
    """Resolve ``MODULE:CALLABLE`` (the current directory is importable, as with ``python -m``) to a loss."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ArgumentError(f"{{loss}} must be MODULE:CALLABLE (e.g. mypackage.losses:make_loss), got {spec!r}", "loss")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a problem with the user's spec
        raise ArgumentError(f"cannot import {module_name!r} for {{loss}}: {type(exc).__name__}: {exc}",
                            "loss") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ArgumentError(f"{module_name!r} has no attribute {attribute!r} (from {{loss}} {spec!r})", "loss")
        target = getattr(target, part)
    return as_loss(target, spec)


def as_loss(candidate: object, label: str = "loss") -> LossFn:
    """A loss from a loss callable, an nn.Module instance, or a zero-argument factory (or class) returning one.

    A callable that can be called with no arguments is taken as a factory; anything else as the loss itself.
    """
    if isinstance(candidate, nn.Module):
        return candidate
    if not callable(candidate):
        raise GeodiagError(f"{label} is a {type(candidate).__name__}, not a callable loss or factory")
    if _callable_without_arguments(candidate):
        try:
            built = candidate()
        except Exception as exc:  # noqa: BLE001 - the user's factory failing is their input's problem
            raise GeodiagError(f"{label}() raised {type(exc).__name__}: {exc}") from None
        if not callable(built):
            raise GeodiagError(f"{label}() returned a {type(built).__name__}, not a callable loss")
        return built
    return candidate


def _callable_without_arguments(candidate: Callable) -> bool:
    try:
        signature = inspect.signature(candidate)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in signature.parameters.values())


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


def measure(loss: LossFn, logits: torch.Tensor, target: torch.Tensor, precision: str,
            case: str = "", setting: str = "") -> Measurement:
    """One forward and backward pass of ``loss`` from ``logits`` under ``precision``; one host sync at the end.

    Under bf16/fp16 the logits are rounded to that dtype (a network's output under autocast) and the softmax
    is taken in fp32 (CUDA autocast's policy for softmax); the loss runs inside autocast.
    """
    start = time.perf_counter()
    dtype = PRECISIONS[precision]
    leaf = logits.detach().clone().requires_grad_(True)
    probe, tap = _PerimeterProbe.attach(loss)
    with tap, _autocast(leaf.device, dtype):
        probabilities = torch.softmax(leaf if dtype is None else leaf.to(dtype), dim=1, dtype=torch.float32)
        value = loss(probabilities, target)
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
        perimeter_max.double() if perimeter_max is not None else nan,
    ]).tolist()
    loss_value, grad_nonfinite, grad_max, grad_l2, perimeter_value = stats
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
    )


def headroom_log2(grad_max: float) -> float:
    """log2(65504 / (max|grad| * 65536)): doublings left before GradScaler's first scaled gradient overflows fp16."""
    if grad_max == 0:
        return math.inf
    return math.log2(FP16_MAX / (grad_max * GRAD_SCALER_INITIAL_SCALE))


# ---------------------------------------------------------------------------------------------- baseline
@dataclass(frozen=True)
class Tolerance:
    """Allowed growth over the baseline: the larger of ``rel`` x baseline and ``abs``."""

    rel: float
    abs: float

    def limit(self, baseline: float) -> float:
        return baseline + max(self.rel * baseline, self.abs)


# 10%: well above the spread between runs, precisions and CPUs (bf16 vs fp32 differ by up to 6%), well below a
# doubling. The absolute floor keeps gradients that are zero up to rounding (1e-28 on a full mask) from failing.
DEFAULT_TOLERANCES = {"grad_max": Tolerance(rel=0.10, abs=1e-8), "grad_l2": Tolerance(rel=0.10, abs=1e-8)}
BASELINE_QUANTITIES = ("loss", "grad_max", "grad_l2", "loss_nonfinite", "grad_nonfinite", "headroom_log2",
                       "perimeter_grad_max")


@dataclass
class Baseline:
    """Committed measurements keyed by (case, setting, precision), with the tolerances they are checked with."""

    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    entries: dict[tuple[str, str, str], dict[str, Optional[float]]] = field(default_factory=dict)
    generated_with: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Baseline":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != BASELINE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {BASELINE_FORMAT}")
            tolerances = {q: Tolerance(float(t["rel"]), float(t["abs"])) for q, t in data["tolerances"].items()}
            entries = {(e["case"], e["setting"], e["precision"]): {q: e.get(q) for q in BASELINE_QUANTITIES}
                       for e in data["entries"]}
        except FileNotFoundError:
            raise ArgumentError(f"baseline {path} does not exist (create it with {{update_baseline}})",
                                "update_baseline") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GeodiagError(f"baseline {path} is not a check-bounds baseline: {exc}") from None
        unknown = set(tolerances) - set(DEFAULT_TOLERANCES)
        if unknown:
            raise GeodiagError(f"baseline {path}: no tolerance check for {sorted(unknown)}")
        return cls(tolerances, entries, dict(data.get("generated_with", {})))

    def updated(self, measurements: Iterable[Measurement], device: torch.device) -> "Baseline":
        """This baseline with the given measurements replacing (or adding) their entries."""
        entries = dict(self.entries)
        for m in measurements:
            entries[m.key] = {q: _json_number(getattr(m, q)) for q in BASELINE_QUANTITIES}
        generated_with = {"torch": torch.__version__, "device": device.type}
        return Baseline(dict(self.tolerances), entries, generated_with)

    def save(self, path: str | Path) -> None:
        header = {
            "format": BASELINE_FORMAT,
            "generated_with": self.generated_with,
            "tolerances": {q: asdict(t) for q, t in self.tolerances.items()},
        }
        # One entry per line, sorted: a re-generated baseline diffs line by line in review.
        entries = [json.dumps({"case": c, "setting": s, "precision": p, **values}, allow_nan=False)
                   for (c, s, p), values in sorted(self.entries.items())]
        head = json.dumps(header, indent=1, allow_nan=False)[:-2]
        Path(path).write_text(head + ',\n "entries": [\n  ' + ",\n  ".join(entries) + "\n ]\n}\n")


def _json_number(value: Optional[float]) -> Optional[float]:
    """JSON has no NaN or infinity: those are stored as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}") if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Regression:
    """One violated bound, described with everything needed to act on it."""

    case: str
    setting: str
    precision: str
    quantity: str
    baseline: Optional[float]
    measured: float
    bound: str

    def __str__(self) -> str:
        baseline = "-" if self.baseline is None else f"{self.baseline:.6g}"
        return (f"{self.case} / {self.setting} / {self.precision}: {self.quantity} = {self.measured:.6g} "
                f"(baseline {baseline}; bound {self.bound})")


def check_analytic(m: Measurement) -> list[Regression]:
    """Bounds that hold for any correct loss: finite loss and gradient, Sobel perimeter gradient bound."""
    found = []
    if m.loss_nonfinite:
        found.append(Regression(*m.key, "loss", None, m.loss, "finite"))
    if m.grad_nonfinite:
        found.append(Regression(*m.key, "grad_nonfinite", None, m.grad_nonfinite, "0 (finite dL/dlogits)"))
    if m.perimeter_grad_max is not None and not (
            m.perimeter_grad_max <= m.perimeter_bound * (1.0 + BOUND_ROUNDING_SLACK)):
        found.append(Regression(*m.key, "perimeter_grad_max", None, m.perimeter_grad_max,
                                f"<= {m.perimeter_bound:.5f} (analytic, normalised Sobel)"))
    return found


def check_baseline(m: Measurement, baseline: Baseline) -> list[Regression]:
    """Growth of max |dL/dlogits| and its L2 norm beyond the baseline's tolerance; nothing if not baselined.

    A new non-finite value needs no baseline: ``check_analytic`` rejects every one.
    """
    entry = baseline.entries.get(m.key)
    if entry is None:
        return []
    found = []
    for quantity, tolerance in baseline.tolerances.items():
        reference, measured = entry.get(quantity), getattr(m, quantity)
        if reference is None:
            continue
        limit = tolerance.limit(reference)
        if measured > limit:
            found.append(Regression(*m.key, quantity, reference, measured,
                                    f"<= {limit:.6g} (+{tolerance.rel:.0%} or +{tolerance.abs:g})"))
    return found


@dataclass(frozen=True)
class Outcome:
    """A measurement with the regressions found in it."""

    measurement: Measurement
    regressions: tuple[Regression, ...]
    baselined: bool

    @property
    def passed(self) -> bool:
        return not self.regressions


def run_checks(losses: Mapping[str, LossFn], cases: Sequence[Case], precisions: Sequence[str] = tuple(PRECISIONS),
               device: torch.device = torch.device("cpu"), baseline: Optional[Baseline] = None) -> list[Outcome]:
    """Measure every case x setting x precision and check it against the analytic bounds and the baseline."""
    _validated(precisions, PRECISIONS, "precision")
    outcomes = []
    for case in cases:
        logits, target = case.inputs(device)
        for setting, loss in losses.items():
            if not _defined_in(loss, logits.dim() - 2):
                continue
            for precision in precisions:
                m = measure(loss, logits, target, precision, case=case.name, setting=setting)
                found = check_analytic(m) + (check_baseline(m, baseline) if baseline is not None else [])
                baselined = baseline is not None and m.key in baseline.entries
                outcomes.append(Outcome(m, tuple(found), baselined))
    return outcomes


def _defined_in(loss: LossFn, ndim: int) -> bool:
    """False only for a GeometricLoss replaying the seed's aspect formula, which is 2D only, on a 3D case."""
    return not (isinstance(loss, GeometricLoss) and loss.aspect_formula == "seed" and loss.aspect_weight > 0
                and ndim != 2)


# ---------------------------------------------------------------------------------------------- output
_COLUMNS = ("case", "setting", "prec", "loss", "max|g|", "L2|g|", "nonfin", "headroom", "max|dP/dp|", "status")


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A fixed-width table, one row per case x setting x precision."""
    rows = [_COLUMNS]
    for o in outcomes:
        m = o.measurement
        perimeter = "-" if m.perimeter_grad_max is None else f"{m.perimeter_grad_max:.4f}/{m.perimeter_bound:.4f}"
        status = "FAIL" if o.regressions else ("ok" if o.baselined else "ok*")
        rows.append((m.case, m.setting, m.precision, f"{m.loss:.4g}", f"{m.grad_max:.3e}", f"{m.grad_l2:.3e}",
                     f"{m.loss_nonfinite}/{m.grad_nonfinite}", f"{m.headroom_log2:+.1f}", perimeter, status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_junit(outcomes: Sequence[Outcome], path: str | Path, suite: str = "geodiag.check-bounds") -> None:
    """JUnit XML: one testcase per case x setting x precision, a failure element per failing one."""
    failures = sum(not o.passed for o in outcomes)
    seconds = sum(o.measurement.seconds for o in outcomes)
    root = ElementTree.Element("testsuites", tests=str(len(outcomes)), failures=str(failures), errors="0",
                               time=f"{seconds:.3f}")
    node = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(outcomes)),
                                  failures=str(failures), errors="0", skipped="0", time=f"{seconds:.3f}")
    for o in outcomes:
        m = o.measurement
        case = ElementTree.SubElement(node, "testcase", classname=f"{suite}.{m.case}",
                                      name=f"{m.setting}/{m.precision}", time=f"{m.seconds:.3f}")
        if o.regressions:
            failure = ElementTree.SubElement(case, "failure", message=str(o.regressions[0]), type="GradientBound")
            failure.text = "\n".join(map(str, o.regressions))
    ElementTree.indent(root)
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
