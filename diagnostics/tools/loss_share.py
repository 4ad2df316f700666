"""A loss's share of a training step's gradient: what it sends through the network, against Dice+CE and the total.

Why: a term whose clamp or units make its gradient a millionth of Dice+CE's is inert, one whose gradient dwarfs it
dominates the clipped step; neither shows in the loss values nnU-Net logs, nor in a NaN check. For values whose
sum over ``step`` is what a training step back-propagates, each value's gradient g_x is taken at the logits and at
the network's parameters, with its share of the step's gradient g, <g_x, g>/|g|^2 (the step's parts sum to 1),
and its norm ratio |g_x|/|g|; ``geodiag.reports.schema.share_role`` names the share inert, contributes or dominant.
analyze-checkpoint measures it per training patch and per whole image, the study per training batch.

A loss's terms: geodiag's ``GeometricLoss`` through its taps; a user's loss that returns a dict of tensors, its
entries; otherwise those named ``NAME=SPEC``, SPEC either a weight attribute of the loss (the term is a copy of
the loss with the other named weights at 0) or a loss SPEC of its own (``file.py:NAME``, called like the loss).
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Mapping, Optional, Sequence

import pandas as pd
import torch

from geodiag.losses import GEOMETRIC_TERMS
from geodiag.reports.schema import DOMINANT_SHARE, INERT_SHARE, share_role

from ..instruments.errors import ArgumentError, GeodiagError
from ..nonfinite.loss_spec import UserLoss, load_loss
from . import own_loss

DICE_CE, LOSS = "dice_ce", "loss"
# What analyze-checkpoint's training step back-propagates: Dice+CE plus the analysed loss.
STEP = (DICE_CE, LOSS)


def _grads(value: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d value / d each input; zeros where it does not depend on one (or on anything: a constant term)."""
    if not value.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    found = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, inputs)]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """<a, b> over two lists of tensors, in fp64 on their device."""
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()


def _side_statistics(grads: list[torch.Tensor], step_grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """|g_x|, <g_x, g>/|g|^2, |g_x|/|g|, |g| and g_x's non-finite elements, as 0-dim fp64 tensors."""
    sq, inner, step_sq = _dot(grads, grads), _dot(grads, step_grads), _dot(step_grads, step_grads)
    nonfinite = torch.stack([(~torch.isfinite(g)).sum() for g in grads]).sum().double()
    return {"grad_norm": sq.sqrt(), "share": inner / step_sq, "norm_ratio": (sq / step_sq).sqrt(),
            "step_grad_norm": step_sq.sqrt(), "nonfinite_grad": nonfinite}


def gradient_shares(values: Mapping[str, torch.Tensor], logits: torch.Tensor, params: Sequence[torch.Tensor],
                    step: Sequence[str]) -> dict[str, dict]:
    """Per value: its value and max |g_x| at the logits, and at the logits and at the parameters (``_logits`` and
    ``_params`` columns; NaN without parameters) the ``_side_statistics`` of g_x against g, the gradient of the
    sum of ``step``'s values. Gradients come from ``autograd.grad`` (no ``.grad`` is written); one host read."""
    inputs = [logits, *params]
    step_grads = _grads(sum(values[name] for name in step), inputs)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in values.items():
        grads = _grads(value, inputs)
        row = {"value": value.detach().double().reshape(()),
               "max_abs_grad_logits": grads[0].detach().abs().amax().double()}
        for side, part in (("logits", slice(0, 1)), ("params", slice(1, None))):
            if grads[part]:
                statistics = _side_statistics(grads[part], step_grads[part])
                row.update({f"{key}_{side}": number for key, number in statistics.items()})
        found[name] = row
    keys = [(name, key) for name, row in found.items() for key in row]
    read = torch.stack([found[name][key].to(logits.device) for name, key in keys]).tolist()
    rows = {name: {f"{key}_params": float("nan") for key in ("grad_norm", "share", "norm_ratio", "step_grad_norm")}
            for name in found}
    for (name, key), number in zip(keys, read):
        rows[name][key] = int(number) if key.startswith("nonfinite") else number
    rows = {name: {"nonfinite_grad_params": 0, **row} for name, row in rows.items()}
    return rows


# ---------------------------------------------------------------------------------------------- the loss's terms
def parse_terms(loss: own_loss.AnalysedLoss, items: Sequence[str]) -> dict[str, UserLoss]:
    """``NAME=SPEC`` items as the terms of a user's loss, in the order given: SPEC a loss SPEC of its own
    (``file.py:NAME``, ``package.module:NAME``) or a weight attribute of the loss (see ``weight_terms``)."""
    if not items:
        return {}
    if not isinstance(loss, UserLoss):
        raise ArgumentError("{term} names the terms of your own loss; geodiag's GeometricLoss reports its own",
                            "term")
    parsed: dict[str, str] = {}
    for item in items:
        name, _, spec = item.partition("=")
        if not name.isidentifier() or not spec or name in (DICE_CE, LOSS) or name in parsed:
            raise ArgumentError(f"{{term}} {item!r}: expected NAME=SPEC with NAME a new identifier (not "
                                f"{DICE_CE} or {LOSS}) and SPEC file.py:NAME, package.module:NAME or a weight "
                                "attribute of the loss", "term")
        parsed[name] = spec
    terms = weight_terms(loss, {name: spec for name, spec in parsed.items() if ":" not in spec})
    for name, spec in parsed.items():
        if ":" in spec:
            try:
                terms[name] = load_loss(spec, loss.input_kind)
            except ArgumentError as exc:
                raise ArgumentError(f"{{term}} {name}={spec}: {exc}", "term") from None
    return {name: terms[name] for name in parsed}


def weight_terms(loss: UserLoss, attributes: Mapping[str, str]) -> dict[str, UserLoss]:
    """term -> a copy of the loss with every other named weight attribute set to 0: the term alone, weighted as
    the loss weighs it (their sum is the loss when the loss is a weighted sum of its terms)."""
    for name, attribute in attributes.items():
        weight = getattr(loss.fn, attribute, None)
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool):
            raise ArgumentError(f"{{term}} {name}={attribute}: the loss has no numeric attribute {attribute!r} "
                                "(a term's weight); name a loss SPEC file.py:NAME instead", "term")
    terms = {}
    for name, attribute in attributes.items():
        single = copy.deepcopy(loss.fn)
        for other in attributes.values():
            if other != attribute:
                setattr(single, other, 0.0)
        terms[name] = UserLoss(f"{loss.spec} [{name}]", single, loss.takes_target, loss.input_kind)
    return terms


