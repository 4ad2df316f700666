"""What ``NonFiniteProvenance`` keeps of one step's ops until ``step_end``: a log stored column by column.

Why columns: a training step runs a few thousand aten ops. An object per op (and per input and output shape) lives
until the step ends, so it survives the garbage collector's young generations; a few steps later those survivors
trigger a full collection, which walks every object of the process (with torch and nnU-Net loaded, several hundred
thousand) and alone made a watched step a third slower. Appending ints, strings, dtypes, code objects and shape
tuples to a fixed set of lists allocates nothing the collector keeps tracking; the weak references to live tensors
are the only tracked objects the log holds.

Op ``i`` owns inputs ``first_input[i]`` up to ``first_input[i + 1]`` and output slots ``first_slot[i]`` up to
``first_slot[i + 1]``; each slot has its (min, max) at ``ranges[2 * slot]`` and ``ranges[2 * slot + 1]`` (floats
from the compiled kernel, 0-d tensors from ``torch.aminmax``). ``op(i)`` rebuilds one op for the failure path.
"""
from __future__ import annotations

import weakref
from bisect import bisect_right
from typing import Any, NamedTuple, Optional

import torch


class LoggedOp(NamedTuple):
    """One op, rebuilt from the columns. ``inputs`` and ``outputs`` hold (slot, dtype, shape, weakref) per floating
    tensor; an input's slot is that of the output that wrote it in this step, None if it came from outside (only
    then is its weakref kept)."""

    func: Any
    node: Optional[str]
    seq: int
    module: Optional[str]
    tap: Optional[str]
    code: Any
    line: Optional[int]
    inputs: list
    outputs: list


class StepLog:
    """The ops of one step, appended on the hot path, read back on the failure path."""

    def __init__(self) -> None:
        self.func: list = []
        self.node: list[Optional[str]] = []
        self.seq: list[int] = []
        self.module: list[Optional[str]] = []
        self.tap: list[Optional[str]] = []
        self.code: list = []
        self.line: list[Optional[int]] = []
        self.first_input: list[int] = []
        self.first_slot: list[int] = []
        self.input_slot: list[Optional[int]] = []
        self.input_dtype: list = []
        self.input_shape: list[tuple] = []
        self.input_ref: list = []
        self.output_dtype: list = []
        self.output_shape: list[tuple] = []
        self.output_ref: list = []
        self.ranges: list = []

    def __len__(self) -> int:
        return len(self.func)

    def add_op(self, func, node: Optional[str], seq: int, module: Optional[str], tap: Optional[str], code,
               line: Optional[int]) -> None:
        self.func.append(func)
        self.node.append(node)
        self.seq.append(seq)
        self.module.append(module)
        self.tap.append(tap)
        self.code.append(code)
        self.line.append(line)
        self.first_input.append(len(self.input_slot))
        self.first_slot.append(len(self.output_ref))

    def add_input(self, slot: Optional[int], t: torch.Tensor) -> None:
        """An input of the op added last; only one from outside the step (slot None) keeps a weakref."""
        self.input_slot.append(slot)
        self.input_dtype.append(t.dtype)
        self.input_shape.append(tuple(t.shape))
        self.input_ref.append(None if slot is not None else weakref.ref(t))

    def add_output(self, t: torch.Tensor, min_max) -> int:
        """An output of the op added last, with its (min, max) pair; returns its slot."""
        self.output_dtype.append(t.dtype)
        self.output_shape.append(tuple(t.shape))
        self.output_ref.append(weakref.ref(t))
        self.ranges.extend(min_max)
        return len(self.output_ref) - 1

    def slots(self, index: int) -> range:
        """The output slots of op ``index``."""
        end = self.first_slot[index + 1] if index + 1 < len(self.first_slot) else len(self.output_ref)
        return range(self.first_slot[index], end)

    def op_of_slot(self, slot: int) -> int:
        """The index of the op whose output is ``slot``."""
        return bisect_right(self.first_slot, slot) - 1

    def op(self, index: int) -> LoggedOp:
        end = self.first_input[index + 1] if index + 1 < len(self.first_input) else len(self.input_slot)
        inputs = [(self.input_slot[j], self.input_dtype[j], self.input_shape[j], self.input_ref[j])
                  for j in range(self.first_input[index], end)]
        outputs = [(slot, self.output_dtype[slot], self.output_shape[slot], self.output_ref[slot])
                   for slot in self.slots(index)]
        return LoggedOp(self.func[index], self.node[index], self.seq[index], self.module[index],
                        self.tap[index], self.code[index], self.line[index], inputs, outputs)
