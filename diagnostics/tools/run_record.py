"""What a resumable run's per-case files were computed with, kept beside them (DIR/settings.json).

``--resume`` reuses finished cases only when they were computed with the settings of the run that resumes them:
otherwise the merged tables would mix two settings under one set of labels.
"""
from __future__ import annotations

import json
from pathlib import Path

from geodiag.reports import schema

from ..instruments.errors import GeodiagError

SETTINGS_FILE = "settings.json"


def check_and_record(out: Path, settings: dict, resume: bool, has_results: bool) -> None:
    """Refuse (one line naming every changed setting) to resume results computed with other ``settings``;
    record ``settings`` for the next resume."""
    path = out / SETTINGS_FILE
    wanted = json.loads(json.dumps(settings))
    if resume and has_results:
        if not path.exists():
            raise GeodiagError(f"--resume: {out} holds no {SETTINGS_FILE} saying what its cases were computed with; "
                               "use a new --out")
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise GeodiagError(f"--resume: cannot read {path}: {exc}") from None
        changed = [f"{key} was {recorded.get(key)} and is now {value}" for key, value in wanted.items()
                   if recorded.get(key) != value]
        if changed:
            raise GeodiagError(f"--resume: {out} was computed with other settings ({'; '.join(changed)}); "
                               "use a new --out or the same settings")
    schema.write_json(path, wanted)
