"""Where a torch call comes from (the user's ``file:line``) and what kind of call it is.

Why: automatic taps, bound overrides, NaN provenance and the record of a loss that raised all name a call by the
line of *the user's* file that made it, and they must agree on which line that is. ``user_frame`` is the one rule:
the innermost frame that is neither torch's, nor nnU-Net's, nor geodiag's own machinery (``diagnostics`` and the
trainer side of ``losses``; user code shipped inside geodiag as data, in a folder without ``__init__.py`` such as
the study's seed replica, is a user's, as it is to nnU-Net). geodiag's geometric loss is the subject of its own
analyses, not machinery: its lines are named.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import CodeType
from typing import Iterable, Iterator, Optional, TypeVar

import torch

import geodiag.losses.nnunet as trainer_side
import geodiag.losses.taps as loss_taps
from geodiag.diagnostics.instruments.errors import GeodiagError

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


_TORCH, _NNUNET, _GEODIAG, _USER = range(4)
# nnU-Net and the packages of its own that run inside its training step (network, padding, augmentation).
_NNUNET_PACKAGES = ("nnunetv2", "dynamic_network_architectures", "acvl_utils", "batchgenerators", "batchgeneratorsv2")


def _package_dir(name: str) -> Optional[str]:
    """Where an installed package's code lives, found without importing it (None when it is not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a finder that refuses the name: as good as not installed
        spec = None
    locations = list(spec.submodule_search_locations or ()) if spec else []
    return os.path.join(os.path.abspath(locations[0]), "") if locations else None


_LIBRARIES = tuple((folder, kind) for name, kind in (("torch", _TORCH), *((n, _NNUNET) for n in _NNUNET_PACKAGES))
                   if (folder := _package_dir(name)) is not None)
_GEODIAG_MACHINERY = (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ""),
                      os.path.join(os.path.dirname(os.path.abspath(trainer_side.__file__)), ""),
                      os.path.abspath(loss_taps.__file__))
Located = TypeVar("Located")  # where in a frame: the frame itself, or a traceback entry's line


@functools.lru_cache(maxsize=None)
def _kind(filename: str) -> int:
    """Whose code a source file is: torch's, nnU-Net's, geodiag's machinery or the user's."""
    path = os.path.abspath(filename)
    for folder, kind in _LIBRARIES:
        if path.startswith(folder):
            return kind
    if path.startswith(_GEODIAG_MACHINERY) and os.path.isfile(os.path.join(os.path.dirname(path), "__init__.py")):
        return _GEODIAG
    return _USER


def user_frame(frames: Iterable[tuple[CodeType, Located]]) -> Optional[tuple[CodeType, Located]]:
    """The user's entry among ``frames`` (code and where in it, innermost first): the first that is not torch's,
    nnU-Net's or geodiag's machinery. geodiag met after nnU-Net's code means geodiag ran nnU-Net's own code (a
    replay of its train_step, an analysis's forward): no user code made the call, and nnU-Net's innermost line is
    named instead. None when neither exists."""
    nnunet = None
    for entry in frames:
        kind = _kind(entry[0].co_filename)
        if kind == _USER:
            return entry
        if kind == _NNUNET:
            nnunet = nnunet or entry
        elif kind == _GEODIAG and nnunet is not None:
            break
    return nnunet


def made_by_geodiag(frame) -> bool:
    """Whether geodiag's machinery itself made the call in ``frame`` (an instrument's arithmetic in a tap
    callback, the softmax geodiag feeds a user's loss): such a call belongs to geodiag, not to the loss being
    measured. A mode passing on a call it intercepted (``BoundOverride``'s ``__torch_function__``) did not make it."""
    code = frame.f_code
    return code.co_name != "__torch_function__" and _kind(code.co_filename) == _GEODIAG


def made_by_user(frame) -> bool:
    """Whether the call in ``frame`` comes from the user's own code, directly or through torch's Python wrappers
    (``x ** 2`` passes through ``torch/_tensor.py``); not from nnU-Net's or geodiag's code."""
    while frame is not None and _kind(frame.f_code.co_filename) == _TORCH:
        frame = frame.f_back
    return frame is not None and _kind(frame.f_code.co_filename) == _USER


