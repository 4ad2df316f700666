"""What an analysis concludes from its measurements: the verdict (the first failure mechanism the evidence shows),
how close the largest values came to their dtype's limit, the checkpoint's stored state, and summary.json."""
from __future__ import annotations

import math

import pandas as pd
import torch

from geodiag.reports import schema
from geodiag.reports.schema import FP16_MAX, GRAD_SCALER_INITIAL_SCALE

from ..instruments.checkpoint_health import checkpoint_health
from ..nnunet.checkpoint import Checkpoint
from .loss_share import TERM_NAMES

# The two inputs each case is evaluated on (keys of a case result).
PASSES = ("patches", "whole_image")


def failed(result: dict) -> bool:
    """Whether a pass of a case result went non-finite anywhere: loss, gradient at the logits, network gradients."""
    return bool(result["nonfinite_loss"] or result["nonfinite_logit_grad"]
                or result.get("network_gradients", {}).get("nonfinite"))


def _headroom(tensors: pd.DataFrame) -> dict:
    """The recorded tensor whose largest magnitude is closest to the limit of the dtype it lives in.

    Under nnU-Net's CUDA training the network output and the gradients flowing back into the network are fp16,
    the gradients multiplied by GradScaler's scale (65536 at first); the loss's own intermediates are fp32 by
    construction. Each tensor is held against that limit, whatever precision it was measured in.
    """
    fp32_max = float(torch.finfo(torch.float32).max)
    best = None
    for row in tensors.itertuples(index=False):
        if math.isnan(row.min) or math.isnan(row.max):
            continue
        peak = max(abs(row.min), abs(row.max))
        if peak == 0:
            continue
        in_network = row.tensor == "logits" or row.tensor.startswith("network")
        if in_network and row.kind == "grad":
            limit = FP16_MAX / GRAD_SCALER_INITIAL_SCALE
            quantity = f"max |grad| x {GRAD_SCALER_INITIAL_SCALE:g} (GradScaler) vs fp16 max {FP16_MAX:g}"
        elif in_network:
            limit, quantity = FP16_MAX, f"max |x| vs fp16 max {FP16_MAX:g} (autocast)"
        else:
            limit, quantity = fp32_max, "max |x| vs fp32 max (the loss runs in fp32)"
        decades = math.log10(limit / peak)
        if best is None or decades < best["headroom_decades"]:
            best = {"tensor": row.tensor, "kind": row.kind, "precision": row.precision, "quantity": quantity,
                    "value": peak, "limit": limit, "headroom_decades": decades}
    return best or {}


def _verdict(health: dict, results: list[dict], raised: list[dict]) -> tuple[str, str]:
    """The first failure mechanism that the evidence shows, in the order in which one causes the next: the
    checkpoint's own state (weights, optimizer momentum, GradScaler) first, since it is already lost whatever the
    loss does; then a loss that raised, which stops the training step outright (no value, nothing for GradScaler
    to skip) and leaves that evaluation's loss and gradient unmeasured; then a non-finite loss, then a
    non-finite gradient. ``results`` are the evaluations that ran, ``raised`` those whose loss raised."""
    if health["non_finite_weights"]:
        return schema.NON_FINITE_WEIGHTS, (f"{health['non_finite_weights']} non-finite weight values in "
                                      f"{len(health['non_finite_weight_tensors'])} tensors: training already wrote "
                                      "NaN/Inf into the network; every later step is lost")
    if health["non_finite_optimizer"]:
        return schema.NON_FINITE_OPTIMIZER_STATE, (f"{health['non_finite_optimizer']} non-finite values in the "
                                                   "optimizer's momentum: the next SGD step will write them into "
                                                   "the weights")
    if health["grad_scaler_collapsed"]:
        return schema.GRAD_SCALER_COLLAPSED, (f"GradScaler scale {health['grad_scaler_scale']:.3g}: too many skipped "
                                         "steps; once 1/scale is inf, a finite step unscales to NaN")
    if raised:
        first = raised[0]
        return schema.LOSS_RAISED, (f"the loss raised on {len(raised)} of {len(results) + len(raised)} case-precision "
                                    f"pairs (first: {first['case']} in {first['precision']}: "
                                    f"{first['raised']['message']} at {first['raised']['site']})")
    passes = [(r, name) for r in results for name in PASSES]
    bad_loss = [(r, name) for r, name in passes if r[name]["nonfinite_loss"]]
    if bad_loss:
        return schema.NON_FINITE_LOSS, (f"the loss is non-finite on {len(bad_loss)} of {len(passes)} evaluations "
                                   f"(first: {_evaluation(*bad_loss[0])})")
    bad_grad = [(r, name) for r, name in passes if failed(r[name])]
    if bad_grad:
        return schema.NON_FINITE_GRADIENT, (f"the loss is finite but its gradient is not on {len(bad_grad)} of "
                                       f"{len(passes)} evaluations (first: {_evaluation(*bad_grad[0])})")
    return schema.HEALTHY, (f"weights, optimizer state and scale are finite, and loss and gradients are finite on all "
                       f"{len(passes)} evaluations (each of {len(results)} case-precision pairs on its training "
                       "patches and on its whole image)")


