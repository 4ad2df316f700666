"""Reading and writing the tables that diagnostics measure: the column schemas, atomic CSV/Parquet/JSON writes.

Why atomic: a report directory is read while sweeps still run; a half-written CSV must never be what a
reader sees, so every file goes to a temporary sibling first and replaces the target with ``os.replace``. The
sibling is created with mode 0666 less the user's umask, like any other file (``tempfile.mkstemp`` would make
every report 0600, unreadable to the group a results folder is shared with on a cluster).
CSV is always written (readable anywhere); Parquet beside it when pyarrow is importable (typed, compact).
"""
from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

# Column schemas of what diagnostics write; producers and reports share these names exactly.
TENSORS_COLUMNS = (
    "precision", "tensor", "kind", "count", "nan", "posinf", "neginf", "zero", "subnormal", "negative",
    "fp16_overflow", "fp16_underflow", "bf16_overflow", "bf16_underflow",
    "min", "max", "mean", "p50", "p90", "p99", "p999",
)
HISTOGRAM_COLUMNS = ("precision", "tensor", "kind", "bin_low", "bin_high", "count")
EPS_FRACTION_COLUMNS = ("precision", "tensor", "eps", "fraction_below", "zero_grad_fraction")
TERM_COLUMNS = ("case", "precision", "term", "value", "grad_share")
SWEEP_COLUMNS = (
    "checkpoint", "dataset", "epoch", "geometric_active", "case", "stabilizer", "eps", "precision",
    "loss", "perimeter", "compactness", "aspect", "ref_perimeter", "ref_compactness", "ref_aspect",
    "bias_perimeter", "bias_compactness", "bias_aspect", "grad_max", "grad_l2", "grad_p999",
    "sqrt_deriv_max", "sqrt_deriv_p99", "frac_below_eps", "frac_zero_grad", "nonfinite_loss", "nonfinite_grad",
)
SWEEP_HIST_COLUMNS = ("checkpoint", "dataset", "epoch", "bin_low", "bin_high", "count")
RUN_COLUMNS = (
    "run", "dataset", "trainer", "preset", "stabilizer", "eps", "warmup", "epoch", "geometric_active",
    "train_loss", "train_dc_ce", "train_geometric", "train_compactness", "train_aspect", "val_loss",
    "pseudo_dice", "skipped_steps", "grad_norm_max",
)


class ReportInputError(ValueError):
    """A missing or malformed input table: the user's data, not a bug; the message is one line for the CLI."""


def parquet_available() -> bool:
    """Whether Parquet files can be written (pyarrow importable)."""
    return importlib.util.find_spec("pyarrow") is not None


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, then ``os.replace``)."""
    return _atomic_write(Path(path), data)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return _atomic_write(Path(path), text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN/Inf become null (JSON has no spelling for them), numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented, strict JSON atomically."""
    return write_text(path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON object; a missing or malformed file is a ReportInputError."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportInputError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ReportInputError(f"{path} must hold a JSON object, found {type(payload).__name__}")
    return payload


def write_table(frame: pd.DataFrame, path: str | Path) -> list[Path]:
    """Write ``frame`` to ``path`` (a .csv) and, when pyarrow is importable, to the .parquet beside it."""
    path = Path(path)
    if path.suffix != ".csv":
        raise ValueError(f"table path must end in .csv, got {path}")
    written = [write_text(path, frame.to_csv(index=False))]
    if parquet_available():
        written.append(write_bytes(path.with_suffix(".parquet"), frame.to_parquet(index=False)))
    return written


def read_table(path: str | Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a .csv table, checking that the ``required`` columns are present."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ReportInputError(f"{path} not found") from None
    except pd.errors.EmptyDataError:
        raise ReportInputError(f"{path} is empty (not even a header row)") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ReportInputError(f"{path} is not a readable CSV table: {str(exc).splitlines()[0]}") from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ReportInputError(f"{path} lacks column(s) {', '.join(missing)}")
    return frame


def read_optional_table(path: str | Path, required: Sequence[str] = ()) -> pd.DataFrame | None:
    """Like ``read_table``, but an absent file is None (an optional part of a report), not an error."""
    return read_table(path, required) if Path(path).exists() else None


def format_eps(eps: float) -> str:
    """An eps the way the seed and the presets write it: 1e-4, 2.5e-3, 0."""
    if eps == 0:
        return "0"
    mantissa, exponent = f"{eps:.3e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def setting_label(stabilizer: str, eps: float) -> str:
    """How a (stabiliser, eps) setting is named in tables, legends and sentences."""
    return f"{stabilizer} {format_eps(eps)}"


def format_number(value: Any, digits: int = 3) -> str:
    """A table cell: integers as is, reals with ``digits`` significant digits, missing values as an en dash."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.{digits}g}"
    return str(value)


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table for Markdown (and for ``html.markdown_to_html``); numbers via ``format_number``."""
    header = [str(column).replace("|", "\\|") for column in frame.columns]
    rows: Iterable[list[str]] = (
        [format_number(value, digits).replace("|", "\\|") for value in row] for row in frame.itertuples(index=False)
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
