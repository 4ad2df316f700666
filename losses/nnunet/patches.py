"""Run-time replacements that each undo exactly themselves: ``patch(owner, name, replacement)`` returns a handle
whose ``remove()`` (or the end of its ``with`` block) puts back what ``owner.name`` was, like torch's
``RemovableHandle``.

Why one mechanism: the guard (trainer methods, ``Tensor.backward``, ``clip_grad_norm_``), ``geodiag watch``
(nnU-Net's trainer factory, ``sys.argv``) and the study (the same factory, environment variables) all replace
things for a while. Undoing by a count of earlier replacements broke as soon as two of them stacked; a handle per
replacement cannot undo someone else's.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

_ABSENT = object()  # the owner had no attribute (or variable) of its own: removal deletes instead of restoring


class PatchHandle:
    """One replacement of ``owner.name``; ``replaced`` is what the attribute resolved to before (to call it)."""

    def __init__(self, owner: Any, name: str, replacement: Any) -> None:
        self.owner, self.name, self.replacement = owner, name, replacement
        self.replaced = getattr(owner, name, None)
        self._own = vars(owner).get(name, _ABSENT)
        setattr(owner, name, replacement)
        self.active = True

    def remove(self) -> None:
        """Put back what was there; a second call does nothing. Undoing out of order (a later replacement of the
        same attribute still in place) raises instead of silently dropping the later one."""
        if not self.active:
            return
        if vars(self.owner).get(self.name, _ABSENT) is not self.replacement:
            raise RuntimeError(f"{self.name} was replaced again after this patch; remove that patch first")
        if self._own is _ABSENT:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self._own)
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PatchGroup:
    """Several handles undone together, last first (what one installer put in place)."""

    def __init__(self, handles=()) -> None:
        self.handles: list = list(handles)

    def add(self, handle):
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "PatchGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch(owner: Any, name: str, replacement: Any) -> PatchHandle:
    """Replace ``owner.name`` by ``replacement`` until the returned handle is removed."""
    return PatchHandle(owner, name, replacement)


class EnvironHandle:
    """Environment variables set (a value) or unset (None) until ``remove()``, which restores each as it was."""

    def __init__(self, values: Mapping[str, Optional[str]]) -> None:
        self._saved = {key: os.environ.get(key) for key in values}
        for key, value in values.items():
            _set_environ(key, value)
        self.active = True

    def remove(self) -> None:
        if self.active:
            for key, value in self._saved.items():
                _set_environ(key, value)
            self.active = False

    def __enter__(self) -> "EnvironHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def patch_environ(values: Mapping[str, Optional[str]]) -> EnvironHandle:
    """Set (or with None unset) environment variables until the returned handle is removed."""
    return EnvironHandle(values)


def _set_environ(key: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
