"""Where a torch call comes from (the user's ``file:line``) and what kind of call it is.

Why: automatic taps and bound overrides see every torch call a loss makes through a ``TorchFunctionMode``; a
call is only useful to a researcher named by the line of *their* file that made it, so the stack is walked
past torch's own Python code (``torch.nn.functional``, ``torch._tensor``) and past geodiag's diagnostics.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from geodiag.diagnostics.instruments.errors import GeodiagError

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_DIAGNOSTICS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_skipped_file: dict[str, bool] = {}

# Canonical op per torch function name (Tensor methods, their in-place forms, operators, torch.* and linalg).
RISKY_OPS = {
    "sqrt": "sqrt", "sqrt_": "sqrt",
    "rsqrt": "rsqrt", "rsqrt_": "rsqrt",
    "pow": "pow", "pow_": "pow", "__pow__": "pow", "__ipow__": "pow", "__rpow__": "pow", "float_power": "pow",
    "div": "div", "div_": "div", "divide": "div", "true_divide": "div", "__truediv__": "div", "__itruediv__": "div",
    "__div__": "div", "__rdiv__": "div", "__rtruediv__": "div",
    "reciprocal": "reciprocal", "reciprocal_": "reciprocal",
    "log": "log", "log_": "log", "log2": "log", "log10": "log", "log1p": "log1p", "log1p_": "log1p",
    "exp": "exp", "exp_": "exp", "expm1": "exp", "exp2": "exp",
    "clamp": "clamp", "clamp_": "clamp", "clip": "clamp", "clip_": "clamp",
    "clamp_min": "clamp", "clamp_min_": "clamp", "clamp_max": "clamp", "clamp_max_": "clamp",
    "atan2": "atan2", "arctan2": "atan2", "atan2_": "atan2",
    "acos": "acos", "arccos": "acos", "acos_": "acos", "asin": "asin", "arcsin": "asin", "asin_": "asin",
    "hypot": "hypot",
    "norm": "norm", "linalg_norm": "norm", "linalg_vector_norm": "norm", "linalg_matrix_norm": "norm",
    "frobenius_norm": "norm",
    "linalg_eigh": "eig", "linalg_eigvalsh": "eig", "linalg_eig": "eig", "linalg_eigvals": "eig",
    "linalg_svd": "eig", "linalg_svdvals": "eig", "svd": "eig",
}
# Calls that read a device value back to the host (a stall per call on a GPU).
HOST_SYNCS = {"item": "item", "__bool__": "bool", "__float__": "float", "__int__": "int", "__index__": "int",
              "tolist": "tolist", "cpu": "cpu", "numpy": "numpy", "nonzero": "nonzero", "argwhere": "nonzero",
              "masked_select": "masked_select", "unique": "unique", "bincount": "bincount", "__array__": "numpy"}
ADD_OPS = frozenset({"add", "__add__", "__radd__"})


_INPLACE_OPERATORS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ifloordiv__",
                                "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                                "__ilshift__", "__irshift__", "__setitem__"})


def is_inplace(name: str) -> bool:
    """Whether a torch function of this name overwrites its first argument (``clamp_``, ``+=``, ``x[m] = 0``)."""
    return name in _INPLACE_OPERATORS or (name[-1:] == "_" and name[-2:] != "__")


def func_name(func) -> str:
    return getattr(func, "__name__", "")


def _skipped(filename: str) -> bool:
    """torch's files and geodiag's diagnostics modules; not user code shipped inside diagnostics as data (a folder
    without __init__.py, such as the study's seed replica, is a user's folder to nnU-Net and to the sites)."""
    skipped = _skipped_file.get(filename)
    if skipped is None:
        path = os.path.abspath(filename)
        skipped = _skipped_file[filename] = path.startswith(_TORCH_DIR) or (
            path.startswith(_DIAGNOSTICS_DIR) and os.path.isfile(os.path.join(os.path.dirname(path), "__init__.py")))
    return skipped


def display_path(filename: str) -> str:
    """A source file as the sites table names it: relative to the working directory when inside it."""
    return _display_path(filename, os.getcwd())


@functools.lru_cache(maxsize=4096)
def _display_path(filename: str, cwd: str) -> str:
    absolute = os.path.abspath(os.path.join(cwd, filename))
    relative = os.path.relpath(absolute, cwd)
    return absolute if relative.startswith("..") else relative


def caller_location(depth: int = 2) -> tuple[str, int]:
    """(file, line) of the first frame outside torch and geodiag's diagnostics, starting ``depth`` frames up."""
    frame = sys._getframe(depth)
    skipped = _skipped_file.get
    while frame is not None:
        filename = frame.f_code.co_filename
        is_skipped = skipped(filename)
        if is_skipped is None:
            is_skipped = _skipped(filename)
        if not is_skipped:
            break
        frame = frame.f_back
    if frame is None:
        return "<torch>", 0
    return frame.f_code.co_filename, frame.f_lineno


def exception_site(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback outside torch and geodiag's diagnostics: the
    user's line that made the failing call ("<unknown>" when every frame is torch's or geodiag's)."""
    found = "<unknown>"
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not _skipped(filename):
            found = format_site(filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


@dataclass(frozen=True)
class SiteSpec:
    """A user's ``FILE:LINE``; FILE as the sites table names it, an absolute path, or just the file name."""

    file: str
    line: int
    text: str

    @classmethod
    def parse(cls, text: str) -> "SiteSpec":
        file, sep, line = text.strip().rpartition(":")
        if not sep or not file or not line.isdigit():
            raise GeodiagError(f"site {text!r} is not FILE:LINE (e.g. my_loss.py:42)")
        return cls(file, int(line), text)

    def matches(self, filename: str, line: int) -> bool:
        if line != self.line:
            return False
        if os.sep in self.file or "/" in self.file:
            return os.path.abspath(self.file) == os.path.abspath(filename)
        return os.path.basename(filename) == self.file


def format_site(filename: str, line: int) -> str:
    return f"{display_path(filename)}:{line}"


def unmatched_error(spec: SiteSpec, reason: str, found: Iterable[str]) -> GeodiagError:
    found = sorted(set(found))
    listing = ", ".join(found) if found else "none"
    return GeodiagError(f"site {spec.text}: {reason}; sites found: {listing}")


def numeric(value: object) -> Optional[float]:
    """A Python number as float, else None (a tensor's value is never read here: that would be a host sync)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
