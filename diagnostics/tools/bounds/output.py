"""check-bounds' outcomes for people and for CI: a fixed-width table and JUnit XML."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence
from xml.etree import ElementTree

from .checks import Outcome

# ---------------------------------------------------------------------------------------------- output
_COLUMNS = ("case", "setting", "prec", "loss", "max|g|", "L2|g|", "nonfin", "headroom", "max|dP/dp|", "status")


def format_table(outcomes: Sequence[Outcome]) -> str:
    """A fixed-width table, one row per case x setting x precision."""
    rows = [_COLUMNS]
    for o in outcomes:
        m = o.measurement
        perimeter = "-" if m.perimeter_grad_max is None else f"{m.perimeter_grad_max:.4f}/{m.perimeter_bound:.4f}"
        status = ("skipped" if o.skipped else "FAIL" if not o.passed else "ok" if o.baselined else "ok*")
        rows.append((m.case, m.setting, m.precision, f"{m.loss:.4g}", f"{m.grad_max:.3e}", f"{m.grad_l2:.3e}",
                     f"{m.loss_nonfinite}/{m.grad_nonfinite}", f"{m.headroom_log2:+.1f}", perimeter, status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_junit(outcomes: Sequence[Outcome], path: str | Path, suite: str = "geodiag.check-bounds") -> None:
    """JUnit XML: one testcase per case x setting x precision, a failure element per failing one."""
    failures = sum(not o.passed for o in outcomes)
    skipped = sum(o.skipped is not None for o in outcomes)
    seconds = sum(o.measurement.seconds for o in outcomes)
    root = ElementTree.Element("testsuites", tests=str(len(outcomes)), failures=str(failures), errors="0",
                               time=f"{seconds:.3f}")
    node = ElementTree.SubElement(root, "testsuite", name=suite, tests=str(len(outcomes)),
                                  failures=str(failures), errors="0", skipped=str(skipped), time=f"{seconds:.3f}")
    for o in outcomes:
        m = o.measurement
        case = ElementTree.SubElement(node, "testcase", classname=f"{suite}.{m.case}",
                                      name=f"{m.setting}/{m.precision}", time=f"{m.seconds:.3f}")
        if o.skipped:
            ElementTree.SubElement(case, "skipped", message=o.skipped)
        elif o.error:
            ElementTree.SubElement(case, "failure", message=o.error, type="LossRaised").text = o.error
        elif o.regressions:
            failure = ElementTree.SubElement(case, "failure", message=str(o.regressions[0]), type="GradientBound")
            failure.text = "\n".join(map(str, o.regressions))
    ElementTree.indent(root)
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
