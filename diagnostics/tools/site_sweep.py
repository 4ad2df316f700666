"""The counterfactual sweep of a user's own bound: ``clamp-sweep --loss SPEC --site FILE:LINE --eps LIST``.

At each chosen site the clamp's ``min`` (or the constant added inside a sqrt) is replaced by each swept value at
run time (``BoundOverride``), the user's file untouched; the rest is the built-in sweep's protocol: one forward
per case and precision (the whole image, predicted as nnU-Net predicts it, no gradient into the network), then
every value re-evaluates only the loss on the same logits, under automatic taps. The reference is the same loss
in fp64 at the smallest swept value. The eps are in the loss's own units, whatever they are. A value at which
the loss raises in a precision (a clamp bound that does not fit fp16, say) gives a row with the exception and the
user's line (``raised``, ``raised_site``) and no measurements; the report leaves it out of the rule and lists it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import torch

from geodiag.reports import schema, tables
from geodiag.reports.site_sweep_report import CURRENT_BOUND, RAISED_COLUMNS, REQUIRED, ROWS_FILE

from ..instruments.devices import PRECISIONS
from ..instruments.errors import ArgumentError
from ..nnunet.cases import predict_logits
from ..nonfinite.autotaps import AutoTaps
from ..nonfinite.loss_spec import UserLoss, load_loss
from ..nonfinite.override import BoundOverride
from ..nonfinite.sites import SiteSpec
from ..progress import Progress
from . import own_loss, run_record
from .sweep import _kth, cases_to_sweep, load_sweep_items


def parse_sites(text: Sequence[str]) -> list[str]:
    """Validated FILE:LINE sites (a GeodiagError names a malformed one, an ArgumentError their absence)."""
    sites = [s for s in text if s.strip()]
    if not sites:
        raise ArgumentError("{sites} needs at least one FILE:LINE", "sites")
    for site in sites:
        SiteSpec.parse(site)
    return sites


def _reference(loss: UserLoss, logits: torch.Tensor, label: torch.Tensor, sites: Sequence[str],
               value: float) -> tuple[float, dict[str, str]]:
    """The loss in fp64 with every site's bound at ``value``, forward only, and per site the bound(s) the user's
    calls were made with (the value their file has there, for the report's verdict), ";"-separated."""
    override = BoundOverride({site: value for site in sites})
    with torch.no_grad(), override:
        reference = float(loss(logits.detach().double(), label))
    return reference, {CURRENT_BOUND.format(site=site): ";".join(map(repr, sorted(bounds)))
                       for site, bounds in override.current.items()}


def _site_rows(result, sites: Sequence[str], op: str) -> dict[str, list[dict]]:
    """Per chosen site, the tap rows of ``op`` at that line."""
    located = [(row, *row["site"].rsplit(":", 1)) for row in result.sites if row["op"] == op]
    return {site: [row for row, file, line in located if SiteSpec.parse(site).matches(file, int(line))]
            for site in sites}


def evaluate_value(loss: UserLoss, logits: torch.Tensor, label: torch.Tensor, sites: Sequence[str], value: float,
                   dtype: Optional[torch.dtype], device: torch.device) -> dict:
    """Loss, gradient statistics at the logits and per-site tap figures with every site's bound at ``value``."""
    leaf = logits.detach().requires_grad_(True)
    call = own_loss.trainer_call(loss, dtype, device)

    def overridden(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with BoundOverride({site: value for site in sites}):
            return call(x, target)

    taps = AutoTaps()
    result_value = taps.run(overridden, leaf, label)
    if result_value.requires_grad:
        result_value.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    finite = torch.isfinite(grad)
    magnitude = torch.where(finite, grad, 0.0).abs().double()
    loss_value, grad_max, grad_l2, grad_p999, nonfinite_grad = torch.stack([
        result_value.detach().double().reshape(()), magnitude.amax(), magnitude.square().sum().sqrt(),
        _kth(magnitude.reshape(1, -1), 0.999)[0], (~finite).sum().double()]).tolist()
    result = taps.result()
    clamps, roots = _site_rows(result, sites, "clamp"), _site_rows(result, sites, "sqrt")
    at_bound = {site: (rows[0]["at_bound_fraction"] if rows else math.nan) for site, rows in clamps.items()}
    derivatives = [r["max_local_derivative"] for rows in roots.values() for r in rows
                   if r["max_local_derivative"] is not None]
    measured = [v for v in at_bound.values() if not math.isnan(v)]
    return {
        "stabilizer": "clamp" if all(clamps.values()) else "additive" if not any(clamps.values()) else "mixed",
        "loss": loss_value, "grad_max": grad_max, "grad_l2": grad_l2, "grad_p999": grad_p999,
        "sqrt_deriv_max": max(derivatives) if derivatives else math.nan,
        "frac_below_eps": sum(measured) / len(measured) if measured else math.nan,
        "nonfinite_loss": int(not math.isfinite(loss_value)), "nonfinite_grad": int(nonfinite_grad),
        "masked_nonfinite": sum(m["calls"] for m in result.masked_nonfinite),
        **{f"at_bound_fraction[{site}]": fraction for site, fraction in at_bound.items()},
    }


def run_site_sweep(specs: Sequence[str], out: str | Path, loss_spec: str, sites: Sequence[str],
                   eps: Sequence[float], loss_input: str = "probabilities", cases: Optional[str] = None,
                   precisions: Sequence[str] = ("fp32",), device: str = "cpu", trust: bool = False,
                   resume: bool = False, max_cases: Optional[int] = None, fold: Optional[str] = None,
                   progress: Optional[Progress] = None) -> pd.DataFrame:
    """Sweep every checkpoint x case x precision x value; write DIR/site_sweep.csv (rows per case under
    DIR/cases/, so a resumed sweep recomputes nothing)."""
    out = run_record.check_out(out)
    sites = parse_sites(sites)
    eps = sorted({float(e) for e in eps})
    if not eps or not all(math.isfinite(e) for e in eps):
        raise ArgumentError("{eps} must be finite numbers", "eps")
    loss = load_loss(loss_spec, loss_input)
    case_dir, has_results = run_record.open_cases(out, "*/*.csv", "sweep results", resume)
    items = load_sweep_items(specs, trust, fold)
    run_record.check_and_record(out, {"loss": loss_spec, "loss_input": loss_input, "sites": list(sites),
                                      "eps": eps, "precisions": list(precisions)}, resume, has_results)
    dev = torch.device(device)
    for todo in cases_to_sweep(items, cases, max_cases, case_dir, trust, dev, progress):
        item, network, case, patch_size = todo.item, todo.network, todo.case, todo.item.checkpoint.patch_size
        label = case.label[None].to(dev)
        rows = []
        for precision in precisions:
            dtype = PRECISIONS[precision]
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = predict_logits(network, case.image, patch_size)
            where = {**item.meta, "case": case.name, "precision": precision, "sites": ",".join(sites),
                     "ref_eps": eps[0]}
            try:
                with own_loss.raising_as_finding():
                    reference, current = _reference(loss, logits, label, sites, eps[0])
            except own_loss.LossRaised as exc:
                rows += [{**where, "eps": value, "raised": exc.message, "raised_site": exc.site} for value in eps]
                continue
            for value in eps:
                try:
                    measured = evaluate_value(loss, logits, label, sites, value, dtype, dev)
                except own_loss.LossRaised as exc:
                    rows.append({**where, "eps": value, "ref_loss": reference, "raised": exc.message,
                                 "raised_site": exc.site})
                    continue
                rows.append({**where, **current, "eps": value, "ref_loss": reference,
                             "bias_loss": (measured["loss"] / reference - 1.0
                                           if reference != 0 and math.isfinite(reference) else math.nan),
                             **measured})
        schema.write_text(todo.file(".csv"), pd.DataFrame(rows).to_csv(index=False))
    row_files = sorted((out / "cases").glob("*/*.csv"))
    frame = pd.concat([pd.read_csv(p) for p in row_files], ignore_index=True)
    frame = frame.reindex(columns=[*frame.columns, *(c for c in (*REQUIRED, *RAISED_COLUMNS) if c not in frame)])
    frame = frame.sort_values(["checkpoint", "case", "precision", "eps"], kind="stable").reset_index(drop=True)
    tables.write_table(frame, out / ROWS_FILE)
    return frame
