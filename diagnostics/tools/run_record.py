"""The output folder of a resumable run: checked and opened once for every tool, and what its per-case files were
computed with, kept beside them (DIR/settings.json).

A resumed run reuses finished cases only when they were computed with the settings of the run that resumes them:
otherwise the merged tables would mix two settings under one set of labels.
"""
from __future__ import annotations

import json
from pathlib import Path

from geodiag.reports import schema

from ..instruments.errors import ArgumentError

SETTINGS_FILE = "settings.json"


def check_out(out: str | Path) -> Path:
    """``out`` as a Path; refused when it exists and is not a folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"{{out}} {out} exists and is not a folder", "out")
    return out


def open_cases(out: Path, results: str, holds: str, resume: bool) -> tuple[Path, bool]:
    """Create OUT/cases; return it and whether it already holds results (files matching ``results``), which only a
    resumed run may continue. ``holds`` names them in the refusal ("an analysis")."""
    case_dir = out / "cases"
    try:
        case_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"cannot write to {{out}} {out}: {exc.strerror}", "out") from None
    has_results = any(case_dir.glob(results))
    if not resume and has_results:
        raise ArgumentError(f"{out} already holds {holds}; pass {{resume}} to continue it or use a new {{out}}",
                            "resume", "out")
    return case_dir, has_results


def check_and_record(out: Path, settings: dict, resume: bool, has_results: bool) -> None:
    """Refuse (one line naming every changed setting) to resume results computed with other ``settings``;
    record ``settings`` for the next resume."""
    path = out / SETTINGS_FILE
    wanted = json.loads(json.dumps(settings))
    if resume and has_results:
        if not path.exists():
            raise ArgumentError(f"{{resume}}: {out} holds no {SETTINGS_FILE} saying what its cases were computed with; "
                               "use a new {out}", "resume", "out")
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ArgumentError(f"{{resume}}: cannot read {path}: {exc}", "resume") from None
        changed = [f"{key} was {recorded.get(key)} and is now {value}" for key, value in wanted.items()
                   if recorded.get(key) != value]
        if changed:
            raise ArgumentError(f"{{resume}}: {out} was computed with other settings ({'; '.join(changed)}); "
                               "use a new {out} or the same settings", "resume", "out")
    schema.write_json(path, wanted)
