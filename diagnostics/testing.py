"""Gradient-bound assertions for users' own test suites: ``assert_gradient_bounds(loss, ...)`` in a pytest test."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .nonfinite.loss_spec import as_user_loss
from .tools.bounds import Baseline, Outcome, run_checks, select_cases
from .instruments.devices import PRECISIONS, resolve_device


def assert_gradient_bounds(
    loss: object,
    cases: Optional[Sequence[str]] = None,
    baseline: Union[str, Path, Baseline, None] = None,
    precisions: Sequence[str] = tuple(PRECISIONS),
    device: str = "cpu",
    setting: str = "loss",
) -> list[Outcome]:
    """Run the check-bounds suite on ``loss`` and raise AssertionError naming every regression.

    ``loss`` takes the forms ``geodiag check-bounds --loss`` accepts: a callable
    ``(probabilities [B, 2, *S], target label map [B, 1, *S]) -> scalar``, an nn.Module, or a zero-argument
    factory (or class) returning one. ``baseline`` (a path or a loaded Baseline) is looked up under the name
    ``setting``; without one only the analytic bounds are checked. Returns the outcomes when all pass.
    """
    checked = as_user_loss(loss, setting)
    if isinstance(baseline, (str, Path)):
        baseline = Baseline.load(baseline)
    outcomes = run_checks({setting: checked}, select_cases(cases), precisions, torch.device(resolve_device(device)), baseline)
    regressions = [str(r) for outcome in outcomes for r in outcome.regressions]
    regressions += [f"{o.measurement.case} / {setting} / {o.measurement.precision}: {o.error}" for o in outcomes
                    if o.error]
    if regressions:
        raise AssertionError(f"{len(regressions)} gradient-bound regression(s):\n" + "\n".join(regressions))
    return outcomes
