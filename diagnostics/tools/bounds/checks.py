"""The checks: analytic bounds any correct loss meets, growth over the baseline, and the run over every case x
setting x precision."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from geodiag.losses import GeometricLoss

from ...instruments.devices import PRECISIONS
from ...instruments.errors import GeodiagError
from ...nonfinite.loss_spec import one_line
from ...nonfinite.sites import exception_site
from .baseline import Baseline
from .cases import Case, _validated
from .measurement import LossFn, Measurement, measure

# A measured |dP/dp| may exceed the exact-arithmetic bound by fp32 rounding only.
BOUND_ROUNDING_SLACK = 1e-3


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
    """A measurement with the regressions found in it; or the exception the loss raised (``error``), or why the
    run was not made (``skipped``), with a measurement of NaNs keyed like the others."""

    measurement: Measurement
    regressions: tuple[Regression, ...]
    baselined: bool
    error: Optional[str] = None
    skipped: Optional[str] = None

    @property
    def passed(self) -> bool:
        return not self.regressions and self.error is None

    @property
    def measured(self) -> bool:
        return self.error is None and self.skipped is None


def run_checks(losses: Mapping[str, LossFn], cases: Sequence[Case], precisions: Sequence[str] = tuple(PRECISIONS),
               device: torch.device = torch.device("cpu"), baseline: Optional[Baseline] = None,
               dims: Optional[Sequence[int]] = None) -> list[Outcome]:
    """Measure every case x setting x precision and check it against the analytic bounds and the baseline; a
    loss raising on one case fails that row and the others still run."""
    _validated(precisions, PRECISIONS, "precision")
    outcomes = []
    for case in cases:
        logits, target = case.inputs(device)
        ndim = logits.dim() - 2
        for setting, loss in losses.items():
            skipped = _skip_reason(loss, ndim, dims)
            for precision in precisions:
                if skipped is not None:
                    outcomes.append(Outcome(_unmeasured(case.name, setting, precision), (), False, skipped=skipped))
                    continue
                try:
                    m = measure(loss, logits, target, precision, case=case.name, setting=setting)
                except GeodiagError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the user's loss failing on a case is that case's finding
                    error = f"{one_line(exc)} (at {exception_site(exc)})"
                    outcomes.append(Outcome(_unmeasured(case.name, setting, precision), (), False, error=error))
                    continue
                found = check_analytic(m) + (check_baseline(m, baseline) if baseline is not None else [])
                baselined = baseline is not None and m.key in baseline.entries
                outcomes.append(Outcome(m, tuple(found), baselined))
    return outcomes


def _skip_reason(loss: LossFn, ndim: int, dims: Optional[Sequence[int]]) -> Optional[str]:
    """Why a case of ``ndim`` is not run: not among ``dims``, or a GeometricLoss replaying the seed's 2D-only
    aspect formula on a 3D case."""
    if dims is not None and ndim not in dims:
        return f"{ndim}D case; --dims {','.join(map(str, dims))} selects the others"
    if isinstance(loss, GeometricLoss) and loss.aspect_formula == "seed" and loss.aspect_weight > 0 and ndim != 2:
        return "the seed's aspect formula is 2D only"
    return None


def _unmeasured(case: str, setting: str, precision: str) -> Measurement:
    return Measurement(case=case, setting=setting, precision=precision, loss=math.nan, loss_nonfinite=0,
                       grad_max=math.nan, grad_l2=math.nan, grad_nonfinite=0, headroom_log2=math.nan,
                       perimeter_grad_max=None, perimeter_bound=None, seconds=0.0)

