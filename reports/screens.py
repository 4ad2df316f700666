"""The first screen every report opens with: a few questions, each answered on one line with one number per claim,
its unit and its scope (data, size, device, precision, steps), then the one figure that carries the conclusion.

Why one shape for every report kind: a researcher who saw NaN reads the top of whichever report they were handed
and finds the verdict there; the sections below hold the evidence, which an answer links to and never restates.
Renderers build a list of ``Answer`` and may append further ones (a check another module owns) before
``first_screen`` lays them out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from . import seed
from .html import Figure, Section
from .recommendation import Recommendation
from .tables import format_eps, format_number, format_percent, setting_label

TITLE = "In one minute"
# The first screen holds at most this many answers, so that title, heading and answers fit in 12 lines.
MOST_ANSWERS = 8


@dataclass(frozen=True)
class Answer:
    """One question, its answer with the numbers, and where the evidence is (a section or a file)."""

    question: str
    answer: str
    evidence: str = ""

    def line(self) -> str:
        see = f" (evidence: {self.evidence})" if self.evidence else ""
        return f"- **{self.question}** {self.answer}{see}"


def hidden_answers(lines: Sequence[str], evidence: str) -> list[Answer]:
    """What the loss's numbers alone would hide (it read its input as the other kind, it is a constant, a guard
    hid non-finite values), as one answer; none when there is nothing."""
    return [Answer("Was the loss measured as it runs?", " ".join(lines), evidence)] if lines else []


def counted(count: int, noun: str, items: str = "") -> str:
    """``count noun`` with the noun's plural when it is not one ("1 checkpoint", "16 cases"); ``items``: the names
    after it ("datasets 501, 502")."""
    return f"{count} {noun}{'' if count == 1 else 's'}" if not items else f"{noun}{'' if count == 1 else 's'} {items}"


def scope(*parts: object) -> str:
    """What a number covers, written the same way in every report: "[501, 502; 256²; cpu; fp32; 140 steps]"."""
    return "[" + "; ".join(str(part) for part in parts if part not in (None, "")) + "]"


def first_screen(answers: Sequence[Answer], figure: Optional[Figure] = None) -> Section:
    """The report's first section: the answers, one line each, then the figure that carries the conclusion."""
    if not answers:
        raise ValueError("a first screen needs at least one answer")
    if len(answers) > MOST_ANSWERS:
        raise ValueError(f"a first screen holds at most {MOST_ANSWERS} answers, got {len(answers)}")
    return Section(TITLE, "\n".join(answer.line() for answer in answers),
                   figures=(figure,) if figure is not None else ())


def rule_pick_sentence(summary: dict, rows: pd.DataFrame) -> str:
    """The sweep of a user's bound measures bias against the loss in fp64 at the smallest swept eps, so its rule
    picks the smallest eps that stays finite and bounded: one sentence that says so (or why it picked a larger one),
    and what would make a larger eps preferable. ``summary``: the sweep's summary.json; ``rows``: its rows."""
    recommended, bound = summary["recommended"], summary["rule"]["grad_bound_used"]
    pick = setting_label(recommended["stabilizer"], recommended["eps"])
    pooled = f"pooled over {', '.join(sorted(rows['precision'].unique()))}"
    if np.isclose(recommended["eps"], rows["eps"].min()):
        return (f"{pick}, the smallest swept eps, by construction: the bias is measured against the loss in fp64 at "
                "that eps, so the rule picks the smallest eps that stays finite with max |dL/dlogit| ≤ "
                f"{bound:.4g}; a larger eps is preferable only where a smaller one gives non-finite values "
                f"or a larger gradient ({pooled}).")
    if summary.get("tie_break"):
        return (f"{pick}, by the tie-break: its median |loss bias| is within "
                f"{100 * summary['rule']['tie_tolerance']:.3g} percentage points of the least biased eligible "
                "setting's, and a tie goes to the larger eps (the smaller bound on the sqrt's derivative); a larger "
                f"eps still would be preferable only where a smaller one gave non-finite values or a larger gradient "
                f"({pooled}).")
    return (f"{pick}: every smaller swept eps gave non-finite values or a max |dL/dlogit| above "
            f"{bound:.4g} ({pooled}).")


def sweep_scope(rows: pd.DataFrame) -> str:
    """The pool every number of a sweep's first screen covers: datasets, checkpoints, cases, precisions."""
    columns = set(rows.columns)  # rows written by another geodiag may lack a column: its part is left out
    datasets = list(dict.fromkeys(rows["dataset"])) if "dataset" in columns else []
    return scope(counted(len(datasets), "dataset", ", ".join(map(str, datasets))) if datasets else None,
                 counted(rows["checkpoint"].nunique(), "checkpoint") if "checkpoint" in columns else None,
                 counted(rows["case"].nunique(), "case") + ", whole images" if "case" in columns else None,
                 f"pooled over {', '.join(sorted(rows['precision'].unique()))}")


def _setting(candidates: pd.DataFrame, setting: tuple[str, float]) -> Optional[pd.Series]:
    rows = candidates[(candidates["stabilizer"] == setting[0]) & np.isclose(candidates["eps"], setting[1])]
    return None if rows.empty else rows.iloc[0]


def sweep_answers(rec: Recommendation, rows: pd.DataFrame, verdict_section: str,
                  judge_seed_clamp: bool = True) -> list[Answer]:
    """A clamp sweep's first screen: the verdict on the seed's 1e-2 clamp (unless the sweep judges the user's own
    bound instead), what 1e-4 → 1e-2 changes, the pick and any non-finite value, every number pooled as
    ``sweep_scope`` says (the sweep's own rule pools them)."""
    bias, name, pool = rec.rule.bias_column, rec.rule.bias_name, sweep_scope(rows)
    candidates, answers = rec.candidates, []
    old, new = (_setting(candidates, version.setting) for version in seed.VERSIONS)
    label = rec.units.name(seed.V24.setting)
    verdict = rec.clamp_1e2.status.replace("_", " ")
    chosen = rec.recommended
    if judge_seed_clamp and new is not None and chosen is not None:
        answers.append(Answer(f"Is {label} justified?", (
            f"{verdict.capitalize()}: its median |{name}| is {format_percent(new[bias])} vs "
            f"{format_percent(chosen[bias])} at the pick, {setting_label(chosen['stabilizer'], chosen['eps'])}; "
            f"max |dL/dlogit| {format_number(new['max_grad_max'])} vs {format_number(chosen['max_grad_max'])} "
            f"(per logit, loss units) {pool}."), verdict_section))
    if old is not None and new is not None:
        answers.append(Answer(f"What does {format_eps(seed.V23.eps)} → {format_eps(seed.V24.eps)} change?", (
            f"max |dL/dlogit| {format_number(old['max_grad_max'])} → {format_number(new['max_grad_max'])} "
            f"(×{format_number(new['max_grad_max'] / old['max_grad_max'])}); median |{name}| "
            f"{format_percent(old[bias])} → {format_percent(new[bias])}; non-finite values {int(old['nonfinite'])} "
            f"→ {int(new['nonfinite'])}."), verdict_section))
    total = int(candidates["nonfinite"].sum())
    answers.append(Answer("Did any setting give NaN or Inf?", (
        f"{'No' if total == 0 else 'Yes'}: {total} non-finite loss or gradient values over {len(rows)} evaluations "
        f"of {len(candidates)} settings."), "Headline table"))
    return answers
