"""check-bounds' outcomes for people and for CI: a fixed-width table, the tolerances in words, and JUnit XML."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence
from xml.etree import ElementTree

from geodiag.reports.schema import FP16_MAX, GRAD_SCALER_INITIAL_SCALE

from .baseline import Tolerance
from .checks import BASELINE_CHECKS, AT_BOUND_CHECK, Outcome

# ---------------------------------------------------------------------------------------------- output
_COLUMNS = ("case", "setting", "prec", "loss", "max|g|", "L2|g|", "nonfin", "fp16 headroom", "max|dP/dp|",
            "zero|g|", "at-bound", "failed", "status")
_MEANING = {"grad_max": "growth of max |dL/dlogits|", "grad_l2": "growth of its L2 norm",
            "grad_l2_drop": "fall of its L2 norm", "loss": "drift of the loss value",
            "zero_grad": "rise of the share of dL/dlogits elements exactly 0",
            "at_bound": "rise of the share of a clamp's elements held at its bound (--loss)"}


def headroom_legend() -> str:
    """What the headroom column counts, in its unit, printed under the table."""
    return (f"fp16 headroom: how many times max|g| can double (x2^N) before max|g| x {GRAD_SCALER_INITIAL_SCALE:g}, "
            f"GradScaler's initial scale, passes fp16's {FP16_MAX:g} (nnU-Net's CUDA training; a what-if for a run "
            "in fp32 without a scaler); below x2^0 the first scaled step overflows.")


def _headroom(doublings: float) -> str:
    return "-" if math.isnan(doublings) else f"x2^{doublings:.1f}"


def _percent(share: float) -> str:
    return "-" if share is None or not math.isfinite(share) else f"{100 * share:.1f}%"


def _failed(outcome: Outcome) -> str:
    """The quantities a row failed on (the tolerance's name for a comparison with the baseline)."""
    names = [r.tolerance or r.quantity for r in outcome.regressions] + (["raised"] if outcome.error else [])
    return ",".join(dict.fromkeys(names)) or "-"


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A fixed-width table, one row per case x setting x precision; ``at-bound`` is the largest share of a clamp
    site's elements held at its bound (a user's loss), ``failed`` names what the row failed on."""
    rows = [_COLUMNS]
    for o in outcomes:
        m = o.measurement
        perimeter = "-" if m.perimeter_grad_max is None else f"{m.perimeter_grad_max:.4f}/{m.perimeter_bound:.4f}"
        at_bound = max(m.clamp_at_bound.values()) if m.clamp_at_bound else None
        status = ("skipped" if o.skipped else "FAIL" if not o.passed else "ok" if o.baselined else "ok*")
        rows.append((m.case, m.setting, m.precision, f"{m.loss:.4g}", f"{m.grad_max:.3e}", f"{m.grad_l2:.3e}",
                     f"{m.loss_nonfinite}/{m.grad_nonfinite}", _headroom(m.headroom_log2), perimeter,
                     _percent(m.zero_grad_fraction), _percent(at_bound), _failed(o), status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_tolerance(name: str, tolerance: Tolerance) -> str:
    """One tolerance in words: its name, the change it allows (the larger of the two), what it limits."""
    check = next(c for c in (*BASELINE_CHECKS, AT_BOUND_CHECK) if c.tolerance == name)
    return f"{name} {check.allowance(tolerance)}: {_MEANING[name]}"


def format_tolerances(tolerances: Mapping[str, Tolerance]) -> str:
    """The tolerances a run was checked with, one per line, as printed beside the results."""
    return "\n".join(f"  {describe_tolerance(name, t)}" for name, t in tolerances.items())


def write_junit(outcomes: Sequence[Outcome], path: str | Path, suite: str = "geodiag.check-bounds",
                tolerances: Optional[Mapping[str, Tolerance]] = None) -> None:
    """JUnit XML: one testcase per case x setting x precision, a failure element per failing one naming each
    quantity, its baseline, its value now and the tolerance; the tolerances as the suite's properties."""
    failures = sum(not o.passed for o in outcomes)
    skipped = sum(o.skipped is not None for o in outcomes)
    seconds = sum(o.measurement.seconds for o in outcomes)
    root = ElementTree.Element("testsuites", tests=str(len(outcomes)), failures=str(failures), errors="0",
                               time=f"{seconds:.3f}")
    node = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(outcomes)),
                                  failures=str(failures), errors="0", skipped=str(skipped), time=f"{seconds:.3f}")
    if tolerances:
        properties = ElementTree.SubElement(node, "properties")
        for name, tolerance in tolerances.items():
            ElementTree.SubElement(properties, "property", name=f"tolerance.{name}",
                                   value=describe_tolerance(name, tolerance))
    for o in outcomes:
        m = o.measurement
        case = ElementTree.SubElement(node, "testcase", classname=f"{suite}.{m.case}",
                                      name=f"{m.setting}/{m.precision}", time=f"{m.seconds:.3f}")
        if o.skipped:
            ElementTree.SubElement(case, "skipped", message=o.skipped)
        elif o.error:
            ElementTree.SubElement(case, "failure", message=o.error, type="LossRaised").text = o.error
        elif o.regressions:
            failure = ElementTree.SubElement(case, "failure", message="; ".join(map(str, o.regressions)),
                                             type="GradientBound")
            failure.text = "\n".join(map(str, o.regressions))
    ElementTree.indent(root)
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
