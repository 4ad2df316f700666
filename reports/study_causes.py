"""The study report's last answer (question 6): each candidate cause of the seed's NaN, what the study measured
about it, the test that reproduces it, and the command that tells it apart on a user's own run.

The test files named here are checked to exist by tests/test_cited_tests.py.
"""
from __future__ import annotations

from dataclasses import dataclass
import pandas as pd

from . import seed
from .html import Section
from .study_answers import raising
from .study_tables import StudyTables, user_run_names
from .tables import markdown_table


@dataclass(frozen=True)
class Cause:
    """A candidate cause; ``applicable`` is False when the study's setup rules it out by construction."""

    candidate: str
    here: str
    reproduced_in: str
    tell_apart: str
    applicable: bool = True


def _measured(tables: StudyTables, sites: pd.DataFrame, clamps: pd.DataFrame) -> dict[str, str]:
    """What the study measured about each cause, as the words of the table's "here" column."""
    by_precision = {}
    if not sites.empty:
        for precision, frame in sites.groupby("precision"):
            by_precision[precision] = int(frame["nonfinite_forward"].sum() + frame["nonfinite_backward"].sum())
    low_precision = ", ".join(f"{p}: {n}" for p, n in by_precision.items() if p != "fp32") or "not analysed"
    users = user_run_names(tables.study)
    return {
        "sqrt_backward": str(int(clamps["nonfinite_backward"].sum()) if not clamps.empty else 0),
        "precision": (f"non-finite values at the replica's sites by precision ({low_precision}); "
                      + ("; ".join(f"the loss raises under {r}" for r in raising(tables.precisions))
                         or "no precision raised")
                      + "; the seed's train_step has no autocast"),
        "masked": str(int(sites["masked_calls"].sum()) if not sites.empty else 0),
        "steps": str(int(tables.runs.loc[tables.runs["run"].isin(users), "nonfinite_steps"].fillna(0).sum())),
    }


def causes(tables: StudyTables, sites: pd.DataFrame, clamps: pd.DataFrame) -> list[Cause]:
    measured = _measured(tables, sites, clamps)
    return [
        Cause("sqrt at s = 0 without a clamp (backward 0·∞ = NaN)",
              "the replica clamps both sqrt inputs; non-finite backward at its sqrt clamps: "
              f"{measured['sqrt_backward']}",
              "tests/test_watch.py (a researcher's trainer with an unprotected sqrt)",
              "`geodiag watch -- nnUNetv2_train …`: first_nonfinite.json names phase backward, op sqrt and the line"),
        Cause("fp16/bf16 overflow of pixel-unit moments or s under autocast (nnU-Net's default CUDA path)",
              measured["precision"], "tests/test_own_loss_*.py (check-bounds on fp16/bf16 inputs)",
              "`geodiag analyze-checkpoint last_good.pth --loss FILE.py:NAME --precision fp32,bf16,fp16`; "
              "`geodiag replay STEP --device cuda` (maths, precision or scaler)"),
        Cause("a non-finite term hidden by NaN→0 masking, its gradient still NaN",
              f"masked calls at the replica's sites: {measured['masked']}",
              "tests/test_autotaps.py (masked non-finite values)",
              "the sites table of `analyze-checkpoint --loss` (`masked_calls`, `nonfinite_backward`)"),
        Cause("one Inf gradient element turned into NaN weights by clip_grad_norm_ and SGD momentum",
              f"non-finite training steps of the replica: {measured['steps']}",
              "tests/test_trainer.py (nnU-Net's own CPU train_step writes the NaN)",
              "watch's iterations_epoch_*.csv (grad_norm, nonfinite weights/momentum) and `--on-nonfinite skip`"),
        Cause(f"a stale trainer copy in site-packages (the seed's warm-up {seed.WARMUP} instead of "
              f"{seed.WARMUP_INTENDED})",
              "not applicable: the study resolves the replica from its folder only", "tests/test_environment.py",
              "`geodiag doctor --trainer NAME` (which file nnU-Net resolves, its settings)", applicable=False),
    ]


def causes_section(tables: StudyTables, sites: pd.DataFrame, clamps: pd.DataFrame) -> tuple[Section, str]:
    """Q6: which candidate causes of the seed's NaN remain, and what a user runs to tell them apart."""
    found = causes(tables, sites, clamps)
    table = pd.DataFrame([{"candidate": c.candidate, "here": c.here, "reproduced in the tests": c.reproduced_in,
                           "tell it apart": c.tell_apart} for c in found])
    remaining = [c.candidate for c in found if c.applicable]
    body = ("Each candidate cause of the seed's NaN, what this study measured about it, where the test suite "
            "reproduces it, and the command that tells it apart on a user's own run. None of them is excluded for "
            "the seed's own GPU run by a CPU study at this size: the study shows which of them the seed's design "
            "triggers here.\n\n" + markdown_table(table))
    excluded = [c.candidate for c in found if not c.applicable]
    answer = (f"Not reproduced here, so still open for the seed's run: {len(remaining)} of the {len(found)} candidates "
              "in the table" + (f" ({'; '.join(excluded)}: ruled out by the study's setup)" if excluded else "") + "; "
              "`geodiag watch` on the user's run names the first non-finite op, line and phase, and its replay "
              "separates maths from precision from scaler.")
    return (Section("Which causes of the seed's NaN remain, and how to tell them apart", answer + "\n\n" + body,
                    numbered=True), answer)
