"""Detects host syncs: the aten ops that read a device value back to the host (.item(), bool(t), nonzero, masks).

On CUDA each of them stalls the stream; a loss or a recorder meant to stay switched on must issue none. The
dispatch mode works on any device; on CUDA ``count_host_syncs`` also arms torch's own sync debug mode.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReadDetector(TorchDispatchMode):
    """Records the aten ops that read a device value back to the host (.item(), bool(t), nonzero, masks)."""

    HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique",
                            "aten::_unique2", "aten::masked_select", "aten::bincount"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.HOST_READS or (name == "aten::index" and self._boolean_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _boolean_index(args) -> bool:
        """Indexing with a mask needs the mask's count on the host; integer indices do not."""
        return any(i is not None and i.dtype == torch.bool for i in args[1])


def count_host_syncs(run: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Host reads of ``run`` seen by the dispatch mode, and, on CUDA, whether sync-debug mode "error" fired."""
    detector = HostReadDetector()
    with detector:
        run()
    note = "aten host-read ops (dispatch mode)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
            note += "; CUDA sync debug mode 'error': silent"
        except RuntimeError as exc:
            detector.seen.append(f"cuda sync: {exc}".splitlines()[0])
            note += "; CUDA sync debug mode 'error': FIRED"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return len(detector.seen), note + (f" ({', '.join(sorted(set(detector.seen)))})" if detector.seen else "")