class _KeptOutput:
    """A user's loss function that keeps what it last returned (a tensor, or a dict of term tensors)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.returned = fn, None

    def __call__(self, *args):
        self.returned = self.fn(*args)
        return self.returned


def loss_values(loss: own_loss.AnalysedLoss, logits: torch.Tensor, label: torch.Tensor, dice_ce,
                terms: Mapping[str, UserLoss], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Dice+CE, the loss and its terms on ``logits``, each called as nnU-Net's train_step calls it
    (``own_loss.trainer_call``): a GeometricLoss's terms from its taps, a user's from ``terms`` or, without
    them, from the dict it returns."""
    values = {DICE_CE: dice_ce(logits.float(), label)}
    if not isinstance(loss, UserLoss):
        seen: dict[str, torch.Tensor] = {}
        names = [f"{term}.term" for term in GEOMETRIC_TERMS]
        with loss.register_tap(lambda name, t: seen.__setitem__(name, t), names=names), own_loss.raising_as_finding():
            values[LOSS] = loss(logits, label)
        values.update({term: weight * seen[f"{term}.term"].mean() for term, weight in loss.term_weights().items()
                       if f"{term}.term" in seen})
        return values
    kept = _KeptOutput(loss.fn)
    kept_loss = UserLoss(loss.spec, kept, loss.takes_target, loss.input_kind)
    values[LOSS] = own_loss.trainer_call(kept_loss, dtype, logits.device)(logits, label)
    for name, term in terms.items():
        values[name] = own_loss.trainer_call(term, dtype, logits.device)(logits, label)
    if not terms and isinstance(kept.returned, Mapping):
        values.update({str(name): _scalar(name, value, logits) for name, value in kept.returned.items()})
    return values


def _scalar(name: object, value: object, like: torch.Tensor) -> torch.Tensor:
    """A term the loss returned in its dict, as a 0-dim tensor; a GeodiagError for one that is not a scalar."""
    if isinstance(value, numbers.Real):
        return torch.tensor(float(value), device=like.device)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise GeodiagError(f"the loss returned its term {name!r} as {shape}; each term must be a scalar tensor")
    return value.reshape(())


# ---------------------------------------------------------------------------------------------- analyze's passes
def patch_shares(network, image: torch.Tensor, label: torch.Tensor, loss: own_loss.AnalysedLoss, dice_ce,
                 terms: Mapping[str, UserLoss], dtype: Optional[torch.dtype], device: torch.device) -> list[dict]:
    """Rows per training patch (``sample``) and value: each patch alone through the network as a training step
    of one (forward under autocast in ``dtype``), shares at the logits and at the parameters."""
    params = [p for p in network.parameters() if p.requires_grad]
    rows = []
    for index in range(image.shape[0]):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = network(image[index:index + 1].to(device))
        values = loss_values(loss, logits, label[index:index + 1].to(device), dice_ce, terms, dtype)
        rows += [{"sample": index, "piece": name, **row}
                 for name, row in gradient_shares(values, logits, params, STEP).items()]
    return rows


