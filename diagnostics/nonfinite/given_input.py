"""What a user's loss does with the input geodiag gives it: the calls that read that input as the other kind.

Why: geodiag feeds a user's loss nnU-Net's softmax over channels unless told that the loss takes logits. A loss
that applies its own softmax, log_softmax or sigmoid to that input normalises twice: it measures a squashed map,
and every figure of an analysis still looks healthy. The reverse, a loss given logits that takes their log or
clamps them into [0, 1] (or away from 0 below 1, ``clamp(min=1e-7)``), reads logits as probabilities; a clamp at
``min=0`` alone is a hinge or a positive part, which logits may take. ``InputReads`` follows the given tensor
through the views, casts, copies and slices the loss makes of it (for logits also through adding or subtracting a
number: ``x + 1e-8``, ``1 - x``) and names each call that reads it as the other kind.

Not seen: a normalisation of anything computed from the input by other arithmetic (``sigmoid(k * (p - 0.5))`` is
a soft threshold, not a mistake); a softmax over an axis that a reshape or permute moved; and a loss given logits
that treats them as probabilities only in its arithmetic (``(1 - x).sum()`` as an area), which no single call
betrays.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .sites import clamp_bounds, numeric

# The kind a loss reads its input as when it reads it as the other kind: the input it should have been given.
OTHER_KIND = {"probabilities": "logits", "logits": "probabilities"}
_NORMALISING = {"softmax": "softmax", "log_softmax": "log_softmax", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_LOGS = {"log": "log", "log_": "log", "log2": "log2", "log2_": "log2", "log10": "log10", "log10_": "log10"}
_CLAMPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"})
# Calls whose output holds the values of their first argument (views, casts, copies, slices).
_SAME_VALUES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "contiguous", "squeeze", "unsqueeze",
    "flatten", "unflatten", "clone", "narrow", "select", "__getitem__", "type_as", "to", "float", "half", "double",
    "bfloat16", "detach", "permute", "transpose", "t", "movedim"})
_REORDERING = frozenset({"permute", "transpose", "t", "movedim"})
_SHIFTS = frozenset({"__add__", "__radd__", "add", "__sub__", "__rsub__", "sub", "rsub"})
_LISTENING: list["InputReads"] = []  # the InputReads of the automatic taps attached now, innermost last


class InputReads:
    """Counts, per (site, op, kind given), the calls that read a loss's given input as the other kind (``found``)."""

    def __init__(self) -> None:
        self.found: dict = {}        # (site, op, kind given) -> calls
        self.kind: Optional[str] = None
        self._tensors: dict = {}     # id -> (tensor, its channel axis or None): the input and what holds its values

    @property
    def active(self) -> bool:
        return bool(self._tensors)

    def listen(self) -> None:
        _LISTENING.append(self)

    def stop_listening(self) -> None:
        _LISTENING.remove(self)

    def follow(self, name: str, args: tuple, kwargs: dict, out) -> Optional[str]:
        """After a call: the op when it read the given input (or what follows it) as the other kind, else None,
        with its output followed when it holds the input's values."""
        first = args[0] if args else kwargs.get("input")
        entry = self._tensors.get(id(first)) if isinstance(first, torch.Tensor) else None
        if entry is None:
            return None
        source, axis = entry
        misread = self._misread(name, args, kwargs, source, axis)
        if misread is None and isinstance(out, torch.Tensor) and out.is_floating_point():
            shift = (self.kind == "logits" and name in _SHIFTS
                     and numeric(args[1] if len(args) > 1 else None) is not None)
            if name in _SAME_VALUES or shift:
                kept = (axis is not None and name not in _REORDERING and out.dim() == source.dim()
                        and out.shape[:1] == source.shape[:1])
                self._tensors[id(out)] = (out, axis if kept else None)
        return misread

    def _misread(self, name: str, args: tuple, kwargs: dict, source: torch.Tensor,
                 axis: Optional[int]) -> Optional[str]:
        if self.kind == "probabilities" and name in _NORMALISING:
            if name.startswith("sigmoid"):
                return "sigmoid"
            return _NORMALISING[name] if axis is not None and _softmax_dim(args, kwargs, source.dim()) == axis else None
        if self.kind == "logits" and name in _LOGS:
            return _LOGS[name]
        if self.kind == "logits" and name in _CLAMPS:
            low, high = clamp_bounds(name, args, kwargs)
            into_unit = low is not None and (0 <= low <= high <= 1 if high is not None else 0 < low < 1)
            return "clamp" if into_unit else None
        return None

    def record(self, site: str, op: str) -> None:
        key = (site, op, self.kind)
        self.found[key] = self.found.get(key, 0) + 1

    def rows(self) -> list[dict]:
        """One row per site and op: its calls, the kind the input was given as and the kind it was read as."""
        return [{"site": site, "op": op, "given": given, "read_as": OTHER_KIND[given], "calls": calls}
                for (site, op, given), calls in self.found.items()]


@contextlib.contextmanager
def given(tensor: torch.Tensor, kind: str):
    """Within: the innermost attached automatic taps follow ``tensor``, the input a loss is about to receive,
    holding ``kind`` ("probabilities" or "logits"). Nothing happens when no taps are attached."""
    reads = _LISTENING[-1] if _LISTENING else None
    if reads is None:
        yield
        return
    reads.kind, reads._tensors = kind, {id(tensor): (tensor, 1 if tensor.dim() > 1 else None)}
    try:
        yield
    finally:
        reads._tensors = {}


def _softmax_dim(args: tuple, kwargs: dict, ndim: int) -> Optional[int]:
    """The axis a softmax call normalises over, non-negative; F.softmax's implicit dim when none is given."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1
    return dim % ndim if isinstance(dim, int) and ndim else None
