"""The committed baseline (``bounds_baseline.json`` beside this package): measurements keyed by case, setting and
precision, the tolerances they are checked with (defaults here, the file's own, then ``--tolerance``), and its
line-per-entry file format."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

import torch

from ...instruments.errors import ArgumentError, GeodiagError
from .measurement import Measurement

BASELINE_PATH = Path(__file__).with_name("bounds_baseline.json")
BASELINE_FORMAT = 2
# Format 1 held no zero-gradient or clamp shares and only the growth tolerances; its entries are still checked.
READABLE_FORMATS = (1, 2)


# ---------------------------------------------------------------------------------------------- baseline
@dataclass(frozen=True)
class Tolerance:
    """Allowed change from the baseline: the larger of ``rel`` x |baseline| and ``abs``."""

    rel: float
    abs: float

    def allowed(self, baseline: float) -> float:
        return max(self.rel * abs(baseline), self.abs)

    def limit(self, baseline: float) -> float:
        return baseline + self.allowed(baseline)


# Growth: 10%, well above the spread between runs, precisions and CPUs (bf16 vs fp32 differ by up to 6%), well
# below a doubling; the absolute floor keeps gradients that are zero up to rounding (1e-28 on a full mask) from
# failing. Loss drift: 1% either way; the same precision on the same inputs repeats to rounding. A fall of the L2 to
# half: a gradient silenced, not one shifted between pixels. Shares of zero-gradient and at-bound elements: 10
# points (an absolute allowance on a share in [0, 1]).
DEFAULT_TOLERANCES = {"grad_max": Tolerance(rel=0.10, abs=1e-8), "grad_l2": Tolerance(rel=0.10, abs=1e-8),
                      "grad_l2_drop": Tolerance(rel=0.5, abs=1e-8), "loss": Tolerance(rel=0.01, abs=1e-6),
                      "zero_grad": Tolerance(rel=0.0, abs=0.10), "at_bound": Tolerance(rel=0.0, abs=0.10)}
# Which part of each tolerance ``--tolerance NAME=VALUE`` sets: a relative change, or points of a share.
TOLERANCE_PARTS = {"grad_max": "rel", "grad_l2": "rel", "grad_l2_drop": "rel", "loss": "rel", "zero_grad": "abs",
                   "at_bound": "abs"}
BASELINE_QUANTITIES = ("loss", "grad_max", "grad_l2", "loss_nonfinite", "grad_nonfinite", "headroom_log2",
                       "perimeter_grad_max", "zero_grad_fraction")


def parse_tolerances(items: Iterable[str]) -> dict[str, float]:
    """``NAME=VALUE`` items as {name: value}; a GeodiagError names an unknown name or a bad value."""
    parsed = {}
    for item in items:
        name, sep, text = item.partition("=")
        if name not in DEFAULT_TOLERANCES or not sep:
            raise ArgumentError(f"{{tolerance}} {item!r}: expected NAME=VALUE with NAME one of "
                                f"{', '.join(DEFAULT_TOLERANCES)}", "tolerance")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 <= value < math.inf) or (name == "grad_l2_drop" and value >= 1.0):
            raise ArgumentError(f"{{tolerance}} {item!r}: VALUE must be a number >= 0"
                                + (" and < 1" if name == "grad_l2_drop" else ""), "tolerance")
        parsed[name] = value
    return parsed


@dataclass
class Baseline:
    """Committed measurements keyed by (case, setting, precision), with the tolerances they are checked with."""

    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    entries: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    generated_with: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Baseline":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") not in READABLE_FORMATS:
                raise ValueError(f"format {data.get('format')!r}, expected one of {READABLE_FORMATS}")
            tolerances = {q: Tolerance(float(t["rel"]), float(t["abs"])) for q, t in data["tolerances"].items()}
            entries = {(e["case"], e["setting"], e["precision"]): _entry(e) for e in data["entries"]}
        except FileNotFoundError:
            raise ArgumentError(f"baseline {path} does not exist (create it with {{update_baseline}})",
                                "update_baseline") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GeodiagError(f"baseline {path} is not a check-bounds baseline: {exc}") from None
        unknown = set(tolerances) - set(DEFAULT_TOLERANCES)
        if unknown:
            raise GeodiagError(f"baseline {path}: no tolerance check for {sorted(unknown)}")
        return cls({**DEFAULT_TOLERANCES, **tolerances}, entries, dict(data.get("generated_with", {})))

    def with_tolerances(self, values: dict[str, float]) -> "Baseline":
        """This baseline with the named tolerances set (``TOLERANCE_PARTS`` says which part each value sets)."""
        tolerances = dict(self.tolerances)
        for name, value in values.items():
            tolerances[name] = replace(tolerances[name], **{TOLERANCE_PARTS[name]: value})
        return replace(self, tolerances=tolerances)

    def updated(self, measurements: Iterable[Measurement], device: torch.device) -> "Baseline":
        """This baseline with the given measurements replacing (or adding) their entries."""
        entries = dict(self.entries)
        for m in measurements:
            entries[m.key] = {q: _json_number(getattr(m, q)) for q in BASELINE_QUANTITIES}
            if m.clamp_at_bound is not None:
                entries[m.key]["clamp_at_bound"] = {site: _json_number(v) for site, v in m.clamp_at_bound.items()}
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


def _entry(stored: dict) -> dict:
    """An entry's quantities as stored (absent ones None), with its clamp sites when it has them."""
    entry = {q: stored.get(q) for q in BASELINE_QUANTITIES}
    if stored.get("clamp_at_bound") is not None:
        entry["clamp_at_bound"] = {str(site): value for site, value in dict(stored["clamp_at_bound"]).items()}
    return entry


def _json_number(value: Optional[float]) -> Optional[float]:
    """JSON has no NaN or infinity: those are stored as null."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}") if isinstance(value, float) else value
