"""The committed baseline (``bounds_baseline.json`` beside this package): measurements keyed by case, setting and
precision, the tolerances they are checked with, and its line-per-entry file format."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from ...instruments.errors import ArgumentError, GeodiagError
from .measurement import Measurement

BASELINE_PATH = Path(__file__).with_name("bounds_baseline.json")
BASELINE_FORMAT = 1


# ---------------------------------------------------------------------------------------------- baseline
@dataclass(frozen=True)
class Tolerance:
    """Allowed growth over the baseline: the larger of ``rel`` x baseline and ``abs``."""

    rel: float
    abs: float

    def limit(self, baseline: float) -> float:
        return baseline + max(self.rel * baseline, self.abs)


# 10%: well above the spread between runs, precisions and CPUs (bf16 vs fp32 differ by up to 6%), well below a
# doubling. The absolute floor keeps gradients that are zero up to rounding (1e-28 on a full mask) from failing.
DEFAULT_TOLERANCES = {"grad_max": Tolerance(rel=0.10, abs=1e-8), "grad_l2": Tolerance(rel=0.10, abs=1e-8)}
BASELINE_QUANTITIES = ("loss", "grad_max", "grad_l2", "loss_nonfinite", "grad_nonfinite", "headroom_log2",
                       "perimeter_grad_max")


@dataclass
class Baseline:
    """Committed measurements keyed by (case, setting, precision), with the tolerances they are checked with."""

    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    entries: dict[tuple[str, str, str], dict[str, Optional[float]]] = field(default_factory=dict)
    generated_with: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Baseline":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != BASELINE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {BASELINE_FORMAT}")
            tolerances = {q: Tolerance(float(t["rel"]), float(t["abs"])) for q, t in data["tolerances"].items()}
            entries = {(e["case"], e["setting"], e["precision"]): {q: e.get(q) for q in BASELINE_QUANTITIES}
                       for e in data["entries"]}
        except FileNotFoundError:
            raise ArgumentError(f"baseline {path} does not exist (create it with {{update_baseline}})",
                                "update_baseline") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GeodiagError(f"baseline {path} is not a check-bounds baseline: {exc}") from None
        unknown = set(tolerances) - set(DEFAULT_TOLERANCES)
        if unknown:
            raise GeodiagError(f"baseline {path}: no tolerance check for {sorted(unknown)}")
        return cls(tolerances, entries, dict(data.get("generated_with", {})))

    def updated(self, measurements: Iterable[Measurement], device: torch.device) -> "Baseline":
        """This baseline with the given measurements replacing (or adding) their entries."""
        entries = dict(self.entries)
        for m in measurements:
            entries[m.key] = {q: _json_number(getattr(m, q)) for q in BASELINE_QUANTITIES}
        generated_with = {"torch": torch.__version__, "device": device.type}
        return Baseline(dict(self.tolerances), entries, generated_with)

    def save(self, path: str | Path) -> None:
        header = {
            "format": BASELINE_FORMAT,
            "generated_with": self.generated_with,
            "tolerances": {q: asdict(t) for q, t in self.tolerances.items()},
        }
        # One entry per line, sorted: a re-generated baseline diffs line by line in review.
        entries = [json.dumps({"case": c, "setting": s, "precision": p, **values}, allow_nan=False)
                   for (c, s, p), values in sorted(self.entries.items())]
        head = json.dumps(header, indent=1, allow_nan=False)[:-2]
        Path(path).write_text(head + ',\n "entries": [\n  ' + ",\n  ".join(entries) + "\n ]\n}\n")


def _json_number(value: Optional[float]) -> Optional[float]:
    """JSON has no NaN or infinity: those are stored as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}") if isinstance(value, float) else value
