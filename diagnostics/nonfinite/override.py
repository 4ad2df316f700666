"""Counterfactual bounds: a clamp's ``min``, or the constant in ``sqrt(x + c)``, replaced at a chosen source line.

Why: "what would my loss do with eps = 1e-2 at line 42?" should not need an edit to the user's file. While the
mode is active, a clamp called from a chosen ``FILE:LINE`` gets the given value as its ``min``. A line without
such a clamp may instead hold ``sqrt(x + c)``: the add with a Python number feeding that line's sqrt is redone
with the given value (``clamp`` wins when a line has both). A chosen site that no call matched, or whose clamp has
no numeric ``min``, raises a GeodiagError on leaving the ``with`` block, listing the sites that could be chosen.
``current`` keeps, per chosen site, the bound(s) the calls were made with: the value the user's file has there.
With ``AutoTaps``, enter the override inside the tapped call (modes stack: the innermost sees a call first), so
the taps measure the replaced bound.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch.overrides import TorchFunctionMode

from geodiag.diagnostics.nonfinite.sites import (ADD_OPS, RISKY_OPS, SiteSpec, caller_location, format_site,
                                                 func_name, numeric, unmatched_error)


class BoundOverride(TorchFunctionMode):
    """``with BoundOverride({"my_loss.py:42": 1e-2}): loss(p, t)``."""

    def __init__(self, values: Mapping[str, float]) -> None:
        super().__init__()
        self.values = [(SiteSpec.parse(site), float(value)) for site, value in values.items()]
        self.applied = {spec: 0 for spec, _ in self.values}
        self.current = {spec.text: set() for spec, _ in self.values}  # bounds the replaced calls were made with
        self.without_bound: set = set()     # specs whose line's clamp had no numeric min
        self.found: set = set()             # "file:line (clamp min=...)" / "(sqrt(x + c))" seen
        self._adds: dict = {}               # id(add output) -> (output, tensor operand, spec, constant)

    def _spec(self, file: str, line: int):
        for spec, value in self.values:
            if spec.matches(file, line):
                return spec, value
        return None, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func_name(func)
        op = RISKY_OPS.get(name)
        if op not in ("clamp", "sqrt") and name not in ADD_OPS:
            return func(*args, **kwargs)
        file, line = caller_location(2)
        spec, value = self._spec(file, line)
        if op == "clamp":
            has_min = not name.startswith("clamp_max") and numeric(
                args[1] if len(args) > 1 else kwargs.get("min")) is not None
            self.found.add(f"{format_site(file, line)} (clamp{' min' if has_min else ' without numeric min'})")
            if spec is None:
                return func(*args, **kwargs)
            if not has_min:
                self.without_bound.add(spec)
                return func(*args, **kwargs)
            self.applied[spec] += 1
            self.current[spec.text].add(numeric(args[1] if len(args) > 1 else kwargs.get("min")))
            if len(args) > 1:
                args = (args[0], value) + tuple(args[2:])
            else:
                kwargs = {**kwargs, "min": value}
            return func(*args, **kwargs)
        if name in ADD_OPS:
            out = func(*args, **kwargs)
            tensor, constant = _tensor_plus_number(args, kwargs)
            if tensor is not None and isinstance(out, torch.Tensor):
                self._adds[id(out)] = (out, tensor, spec, constant)
            return out
        source = self._adds.get(id(args[0])) if args else None
        fed_by_add = source is not None and source[0] is args[0]
        if fed_by_add:
            self.found.add(f"{format_site(file, line)} (sqrt(x + c))")
        if spec is None or not fed_by_add or source[2] is not spec:
            return func(*args, **kwargs)
        self.applied[spec] += 1
        self.current[spec.text].add(source[3])
        return func(torch.add(source[1], value), *args[1:], **kwargs)

    def __exit__(self, exc_type, exc, traceback):
        self._adds.clear()
        result = super().__exit__(exc_type, exc, traceback)
        if exc_type is None:
            for spec, _ in self.values:
                if not self.applied[spec]:
                    reason = ("its clamp has no numeric min bound" if spec in self.without_bound
                              else "no clamp or sqrt(x + c) call ran at that line")
                    raise unmatched_error(spec, reason, self.found)
        return result


def _tensor_plus_number(args: tuple, kwargs: dict):
    """(tensor, c) for ``tensor + c`` / ``c + tensor`` with a Python number c and no alpha, else (None, None)."""
    if len(args) != 2 or kwargs.get("alpha", 1) != 1:
        return None, None
    a, b = args
    if isinstance(a, torch.Tensor) and numeric(b) is not None:
        return a, numeric(b)
    if isinstance(b, torch.Tensor) and numeric(a) is not None:
        return b, numeric(a)
    return None, None
