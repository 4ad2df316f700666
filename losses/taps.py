"""A tap API for a loss's named intermediates, shaped like nn.Module's forward hooks.

A tap is a plain callable ``tap(name, tensor)``. It receives the live tensor, still attached to the
autograd graph, so an observer can read its forward value and call ``tensor.register_hook`` to see the
gradient that arrives there in backward. Registering returns torch's ``RemovableHandle`` (``.remove()``,
usable as a context manager). With no tap registered, emitting costs one dict truth test.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
from torch.utils.hooks import RemovableHandle

Tap = Callable[[str, torch.Tensor], None]


class Tappable:
    """Mixin giving a module ``register_tap`` and ``_emit``; the names it emits are listed in ``TAP_NAMES``."""

    TAP_NAMES: tuple[str, ...] = ()

    def _taps(self) -> "OrderedDict[int, tuple[Tap, Optional[frozenset]]]":
        # Created lazily so the mixin needs no __init__ cooperation from nn.Module subclasses.
        taps = self.__dict__.get("_tap_registry")
        if taps is None:
            taps = OrderedDict()
            self.__dict__["_tap_registry"] = taps
        return taps

    def register_tap(self, tap: Tap, names: Optional[Iterable[str]] = None) -> RemovableHandle:
        """Call ``tap(name, tensor)`` for every emitted intermediate (or only those in ``names``)."""
        wanted = None if names is None else frozenset(names)
        if wanted is not None and self.TAP_NAMES:
            unknown = wanted - set(self.TAP_NAMES)
            if unknown:
                raise ValueError(f"unknown tap names {sorted(unknown)}; known: {list(self.TAP_NAMES)}")
        taps = self._taps()
        handle = RemovableHandle(taps)
        taps[handle.id] = (tap, wanted)
        return handle

    @property
    def has_taps(self) -> bool:
        return bool(self.__dict__.get("_tap_registry"))

    def _emit(self, name: str, tensor: torch.Tensor) -> None:
        taps = self.__dict__.get("_tap_registry")
        if not taps:
            return
        for tap, wanted in list(taps.values()):
            if wanted is None or name in wanted:
                tap(name, tensor)
