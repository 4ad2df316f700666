"""Tables as pandas frames: CSV/Parquet writes (atomic, through ``schema``'s writers), reads that check the columns
``schema`` names, and how numbers and settings are formatted in tables and sentences.

CSV is always written (readable anywhere); Parquet beside it when pyarrow is importable (typed, compact).
"""
from __future__ import annotations

import importlib.util
import math
import numbers
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .schema import ReportInputError, write_bytes, write_text


def parquet_available() -> bool:
    """Whether Parquet files can be written (pyarrow importable)."""
    return importlib.util.find_spec("pyarrow") is not None


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


def format_eps(eps: float, digits: int = 4) -> str:
    """An eps the way the seed and the presets write it, to ``digits`` significant digits: 1e-4, 2.5e-3, 0."""
    if eps == 0:
        return "0"
    mantissa, exponent = f"{eps:.{digits - 1}e}".split("e")
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


def format_percent(value: Any) -> str:
    """A share as a percentage with 3 significant digits (0.125 -> 12.5%); a missing value as an en dash."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return "–"
    return f"{100 * value:.3g}%"


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table for Markdown (and for ``html.markdown_to_html``); numbers via ``format_number``."""
    header = [str(column).replace("|", "\\|") for column in frame.columns]
    rows: Iterable[list[str]] = (
        [format_number(value, digits).replace("|", "\\|") for value in row] for row in frame.itertuples(index=False)
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
