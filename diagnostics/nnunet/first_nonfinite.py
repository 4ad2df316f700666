"""``first_nonfinite.json`` and ``first_nonfinite.md``: the first bad step of a watched run, explained.

The document joins what the guard saw live (which quantity went bad, with its value) with what the replay of that
step found (the producing op, its phase and its ``file:line`` in the trainer's code, and the classification).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from geodiag.reports import schema

JSON_FILE = "first_nonfinite.json"
MARKDOWN_FILE = "first_nonfinite.md"
# What the guard saw -> the phase reported when no replay names one.
EVENT_PHASES = {"scale": "scaler", "weights": "optimizer", "momentum": "optimizer"}


def build(record, *, epoch: int, cases: list[str], replay: Optional[dict], action: str, step_folder: Path,
          last_good: Optional[str], scale_floor: float) -> dict:
    """The first_nonfinite.json document for a guard ``StepRecord`` and its replay (None when none could run)."""
    first = next((run for run in (replay or {}).get("runs", []) if run["nonfinite"]), None) or {}
    fallback = "forward" if record.event == "loss" else "backward"  # replay flagged no op: the guard's own reading
    phase = EVENT_PHASES.get(record.event) or first.get("phase") or fallback
    return {
        "iteration": record.iteration, "epoch": epoch, "cases": cases,
        "trigger": record.event, "phase": phase,
        "op": first.get("op"), "aten_op": first.get("aten_op"), "node": first.get("node"),
        "module": first.get("module"), "site": first.get("site"), "source": first.get("source"),
        "dtype": first.get("dtype"), "inputs": first.get("inputs", []), "outputs": first.get("outputs", []),
        "seen_live": {"loss": _number(record.loss), "grad_norm": _number(record.grad_norm),
                      "scale": _number(record.scale), "scale_floor": scale_floor,
                      "nonfinite_weight_tensors": record.nonfinite_weights,
                      "nonfinite_momentum_tensors": record.nonfinite_momentum},
        "replay": replay,
        "action": action, "step_folder": str(step_folder), "last_good": last_good,
    }


def _number(value: float) -> Optional[float | str]:
    """Strict JSON: NaN/Inf as strings."""
    return value if math.isfinite(value) else str(value) if not math.isnan(value) else "nan"


def write(folder: Path, document: dict) -> Path:
    schema.write_json(folder / JSON_FILE, document)
    schema.write_text(folder / MARKDOWN_FILE, markdown(document))
    return folder / JSON_FILE


def markdown(document: dict) -> str:
    """The Markdown report: what happened, where, what the replay says, what was saved."""
    lines = [f"# First non-finite step: iteration {document['iteration']} (epoch {document['epoch']})", "",
             f"- Seen live: non-finite **{document['trigger']}** (loss {document['seen_live']['loss']}, gradient "
             f"norm {document['seen_live']['grad_norm']}, GradScaler scale {document['seen_live']['scale']})",
             f"- Phase: **{document['phase']}**; op: **{document['op'] or 'not named'}**"
             + (f" ({document['aten_op']} in {document['node']})" if document["node"] else ""),
             f"- Site: `{document['site'] or 'unknown'}`"
             + (f" — `{document['source']}`" if document["source"] else ""),
             f"- Module: {document['module'] or '—'}; dtype: {document['dtype'] or '—'}",
             f"- Cases in the batch: {', '.join(document['cases']) or '—'}", ""]
    if document["inputs"]:
        lines += ["| input | dtype | shape | max abs finite | NaN | +Inf | -Inf | origin |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {i} | {t['dtype']} | {t['shape']} | {t['max_abs_finite']} | {t['nan']} | {t['posinf']} | "
                  f"{t['neginf']} | {t['origin']} |" for i, t in enumerate(document["inputs"])]
        lines.append("")
    replay = document["replay"]
    if replay is None:
        lines += ["Not replayed: the state itself was non-finite before the step (nothing to localise in it).", ""]
    elif not replay["runs"]:
        lines += [f"## Replay: **{replay['classification']}**", "", replay["explanation"], ""]
    else:
        lines += [f"## Replay: **{replay['classification']}**", "", replay["explanation"], "",
                  "Non-finite values " + ("reach" if replay["reaches_parameter_gradients"] else "do not reach")
                  + " the parameters' gradients.", "",
                  "| run | loss | non-finite | phase | op | site | parameter gradients non-finite |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['loss']:.6g} | {r['nonfinite']} | {r['phase'] or '—'} | "
                  f"{r['op'] or '—'} | {r['site'] or '—'} | {r['nonfinite_parameter_gradients']} |"
                  for r in replay["runs"]]
        lines.append("")
    lines += [f"Action: {document['action']}. Saved step: `{document['step_folder']}` (replay it with "
              f"`geodiag replay {document['step_folder']}`); last good state: "
              f"`{document['last_good'] or 'none written'}`.", ""]
    return "\n".join(lines)