def runs_inside(frame, codes: frozenset, depth: int = 32) -> bool:
    """Whether ``frame`` or one of its ``depth`` callers runs a function named in ``codes`` by (file, first line):
    the identity of a function across two imports of its file (a user's loss loaded by geodiag and by nnU-Net)."""
    while frame is not None and depth:
        code = frame.f_code
        if (os.path.abspath(code.co_filename), code.co_firstlineno) in codes:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def _stack(frame) -> Iterator[tuple[CodeType, object]]:
    """``frame`` and its callers, innermost first, as ``user_frame`` takes them."""
    while frame is not None:
        yield frame.f_code, frame
        frame = frame.f_back


def caller_code(depth: int = 2) -> tuple[Optional[CodeType], Optional[int]]:
    """(code, line) of the user's frame (``user_frame``), starting ``depth`` frames up; (None, None) if none."""
    found = user_frame(_stack(sys._getframe(depth)))
    return (found[0], found[1].f_lineno) if found else (None, None)


def caller_location(depth: int = 2) -> tuple[str, int]:
    """(file, line) of the user's frame (``user_frame``), starting ``depth`` frames up."""
    found = user_frame(_stack(sys._getframe(depth)))
    return (found[0].co_filename, found[1].f_lineno) if found else ("<unknown>", 0)


def display_path(filename: str) -> str:
    """A source file as the sites table names it: relative to the working directory when inside it."""
    return _display_path(filename, os.getcwd())


@functools.lru_cache(maxsize=4096)
def _display_path(filename: str, cwd: str) -> str:
    absolute = os.path.abspath(os.path.join(cwd, filename))
    relative = os.path.relpath(absolute, cwd)
    return absolute if relative.startswith("..") else relative


def exception_site(exc: BaseException) -> str:
    """``file:line`` of the user's frame (``user_frame``) in ``exc``'s traceback: the user's line that made the
    failing call ("<unknown>" when there is none)."""
    entries = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append((tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    found = user_frame(reversed(entries))
    return format_site(found[0].co_filename, found[1]) if found else "<unknown>"


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


def risky_operands(op: str, name: str, args: tuple, kwargs: dict):
    """(input watched, extra) for a risky call, or None when this call is not risky after all (x ** 2, a / 3)."""
    first = args[0] if args else kwargs.get("input")
    second = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("exponent"))
    if op == "pow":
        if name == "__rpow__":                # c ** x: exponential in x
            return (first, None)
        exponent = numeric(second)
        if exponent is not None and (exponent >= 0 and exponent == int(exponent)):
            return None                        # x ** 2: polynomial, nothing singular
        if not isinstance(first, torch.Tensor):
            return (second, None) if isinstance(second, torch.Tensor) else None
        return (first, exponent)
    if op == "div":
        if name in ("__rdiv__", "__rtruediv__"):  # c / x
            return (first, None)
        if isinstance(second, torch.Tensor):
            return (second, None)
        return None if numeric(second) not in (None, 0.0) else (first, None)
    if op in ("atan2", "hypot"):
        return (second, None) if isinstance(second, torch.Tensor) else (first, None)
    return (first, None) if isinstance(first, torch.Tensor) else None


def boolean_index(args: tuple) -> bool:
    """Indexing with a mask needs the mask's count on the host."""
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def clamp_bounds(name: str, args: tuple, kwargs: dict) -> tuple:
    """The numeric (min, max) of a clamp call; None for a missing or tensor bound."""
    if name.startswith("clamp_min"):
        return numeric(args[1] if len(args) > 1 else kwargs.get("min")), None
    if name.startswith("clamp_max"):
        return None, numeric(args[1] if len(args) > 1 else kwargs.get("max"))
    low = args[1] if len(args) > 1 else kwargs.get("min")
    high = args[2] if len(args) > 2 else kwargs.get("max")
    return numeric(low), numeric(high)