def _evaluation(result: dict, name: str) -> str:
    """Which case, precision and pass; with the replay's classification when this pass is the one replayed."""
    where = "training patches" if name == "patches" else "whole image"
    replayed = result.get("provenance") or {}
    if replayed.get("pass") == name and replayed.get("classification"):
        where += f", replayed: {replayed['classification']}"
    return f"{result['case']} in {result['precision']}, {where}"


def checkpoint_state(checkpoint: Checkpoint) -> dict:
    """checkpoint_health in the summary's vocabulary."""
    health = checkpoint_health(checkpoint.data)
    scaler = health["grad_scaler"] or {}
    return {
        "non_finite_weights": health["weights"]["nonfinite_elements"],
        "non_finite_weight_tensors": sorted(health["weights"]["nonfinite"]),
        "non_finite_optimizer": health["optimizer"]["nonfinite_elements"],
        "grad_scaler_scale": scaler.get("scale"),
        "inverse_scale_finite": scaler.get("inv_scale_finite"),
        "grad_scaler_collapsed": bool(scaler.get("collapsed", False) or scaler.get("inv_scale_finite") is False),
    }


def summarize(checkpoint: Checkpoint, loss_settings: dict, state: dict, results: list[dict], tensors: pd.DataFrame,
               terms: pd.DataFrame, precisions: list[str], dev: torch.device, patches: int, augment: bool,
              n_cases: int) -> dict:
    """summary.json: the verdict first, then what was measured on which inputs, and the figures behind it.
    ``results`` holds every case-precision pair; those whose loss raised are listed under "raised" and
    contribute no figures."""
    raised = [r for r in results if "raised" in r]
    results = [r for r in results if "raised" not in r]
    verdict, reason = _verdict(state, results, raised)
    geometric = terms[~terms.term.isin(TERM_NAMES.values())]  # the loss's terms, geodiag's or a user's
    shares = geometric.groupby("term")["grad_share"].mean() if len(geometric) else pd.Series(dtype=float)
    dc_ce_norm = terms.loc[terms.term == "dc_ce", "grad_norm"].mean() if len(terms) else math.nan
    geo_norm = terms.loc[terms.term == "geometric_total", "grad_norm"].mean() if len(terms) else math.nan
    oversampling = results[0]["patches"]["foreground_oversampling"] if results else math.nan
    summary = {
        "verdict": verdict,
        "verdict_reason": reason,
        "checkpoint": {"path": str(checkpoint.path), "trainer_name": checkpoint.trainer_name,
                       "configuration": checkpoint.configuration, "fold": checkpoint.fold, "epoch": checkpoint.epoch,
                       "geometric_active": checkpoint.geometric_active},
        "settings": {**{k: loss_settings.get(k) for k in ("stabilizer", "eps", "aspect_formula", "sobel")},
                     "precisions": precisions, "device": str(dev),
                     "patches_per_case": patches, "patch_size": checkpoint.patch_size, "augment": augment},
        "inputs": {
            "patches": (f"{patches} training patch(es) of {'x'.join(map(str, checkpoint.patch_size))} per case, "
                        "placed by "
                        f"nnU-Net's data loader (foreground oversampling {oversampling:g}, "
                        f"{'nnUNetTrainer augmentation' if augment else 'no augmentation'}); "
                        "forward and backward through the network as in a training step"),
            "whole_image": ("each whole preprocessed case, predicted as nnU-Net predicts it (short axes padded to "
                            "the patch, sliding window with half-patch overlap and Gaussian blending) without "
                            "gradients into the network; the loss is back-propagated to its logits only"),
        },
        "statistics_from": {"tensors.csv": "patches", "histograms.csv": "patches", "eps_fractions.csv": "patches",
                            "network_gradients": "patches", "closest_to_trouble": "patches",
                            "terms.csv": "whole_image", "dominant_gradient": "whole_image",
                            "verdict": "patches and whole_image", "provenance": "the failing pass (see each entry)"},
        "network_gradients": {key: sum(r["patches"]["network_gradients"][key] for r in results)
                              for key in ("tensors", "values", "nonfinite")},
        "state": state,
        "closest_to_trouble": _headroom(tensors),
        "dominant_gradient": ({"term": str(shares.idxmax()), "share": float(shares.max()),
                               "geometric_vs_dice_ce_grad_norm": geo_norm / dc_ce_norm if dc_ce_norm else math.nan}
                              if len(shares) and shares.notna().any() else {}),
        "provenance": [dict(r["provenance"], case=r["case"], precision=r["precision"])
                       for r in results if r["provenance"]],
        "raised": [{"case": r["case"], "precision": r["precision"], **r["raised"]} for r in raised],
        "cases": n_cases,
    }
    return summary
