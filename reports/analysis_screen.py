"""The checkpoint analysis' first screen: is the checkpoint healthy, where it is closest to a dtype's limit, whether
the loss analysed moves the step, and what to do next; each answer with its numbers, units and scope (checkpoint,
cases, patch size, device, precisions) read from summary.json.
"""
from __future__ import annotations

from typing import Optional

from .screens import Answer, scope
from .tables import format_number


def _scope(summary: dict) -> str:
    checkpoint, settings = summary.get("checkpoint") or {}, summary.get("settings") or {}
    patch = settings.get("patch_size")
    return scope(f"epoch {checkpoint.get('epoch')} of {checkpoint.get('trainer_name')}",
                 f"{summary.get('cases')} cases", "×".join(map(str, patch)) + " patches" if patch else None,
                 settings.get("device"), ", ".join(settings.get("precisions") or []))


def health(summary: dict, meaning: str) -> Answer:
    verdict = str(summary.get("verdict")).replace("_", " ")
    reason = summary.get("verdict_reason") or "no reason recorded"
    return Answer("Is this checkpoint healthy?", f"{verdict.capitalize()}: {reason} {_scope(summary)}. {meaning}",
                  "Verdict")


def closest(summary: dict) -> Optional[Answer]:
    found = summary.get("closest_to_trouble") or {}
    if found.get("tensor") is None:
        return None
    return Answer("How close is it to a dtype's limit?", (
        f"{format_number(found.get('headroom_decades'), 2)} decades of headroom: `{found['tensor']}` "
        f"({found.get('kind')}, {found.get('precision')}), {found.get('quantity')} = "
        f"{format_number(found.get('value'))} against {format_number(found.get('limit'))}."), "Closest to trouble")


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
