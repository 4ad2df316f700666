"""CI regression of gradient bounds: a fixed suite of inputs, what a loss's gradients measure on them, and checks.

A change to a loss that lets a gradient grow or a NaN appear should fail CI, not epoch 5 of a training run; so
should one that silences a gradient (a clamp that now holds most elements at its bound).
Each case x setting x precision runs one forward and backward pass from logits and is checked against

- analytic bounds: a finite loss and gradient everywhere, and ``max |dP/dp| <= perimeter_grad_bound(ndim)``
  (times the Sobel gain of a loss with ``sobel="seed"``, whose kernel is not normalised) for losses exposing
  the ``perimeter`` and ``probabilities`` taps;
- a committed baseline (``bounds_baseline.json``), both ways: max |dL/dlogits| and its L2 norm may not grow
  beyond their tolerance, the L2 norm may not fall below half its baseline (a silenced gradient), the loss value
  may not drift, and the share of dL/dlogits elements exactly zero, or (a user's loss) of a clamp site's elements
  held at its bound, may not rise by more than 10 points. Each tolerance is the larger of a relative and an
  absolute allowance, settable by name (``Baseline.with_tolerances``, ``--tolerance NAME=VALUE``).

The loss signature checked here is ``loss(probabilities, target) -> scalar tensor``: ``probabilities`` is the
softmax of a 2-channel [B, 2, *S] prediction (channel 1 the foreground, fp32 as CUDA autocast makes it),
``target`` the [B, 1, *S] int64 label map, nnU-Net's format. Gradients are taken with respect to the logits.
A user's loss (``nonfinite.loss_spec.UserLoss``) may take the logits instead, or the prediction only. A case on
which it raises is a failing row naming the exception and the user's line; a case of a dimensionality not
selected (``dims``), or that a built-in setting is not defined in, is a skipped row with its reason.

Rooms: ``cases`` (the inputs), ``measurement`` (one pass, the losses), ``baseline`` (the committed file),
``checks`` (analytic and baseline checks, the run), ``output`` (table, JUnit). Their public names are re-exported here.
"""
from .baseline import BASELINE_PATH, DEFAULT_TOLERANCES, Baseline, Tolerance, parse_tolerances
from .cases import CASES, Case, select_cases
from .checks import Outcome, Regression, check_analytic, check_baseline, run_checks
from .measurement import SETTINGS, LossFn, Measurement, builtin_losses, headroom_log2, measure, perimeter_grad_bound
from .output import format_table, format_tolerances, write_junit

__all__ = ["BASELINE_PATH", "DEFAULT_TOLERANCES", "Baseline", "Tolerance", "parse_tolerances", "CASES", "Case",
           "select_cases", "Outcome", "Regression", "check_analytic", "check_baseline", "run_checks", "SETTINGS",
           "LossFn", "Measurement", "builtin_losses", "headroom_log2", "measure", "perimeter_grad_bound",
           "format_table", "format_tolerances", "write_junit"]
