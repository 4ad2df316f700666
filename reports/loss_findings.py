"""First-screen lines on what a finiteness verdict does not show about the loss analysed or swept: it read its
input as the other kind (probabilities normalised again, logits read as probabilities), it was a constant in a
precision, or a guard hid the non-finite values it computed.

Why: each leaves the loss and its gradient finite, so "healthy" and "no non-finite value" stay true, while the
loss trains nothing (a constant sends no gradient) or measures another map than the one it was written for. Each
line function returns one line; ``constant_groups`` is the one test of constancy, used by the analysis (which
stores it in summary.json) and by the sweeps' reports.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

from .tables import format_eps

# Values within this relative distance of each other (relative to the largest magnitude) count as one constant.
CONSTANT_RELATIVE = 1e-6
# How the reports spell the input kind a loss should be given (``--loss-input``).
LOSS_INPUT_FLAG = {"logits": "`--loss-input logits`",
                   "probabilities": "`--loss-input probabilities` (the default: nnU-Net's softmax over channels)"}
_READS = {"softmax": "applies softmax over the channel axis to its input", "log_softmax": "applies log_softmax over "
          "the channel axis to its input", "sigmoid": "applies sigmoid to its input", "log": "takes the log of its "
          "input", "log2": "takes the log2 of its input", "log10": "takes the log10 of its input",
          "clamp": "clamps its input into [0, 1]"}


def constant_value(values: Sequence[float]) -> Optional[float]:
    """The first value when there are at least two, all finite and within ``CONSTANT_RELATIVE`` of it (relative to
    the largest magnitude; all zero counts as constant), else None."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    largest = max(abs(v) for v in values)
    return values[0] if all(abs(v - values[0]) <= CONSTANT_RELATIVE * largest for v in values) else None


def constant_groups(rows: Iterable[Mapping], keys: Sequence[str], value: str = "loss",
                    case: str = "case") -> list[dict]:
    """Per group of ``keys`` (the precision first, then what else is held fixed: the pass, the swept eps) whose
    rows cover at least two cases: ``{**keys, value, cases}`` when the loss there is a constant. A missing value (a
    non-finite loss, null in JSON) is not a constant."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    found = []
    for key, members in groups.items():
        constant = constant_value([math.nan if m[value] is None else float(m[value]) for m in members])
        cases = len({m[case] for m in members})
        if constant is not None and cases >= 2:
            found.append({**dict(zip(keys, key)), "value": constant, "cases": cases})
    return found


def by_precision(entries: Iterable[Mapping]) -> dict[str, list]:
    """Entries grouped by their precision, in order of first appearance."""
    grouped: dict[str, list] = {}
    for entry in entries:
        grouped.setdefault(str(entry["precision"]), []).append(entry)
    return grouped


def misread_input_line(rows: Sequence[Mapping]) -> Optional[str]:
    """One line naming the lines where the loss read its input as the other kind, and the input to give it."""
    if not rows:
        return None
    given, read_as = rows[0]["given"], rows[0]["read_as"]
    sites = list(dict.fromkeys(f"{_READS.get(r['op'], r['op'])} at `{r['site']}`" for r in rows))
    precisions = ", ".join(dict.fromkeys(str(r["precision"]) for r in rows if "precision" in r))
    return (f"**Input read as {read_as}:** the loss was given {given} and {'; '.join(sites)}"
            + (f" (in {precisions})" if precisions else "") + f": it computes on another map than the one it was "
            f"written for, while every figure here stays finite. Give it {read_as}: run with "
            f"{LOSS_INPUT_FLAG[read_as]}.")


def constant_loss_line(precision: str, groups: Sequence[Mapping]) -> str:
    """One line: the loss is a constant in ``precision``, with its value, over how many cases, and where."""
    values = sorted({g["value"] for g in groups})
    value = f"{values[0]:.10g}" if len(values) == 1 else f"{values[0]:.10g} to {values[-1]:.10g} (one per group)"
    held = [", ".join(_held(k, v) for k, v in g.items() if k not in ("precision", "value", "cases")) for g in groups]
    held = [h for h in dict.fromkeys(held) if h]
    where = "; ".join(held[:3]) + (f"; and {len(held) - 3} more" if len(held) > 3 else "")
    return (f"**Constant loss in {precision}:** {value} on every one of {max(g['cases'] for g in groups)} cases"
            + (f" ({where})" if where else "") + f", equal to within a relative {CONSTANT_RELATIVE:g}: a constant "
            f"sends no gradient, so in {precision} this loss trains nothing. Look for a value that overflows or "
            "saturates there, and a guard that hides it.")


def masked_sites_line(precision: str, rows: Sequence[Mapping]) -> str:
    """One line from an analysis's masked_nonfinite rows of ``precision``: how many outputs, at which sites."""
    calls = sum(int(r["calls"]) for r in rows)
    sites = list(dict.fromkeys(f"`{r['site']}` ({r['op']})" for r in rows))
    return (f"**Masked non-finite values in {precision}:** {calls} op output(s) held NaN/Inf in loss calls whose "
            f"value was finite, at {', '.join(sites[:3])}" + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")
            + ": a guard or a later op hid them, so the verdict, which reads the loss and its gradient, does not "
            "count them.")


def masked_counts_line(precision: str, counts: Sequence[float]) -> str:
    """One line from a sweep's per-evaluation masked_nonfinite counts of ``precision``."""
    hit = [c for c in counts if c > 0]
    return (f"**Masked non-finite values in {precision}:** {len(hit)} of {len(counts)} evaluations computed NaN/Inf "
            f"that the loss's value did not show (up to {int(max(hit))} op output(s) per evaluation): a guard or a "
            "later op hid them, so \"no non-finite value\" below does not cover them; analyze-checkpoint with the "
            "same loss names their lines.")


def _held(key: str, value) -> str:
    if key == "eps":
        return f"eps {format_eps(float(value))}"
    return f"{key} {value}"


def sweep_findings(rows: Sequence[Mapping], settings: Sequence[str]) -> tuple[list[str], dict]:
    """A sweep's first-screen lines, per precision, and the same facts for its summary.json: where the loss is a
    constant over the cases of a checkpoint with the precision and the swept ``settings`` columns held fixed, and
    the evaluations whose masked_nonfinite count (a column only the sweep of a user's loss has) is not zero."""
    checkpoints = ("checkpoint",) if len({row["checkpoint"] for row in rows}) > 1 else ()
    constant = by_precision(constant_groups(rows, ("precision", *checkpoints, *settings)))
    counts: dict[str, list] = {}
    for row in rows:
        masked = row.get("masked_nonfinite")
        if masked is not None and math.isfinite(float(masked)):
            counts.setdefault(str(row["precision"]), []).append(float(masked))
    masked = {precision: values for precision, values in counts.items() if any(v > 0 for v in values)}
    lines = precision_lines(constant, masked, masked_counts_line)
    facts = {"constant_loss": [entry for entries in constant.values() for entry in entries],
             "masked_nonfinite_evaluations": {precision: sum(v > 0 for v in values)
                                              for precision, values in masked.items()}}
    return lines, facts


def precision_lines(constant: Mapping[str, list], masked: Mapping[str, list], masked_line) -> list[str]:
    """Per precision (in order of first appearance), its constant-loss line and its masked line (``masked_line``
    of that precision's masked entries), where it has them."""
    lines = []
    for precision in dict.fromkeys([*constant, *masked]):
        if precision in constant:
            lines.append(constant_loss_line(precision, constant[precision]))
        if precision in masked:
            lines.append(masked_line(precision, masked[precision]))
    return lines
