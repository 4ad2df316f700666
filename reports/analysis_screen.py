"""The checkpoint analysis' first screen: is the checkpoint healthy, where it is closest to a dtype's limit, whether
the loss analysed moves the step, and what to do next; each answer with its numbers, units and scope (checkpoint,
cases, patch size, device, precisions) read from summary.json.
"""
from __future__ import annotations

import math
from typing import Optional

import pandas as pd

from .schema import FP16_MAX, FP16_SMALLEST_SUBNORMAL, FP32_MAX, GRAD_SCALER_INITIAL_SCALE, HEALTHY
from .screens import Answer, scope
from .tables import format_number

# More exact zeros in fp16 than in fp32 by this share of a tensor's elements is worth a line on the first screen.
UNDERFLOW_SHARE = 0.01


def _scope(summary: dict) -> str:
    checkpoint, settings = summary.get("checkpoint") or {}, summary.get("settings") or {}
    patch = settings.get("patch_size")
    return scope(f"epoch {checkpoint.get('epoch')} of {checkpoint.get('trainer_name')}",
                 f"{summary.get('cases')} cases", "×".join(map(str, patch)) + " patches" if patch else None,
                 settings.get("device"), ", ".join(settings.get("precisions") or []))


def health(summary: dict, meaning: str) -> Answer:
    """The verdict, its reason and scope, and what it means unless that only restates a healthy reason."""
    verdict = str(summary.get("verdict")).replace("_", " ")
    reason = summary.get("verdict_reason") or "no reason recorded"
    meaning = "" if summary.get("verdict") == HEALTHY else f" {meaning}"
    return Answer("Is this checkpoint healthy?", f"{verdict.capitalize()}: {reason} {_scope(summary)}.{meaning}",
                  "Verdict")


def closest(summary: dict) -> Optional[Answer]:
    found = summary.get("closest_to_trouble") or {}
    if found.get("tensor") is None:
        return None
    value, limit = found.get("value"), found.get("limit")
    producer = (f"`{found['tensor']}` ({found.get('kind')}, {found.get('precision')}), {found.get('quantity')} = "
                f"{format_number(value)} against {format_number(limit)}")
    fp16_limit = limit is not None and (limit == FP16_MAX or math.isclose(limit, FP16_MAX / GRAD_SCALER_INITIAL_SCALE))
    if (summary.get("state") or {}).get("grad_scaler_scale", math.nan) is None and fp16_limit and value:
        return Answer("How close is it to a dtype's limit?", (  # no scaler: fp32 is the run's own limit
            f"{format_number(math.log10(FP32_MAX / value), 2)} decades of headroom in the run's own fp32 (no "
            f"GradScaler): `{found['tensor']}` ({found.get('kind')}), max {format_number(value)}; what-if under "
            f"fp16 autocast with a GradScaler at {GRAD_SCALER_INITIAL_SCALE:g}: "
            f"{format_number(found.get('headroom_decades'), 2)} decades ({producer})."), "Closest to trouble")
    return Answer("How close is it to a dtype's limit?", (
        f"{format_number(found.get('headroom_decades'), 2)} decades of headroom: {producer}."), "Closest to trouble")


def loss_role(summary: dict) -> Optional[Answer]:
    role = summary.get("loss_role") or {}
    if not role.get("role"):
        return None
    return Answer("Does the loss analysed move the step?", (
        f"{role['role'].capitalize()}: its share of the step's gradient is {format_number(role.get('share'))} "
        f"(a fraction of 1; median over {role.get('samples')} training patches in {role.get('precision')}, single "
        f"patches {format_number(role.get('share_min'))} to {format_number(role.get('share_max'))}; inert below "
        f"{format_number(role.get('inert_below'))} in magnitude)."), "Verdict")


def next_step(text: str) -> Answer:
    return Answer("What next?", text)


def fp16_zero_gradients(tensors: pd.DataFrame) -> Optional[Answer]:
    """Why a tensor's fp16 gradients are exactly zero, when more than ``UNDERFLOW_SHARE`` of them are beyond fp32's
    zeros: the tensor whose gradient has the most more zeros in fp16 than in fp32, and whether fp32's values below
    fp16's smallest subnormal account for them (underflow of the unscaled loss's gradient; nnU-Net's GradScaler
    would multiply it by 65536 first)."""
    grads = tensors[tensors["kind"] == "grad"].set_index(["tensor", "precision"])
    if not {"fp16", "fp32"} <= set(tensors["precision"]):
        return None
    names = [n for n in dict.fromkeys(tensors["tensor"]) if (n, "fp16") in grads.index and (n, "fp32") in grads.index]
    extra = {n: grads.loc[(n, "fp16"), "zero"] - grads.loc[(n, "fp32"), "zero"] for n in names}
    if not extra or max(extra.values()) <= UNDERFLOW_SHARE * grads.loc[(max(extra, key=extra.get), "fp16"), "count"]:
        return None
    name = max(extra, key=extra.get)
    half, single = grads.loc[(name, "fp16")], grads.loc[(name, "fp32")]
    explained = abs(single["zero"] + single["fp16_underflow"] - half["zero"]) <= UNDERFLOW_SHARE * half["count"]
    why = (f"in fp32, {int(single['fp16_underflow']):,} lie below fp16's smallest subnormal "
           f"({FP16_SMALLEST_SUBNORMAL:.3g}) and so underflow to zero in fp16: the analysis back-propagates the "
           f"unscaled loss (nnU-Net's GradScaler multiplies it by {GRAD_SCALER_INITIAL_SCALE:g} first)" if explained
           else f"fp16 underflow explains only {int(single['fp16_underflow']):,} of them")
    share = f"{100 * half['zero'] / half['count']:.3g}%"
    return Answer(f"Why are {share} of the fp16 `{name}` gradients exactly zero?", (
        f"{int(half['zero']):,} of {int(half['count']):,} are exactly zero in fp16 vs {int(single['zero']):,} in "
        f"fp32; {why}."), "Tensors in fp16")
