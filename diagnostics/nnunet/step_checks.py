"""What ``geodiag watch`` checks on its sampled steps besides the histograms: the non-finite values the user's own
code hid from its loss (masked), the exceptions it caught and went on from (swallowed), and, with ``--loss SPEC``,
how much of the gradient at the network's output that loss sends (its share, to say when a prior is inert).

Why sampled: the automatic taps see every torch call the user's code makes (restricted to the user's files: the
network, nnU-Net's Dice+CE and geodiag pass through), which costs too much for every step; one step in ``every``
is enough to catch a guard that hides a failure on most batches.

The share is ``<g_loss, g> / |g|²`` at the full-resolution output: ``g`` is the step's own gradient there (a tensor
hook on the output), ``g_loss`` the gradient of the SPEC loss on a detached copy of the same output (one extra
backward, no parameter touched). The loss counts as switched on in a step only when its own code ran during the
step (its functions named by file and first line, as nnU-Net imports the trainer's copy of the file) and its value
is not 0.
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Optional

import torch

from geodiag.reports.schema import INERT_SHARE

from ..nonfinite.autotaps import AutoTaps
from ..nonfinite.loss_spec import UserLoss



def loss_codes(loss: UserLoss) -> frozenset:
    """(file, first line) of the functions that make up the loss: a function itself, or every function defined in a
    module's or callable object's class and its bases (torch's own left out)."""
    fn = loss.fn
    classes = [cls for cls in type(fn).__mro__ if not cls.__module__.startswith(("torch", "builtins"))]
    functions = [fn] if inspect.isfunction(fn) else [member for cls in classes for member in vars(cls).values()
                                                      if inspect.isfunction(member)]
    return frozenset((os.path.abspath(f.__code__.co_filename), f.__code__.co_firstlineno) for f in functions)


class StepChecks:
    """One sampled step at a time: ``begin()`` before ``train_step``, ``on_output`` from the network's forward hook,
    ``end(loss, batch)`` after it returned (``abort()`` if it raised)."""

    def __init__(self, prior: Optional[UserLoss] = None) -> None:
        self.prior = prior
        self._codes = loss_codes(prior) if prior is not None else None
        self._taps: Optional[AutoTaps] = None
        self._output: Optional[torch.Tensor] = None
        self._grad: Optional[torch.Tensor] = None

    @property
    def active(self) -> bool:
        return self._taps is not None

    def begin(self) -> None:
        self._taps = AutoTaps(user_calls_only=True, codes=self._codes)
        self._output = self._grad = None
        self._taps.__enter__()

    def on_output(self, output: torch.Tensor) -> None:
        """The network's full-resolution training output of this step (the first forward only)."""
        if self._output is None and self.prior is not None and output.requires_grad:
            self._output = output
            output.register_hook(self._keep_grad)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self._grad = grad.detach()

    def abort(self) -> None:
        if self._taps is not None:
            self._taps.__exit__(None, None, None)
            self._taps = None

    def end(self, loss: Optional[torch.Tensor], batch: dict) -> dict:
        """The step's findings, read back once: ``masked`` (site, op, calls), ``raised`` (site, op, message), and
        with a prior ``prior_value``, ``prior_share``, ``prior_ran``."""
        taps, self._taps = self._taps, None
        if loss is not None:
            taps.judge(loss)
        taps.__exit__(None, None, None)
        found = taps.result()
        result = {"masked": found.masked_nonfinite, "raised": list(taps.raised)}
        if self.prior is not None:
            result.update(self._share(batch, ran=taps.codes_ran))
        self._output = self._grad = None
        return result

    def _share(self, batch: dict, ran: bool) -> dict:
        if self._output is None or self._grad is None:
            return {"prior_value": math.nan, "prior_share": math.nan, "prior_ran": ran}
        output = self._output.detach().float().requires_grad_(True)
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        try:
            with torch.enable_grad():
                value = self.prior(output, target.to(output.device))
                gradient = torch.autograd.grad(value, output, allow_unused=True)[0]
        except Exception:  # noqa: BLE001 - the user's loss failing outside their step: no share, the step goes on
            return {"prior_value": math.nan, "prior_share": math.nan, "prior_ran": ran}
        g = self._grad.float()
        sent = (gradient * g).sum() if gradient is not None else torch.zeros((), device=g.device)
        value_now, share = torch.stack([value.detach().float().reshape(()), sent / (g * g).sum()]).tolist()
        return {"prior_value": value_now, "prior_share": share, "prior_ran": ran}


def inert_epoch(rows: list[dict]) -> Optional[float]:
    """The median share of an epoch whose sampled steps all ran the prior with a non-zero value and a share below
    ``INERT_SHARE`` in magnitude; None when the epoch is not inert (or nothing was sampled with the prior on)."""
    shares = [row["prior_share"] for row in rows
              if row.get("prior_ran") and row.get("prior_value") not in (None, 0.0)
              and isinstance(row.get("prior_share"), float) and math.isfinite(row["prior_share"])]
    if not shares or any(abs(share) >= INERT_SHARE for share in shares):
        return None
    shares.sort()
    return shares[len(shares) // 2]
