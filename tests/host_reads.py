"""A dispatch mode that records the aten ops which read a device value back to the host (a sync on CUDA)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReadDetector(TorchDispatchMode):
    """Flags the aten ops that read a device value back to the host (.item(), bool(t), nonzero, masks)."""

    HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique", "aten::_unique2",
                  "aten::masked_select", "aten::bincount"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.HOST_READS or (name == "aten::index" and self._boolean_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _boolean_index(args) -> bool:
        """Indexing with a mask needs the mask's count on the host; integer indices do not."""
        return any(i is not None and i.dtype == torch.bool for i in args[1])