def image_shares(logits: torch.Tensor, label: torch.Tensor, loss: own_loss.AnalysedLoss, dice_ce,
                 terms: Mapping[str, UserLoss], dtype: Optional[torch.dtype]) -> list[dict]:
    """Rows per value on a whole image's predicted logits (no gradient into the network: logits only)."""
    leaf = logits.detach().requires_grad_(True)
    values = loss_values(loss, leaf, label, dice_ce, terms, dtype)
    return [{"sample": 0, "piece": name, **row} for name, row in gradient_shares(values, leaf, [], STEP).items()]


# ---------------------------------------------------------------------------------------------- summaries
# Which share judges a value: at the parameters on training patches (what the optimizer step sees), at the logits on
# whole images (no gradient reaches the network there).
JUDGED_BY = {"patches": "share_params", "whole_image": "share_logits"}
_SUMMARISED = ("value", "share_params", "norm_ratio_params", "share_logits", "norm_ratio_logits")
# A clamp holding at least this share of its elements at its bound (zero gradient) explains an inert loss.
CLAMP_EXPLAINS = 0.5
# terms.csv's names for Dice+CE and the analysed loss.
TERM_NAMES = {DICE_CE: "dc_ce", LOSS: "geometric_total"}


def summarize(frame: pd.DataFrame) -> dict:
    """summary.json's ``loss_share``: {precision: {pass: {value: {samples, median/min/max of the value, shares and
    norm ratios, role}}}}, the role judged on the median of ``JUDGED_BY[pass]``."""
    summary: dict = {}
    for (precision, pass_name, piece), group in frame.groupby(["precision", "pass", "piece"], sort=False):
        stats: dict = {"samples": int(len(group))}
        for column in _SUMMARISED:
            values = group[column].astype(float)
            stats[column] = {"median": values.median(), "min": values.min(), "max": values.max()}
        stats["role"] = share_role(stats[JUDGED_BY[pass_name]]["median"])
        summary.setdefault(precision, {}).setdefault(pass_name, {})[piece] = stats
    return summary


def headline(summary: dict, sites: Sequence[dict], loss_spec: str, patch_pixels: int) -> dict:
    """summary.json's ``loss_role``: the loss's role at this checkpoint (training patches, at the parameters, in
    fp32 when measured), its share's median and range, its terms' roles, and, when the loss or a term is inert,
    the per-pixel clamp (one that saw at least half as many elements as the patches hold pixels, ``patch_pixels``
    each: not a per-image scalar's) holding the most elements at its bound, if it holds ``CLAMP_EXPLAINS`` of them."""
    precision = "fp32" if "fp32" in summary else next(iter(summary), None)
    patches = summary.get(precision, {}).get("patches", {})
    if LOSS not in patches:
        return {}
    stats = patches[LOSS]
    clamps = [row for row in sites if (row["precision"], row["pass"], row["op"]) == (precision, "patches", "clamp")
              and row.get("at_bound_fraction") is not None
              and row.get("elements", 0) >= stats["samples"] * patch_pixels / 2]
    widest = max(clamps, key=lambda row: row["at_bound_fraction"] * row["elements"], default=None)
    inert = [piece for piece, s in patches.items() if piece != DICE_CE and s["role"] == "inert"]
    explains = bool(inert) and widest is not None and widest["at_bound_fraction"] >= CLAMP_EXPLAINS
    return {"loss": loss_spec, "role": stats["role"], "precision": precision, "pass": "patches",
            "measured_at": "parameters", "share": stats["share_params"]["median"],
            "share_min": stats["share_params"]["min"], "share_max": stats["share_params"]["max"],
            "samples": stats["samples"], "inert_below": INERT_SHARE, "dominant_above": DOMINANT_SHARE,
            "explained_by": ({"site": widest["site"], "op": "clamp", "at_bound_fraction": widest["at_bound_fraction"]}
                             if explains else None),
            "terms": {piece: s["role"] for piece, s in patches.items() if piece not in STEP}}


def term_rows(image_rows: Sequence[dict]) -> list[dict]:
    """terms.csv's rows of one case from its whole-image rows: each value and its gradient norm at the logits; a
    term's ``grad_share`` is its part of the terms' summed gradient norms (NaN for Dice+CE and the loss)."""
    total = sum(row["grad_norm_logits"] for row in image_rows if row["piece"] not in STEP)
    return [{"term": TERM_NAMES.get(row["piece"], row["piece"]), "value": row["value"],
             "grad_norm": row["grad_norm_logits"],
             "grad_share": row["grad_norm_logits"] / total if row["piece"] not in STEP and total > 0 else math.nan}
            for row in image_rows]
