"""A user's loss, loaded from the SPEC they typed, called the one way every command calls it.

SPEC is ``package.module:NAME`` or ``path/to/file.py:NAME``. NAME may be a loss callable ``(input, target)``,
an ``nn.Module`` instance or class, or a zero-argument factory returning one; a loss whose call takes only
the prediction is called without the target. A loss may return its terms as a dict of tensors: its value is
their sum. Code is imported only from a SPEC: never from a name found in a
checkpoint or a run folder, which may come from anywhere.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from geodiag.diagnostics.instruments.errors import ArgumentError, GeodiagError

INPUT_KINDS = ("probabilities", "logits")


@dataclass
class UserLoss:
    """A loaded loss: ``loss(logits, target)`` feeds it what ``input_kind`` says and returns its value."""

    spec: str
    fn: Callable
    takes_target: bool
    input_kind: str = "probabilities"

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise GeodiagError(f"loss input must be one of {', '.join(INPUT_KINDS)}, got {self.input_kind!r}")

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        """What the loss receives: nnU-Net's softmax over channels (``torch.softmax(x, 1)``, under whatever
        autocast is active, so the dtype is the one torch.softmax returns there), or the logits as they are."""
        return torch.softmax(logits, 1) if self.input_kind == "probabilities" else logits

    def outputs(self, prediction: torch.Tensor, target: Optional[torch.Tensor]):
        """What the loss returns on an already prepared prediction: a tensor, or a dict of named term tensors."""
        return self.fn(prediction, target) if self.takes_target else self.fn(prediction)

    def call(self, prediction: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss on an already prepared prediction; a loss returning a dict of terms is their sum."""
        return total_of(self.outputs(prediction, target))

    def __call__(self, logits: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        return self.call(self.prepare(logits), target)


def total_of(value):
    """A loss's value: the sum of its terms when it returns them as a dict, else the value itself."""
    if isinstance(value, Mapping):
        if not value:
            raise GeodiagError("the loss returned an empty dict; expected a tensor or a dict of term tensors")
        return sum(value.values())
    return value


def load_loss(spec: str, input_kind: str = "probabilities") -> UserLoss:
    """The loss SPEC names; a GeodiagError with one line naming SPEC and the reason when it cannot be had."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ArgumentError(f"{{loss}} {spec!r}: expected package.module:NAME or path/to/file.py:NAME", "loss")
    module = _import_file(spec, source) if source.endswith(".py") else _import_module(spec, source)
    target = module
    for part in name.split("."):
        if not hasattr(target, part):
            raise ArgumentError(f"{{loss}} {spec!r}: {source} has no {name!r}", "loss")
        target = getattr(target, part)
    fn = _as_loss(spec, target)
    return UserLoss(spec=spec, fn=fn, takes_target=_takes_target(fn), input_kind=input_kind)


def as_user_loss(candidate: object, label: str = "loss", input_kind: str = "probabilities") -> UserLoss:
    """A UserLoss from an object already in hand (a loss callable, module, class or factory), as SPEC's NAME."""
    fn = _as_loss(label, candidate)
    return UserLoss(spec=label, fn=fn, takes_target=_takes_target(fn), input_kind=input_kind)


def _import_file(spec: str, path: str):
    if not os.path.isfile(path):
        raise ArgumentError(f"{{loss}} {spec!r}: no such file {path}", "loss")
    stem = os.path.splitext(os.path.basename(path))[0]
    module_name = f"geodiag_user_loss_{stem}_{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as with python path/to/file.py: the file's own folder is importable
    module_spec = importlib.util.spec_from_file_location(module_name, os.path.abspath(path))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise ArgumentError(f"{{loss}} {spec!r}: syntax error in {path} line {exc.lineno}: {exc.msg}", "loss") from None
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises on import is their input's problem
        del sys.modules[module_name]
        raise ArgumentError(f"{{loss}} {spec!r}: importing {path} raised {one_line(exc)}", "loss") from None
    return module


def _import_module(spec: str, module_name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as with python -m: the current directory is importable
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ArgumentError(f"{{loss}} {spec!r}: no module named {exc.name!r}", "loss") from None
        raise ArgumentError(f"{{loss}} {spec!r}: importing {module_name} raised {one_line(exc)}", "loss") from None
    except SyntaxError as exc:
        raise ArgumentError(f"{{loss}} {spec!r}: syntax error in {exc.filename} line {exc.lineno}: {exc.msg}",
                            "loss") from None
    except Exception as exc:  # noqa: BLE001
        raise ArgumentError(f"{{loss}} {spec!r}: importing {module_name} raised {one_line(exc)}", "loss") from None


def _as_loss(spec: str, candidate: object) -> Callable:
    """The loss itself: a module instance or loss callable as is; a class or zero-argument factory, built."""
    if isinstance(candidate, nn.Module):
        return candidate
    if not callable(candidate):
        raise ArgumentError(f"{{loss}} {spec!r}: {type(candidate).__name__} is not callable", "loss")
    if not (inspect.isclass(candidate) or _callable_without_arguments(candidate)):
        return candidate
    try:
        built = candidate()
    except Exception as exc:  # noqa: BLE001 - the user's factory failing is their input's problem
        raise ArgumentError(f"{{loss}} {spec!r}: the factory raised {one_line(exc)}", "loss") from None
    if not callable(built):
        raise ArgumentError(f"{{loss}} {spec!r}: the factory returned a {type(built).__name__}, not a callable loss",
                            "loss")
    return built


def _callable_without_arguments(candidate: Callable) -> bool:
    parameters = _parameters(candidate)
    return parameters is not None and all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                          for p in parameters)


def _takes_target(fn: Callable) -> bool:
    """Whether the loss's call accepts a second positional argument (a module is inspected through forward)."""
    parameters = _parameters(fn.forward if isinstance(fn, nn.Module) else fn)
    if parameters is None:
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _parameters(fn: Callable):
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def one_line(exc: BaseException) -> str:
    """An exception of the user's code as one line: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
