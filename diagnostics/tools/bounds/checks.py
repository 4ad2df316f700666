"""The checks: analytic bounds any correct loss meets, changes from the baseline both ways (a gradient that grows,
one that is silenced, a loss value that drifts, more elements with zero gradient or held at a clamp's bound), and
the run over every case x setting x precision."""
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
from .baseline import TOLERANCE_PARTS, Baseline, Tolerance
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
    tolerance: Optional[str] = None  # the tolerance's name, for a comparison with the baseline

    def __str__(self) -> str:
        baseline = "-" if self.baseline is None else f"{self.baseline:.6g}"
        tolerance = f"; tolerance {self.tolerance}" if self.tolerance else ""
        return (f"{self.case} / {self.setting} / {self.precision}: {self.quantity} = {self.measured:.6g} "
                f"(baseline {baseline}; bound {self.bound}{tolerance})")


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


@dataclass(frozen=True)
class BaselineCheck:
    """One comparison with the baseline: the tolerance it reads, the measured quantity, and which way it fails
    (``growth``: above baseline + allowed; ``drop``: below baseline - allowed; ``drift``: either way)."""

    tolerance: str
    quantity: str
    direction: str

    def allowance(self, tolerance: Tolerance) -> str:
        """The change the tolerance allows, in words: ``+10% or +1e-08``, ``+-1% or +-1e-06``, ``+10 points``."""
        sign = {"growth": "+", "drop": "-", "drift": "+-"}[self.direction]
        if TOLERANCE_PARTS[self.tolerance] == "abs":
            return f"{sign}{100 * tolerance.abs:g} points"
        return f"{sign}{tolerance.rel:.0%} or {sign}{tolerance.abs:g}"

    def violated(self, reference: float, measured: float, tolerance: Tolerance) -> Optional[str]:
        """The bound ``measured`` breaks, in words; None when it is within."""
        allowed = tolerance.allowed(reference)
        how = self.allowance(tolerance)
        if self.direction == "growth":
            return None if measured <= reference + allowed else f"<= {reference + allowed:.6g} ({how})"
        if self.direction == "drop":
            return None if measured >= reference - allowed else f">= {reference - allowed:.6g} ({how})"
        return None if abs(measured - reference) <= allowed else f"{reference:.6g} +- {allowed:.3g} ({how})"


# Every comparison, in the order regressions are listed; each reads the tolerance of its name.
BASELINE_CHECKS = (BaselineCheck("grad_max", "grad_max", "growth"), BaselineCheck("grad_l2", "grad_l2", "growth"),
                   BaselineCheck("grad_l2_drop", "grad_l2", "drop"), BaselineCheck("loss", "loss", "drift"),
                   BaselineCheck("zero_grad", "zero_grad_fraction", "growth"))
AT_BOUND_CHECK = BaselineCheck("at_bound", "clamp_at_bound", "growth")


def check_baseline(m: Measurement, baseline: Baseline) -> list[Regression]:
    """Each ``BASELINE_CHECKS`` comparison, then each clamp site's at-bound share; nothing if not baselined.
    A quantity the entry does not hold (an older baseline) is not compared.

    A new non-finite value needs no baseline: ``check_analytic`` rejects every one.
    """
    entry = baseline.entries.get(m.key)
    if entry is None:
        return []
    found = []
    for check in BASELINE_CHECKS:
        reference, measured = entry.get(check.quantity), getattr(m, check.quantity)
        if reference is None or not math.isfinite(measured):
            continue
        bound = check.violated(reference, measured, baseline.tolerances[check.tolerance])
        if bound is not None:
            found.append(Regression(*m.key, check.quantity, reference, measured, bound, check.tolerance))
    stored = entry.get("clamp_at_bound") or {}
    for site, share in (m.clamp_at_bound or {}).items():
        matched = matched_site(site, list(m.clamp_at_bound), list(stored))
        if matched is None or stored[matched] is None:
            continue
        bound = AT_BOUND_CHECK.violated(stored[matched], share, baseline.tolerances["at_bound"])
        if bound is not None:
            named = site if matched == site else f"{site} ({matched} in the baseline)"
            found.append(Regression(*m.key, f"at_bound {named}", stored[matched], share, bound, "at_bound"))
    return found


def matched_site(site: str, measured: list[str], stored: list[str]) -> Optional[str]:
    """The baseline's name for a measured clamp site: the same ``file:LINE``, else the clamp of the same file
    at the same rank in order of first call (lines moved by an edit above it); None for a site it lacks."""
    if site in stored:
        return site
    file = site.rpartition(":")[0]
    rank = [s for s in measured if s.rpartition(":")[0] == file].index(site)
    same_file = [s for s in stored if s.rpartition(":")[0] == file]
    return same_file[rank] if rank < len(same_file) and same_file[rank] not in measured else None


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
                       perimeter_grad_max=None, perimeter_bound=None, seconds=0.0, zero_grad_fraction=math.nan)

