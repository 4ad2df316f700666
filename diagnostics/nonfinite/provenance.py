"""Find the first op that PRODUCED a NaN or +-Inf (finite inputs, non-finite output), in forward and backward.

``torch.autograd.detect_anomaly`` checks backward nodes only, for NaN only, and blames the node whose
output first holds a NaN: for ``sqrt(x * x)`` at x = 0 that is MulBackward0, which only turned the Inf of
SqrtBackward0 into NaN. This mode watches every aten op, forward and backward, and blames the producer.

How, and what it costs (see the module docstring of ``geodiag.diagnostics.nonfinite.replay`` for the full checks):

- A ``TorchDispatchMode`` sees every aten op. The autograd engine carries the mode into backward (checked on
  CPU with torch 2.15: for sqrt(x * x) it sees expand in SumBackward0, mul.Scalar and div.Tensor in
  SqrtBackward0, mul/mul/add in MulBackward0, detach in AccumulateGrad) and
  ``torch._C._current_autograd_node()`` names the node being run. During a forward op's dispatch,
  ``torch._C._autograd._get_sequence_nr() - 1`` is the sequence number of the node it creates.
- Per op it launches one ``torch.aminmax`` per floating output and keeps the two 0-d results on the device:
  one kernel, no host sync (``isfinite().all()`` is a reduction plus a host read).
  ``step_end()`` reads all of them at once: one host sync per step. A contiguous fp32 CPU output is read by the
  compiled min/max kernel instead (``instruments.kernels``), which returns floats at once: there is no device.
- Inputs are never re-checked: each output's device address maps to the slot of the op that wrote it, so an
  input's finiteness and range are read from its producer's min/max. Only inputs from outside the step
  (parameters, the batch) are checked, and only for an op whose output was flagged.
- Context costs no sync: module path from forward pre/post hooks, the loss's last emitted tap, the forward
  source line (a short frame walk), the autograd sequence number. A backward op inherits the module, tap and
  source line of the forward op that created its node (same sequence number).

Its cost, side by side with a plain step and detect_anomaly, is what ``geodiag bench`` measures (see the README).

The mode and its per-op bookkeeping (module and tap context, the blame) stay in this module: they share one step's
state. What the step keeps of its ops until ``step_end`` is ``step_log`` (stored column by column, so that the
garbage collector has nothing new to walk); what a finding says (the report types) is ``provenance_report``.

``sync="op"`` reads each op's flag at once instead (a host sync per op) and captures full details of the
producer while its tensors are alive; ``replay`` uses it. With ``sync="step"`` the producer's tensors are
usually freed by then: its location, dtypes, shapes and input ranges are exact, output counts need a replay.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..instruments import kernels
from ..instruments.errors import GeodiagError
from .provenance_report import ProvenanceReport, TensorSummary, source_line, summarize
from .sites import caller_code
from .step_log import LoggedOp, StepLog

SYNC_MODES = ("step", "op")


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    """The non-empty floating tensors among op arguments or results, one list/tuple level deep (cat, foreach)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel():
                found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(t for t in value if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel())
    return found


# How an op is recorded. NORMAL: its outputs are checked. SAME_VALUES: outputs hold (some of) the source
# input's values (views, copies), so they share its slot: they cannot produce a non-finite value and need no
# check. CAST: the same, unless it narrows the dtype (fp32 -> fp16 can overflow), then NORMAL. GARBAGE: the
# output is uninitialised memory until another op writes it (checking it would report noise).
_NORMAL, _SAME_VALUES, _CAST, _GARBAGE = range(4)
_UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                            "empty_permuted", "resize_", "set_"})
_COPIES = frozenset({"clone", "repeat", "_unsafe_view", "contiguous"})
_CASTS = frozenset({"_to_copy", "copy_"})


def _kind(func) -> int:
    name = func.overloadpacket.__name__
    if name in _UNINITIALISED:
        return _GARBAGE
    if name in _CASTS:
        return _CAST
    return _SAME_VALUES if func.is_view or name in _COPIES else _NORMAL


class _Recorder(TorchDispatchMode):
    """The dispatch mode: runs each op, then hands it to its owner to record."""

    def __init__(self, owner: "NonFiniteProvenance") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.owner._recording:
            self.owner._record(func, args, kwargs, out)
        return out


class NonFiniteProvenance:
    """Context manager naming the first op that produced NaN/+-Inf in a step, forward or backward.

    ``model`` (optional) gives module paths and parameter names; ``loss`` (optional, a module with
    ``register_tap``) gives the last emitted tap before the op. ``allow`` declares intentional non-finite
    values: an op is never blamed if any of its names is listed (aten overload ``aten.masked_fill.Scalar``,
    packet ``aten.masked_fill`` or bare ``masked_fill``, autograd node ``SoftmaxBackward0``, tap name or
    module path). What an allowed op outputs still counts as non-finite, so the ops that consume it only pass
    it on and are not blamed either.

    Usage::

        with NonFiniteProvenance(model, loss) as prov:
            for batch in loader:
                loss_value = step(batch)          # forward + backward
                report = prov.step_end()         # the one host sync of the step; None when all finite
        prov.report()                            # the first report since entering, or None
    """

    def __init__(self, model: Optional[nn.Module] = None, loss: Optional[nn.Module] = None, *,
                 allow: Iterable[str] = (), sync: str = "step", source_lines: bool = True) -> None:
        if sync not in SYNC_MODES:
            raise GeodiagError(f"unknown sync mode {sync!r}; choose one of {', '.join(SYNC_MODES)}")
        if isinstance(allow, str):
            allow = (allow,)
        self.model = model
        self.loss = loss
        self.allow = frozenset(allow)
        self.sync = sync
        self.source_lines = source_lines
        self.reports: list[ProvenanceReport] = []
        self._step = 0
        self._mode: Optional[_Recorder] = None
        self._handles: list = []
        self._param_names: dict[int, str] = {}
        self._kinds: dict[Any, int] = {}
        self._recording = False
        self._reset_step()

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "NonFiniteProvenance":
        if self._mode is not None:
            raise RuntimeError("NonFiniteProvenance is not re-entrant")
        self._install_hooks()
        self._mode = _Recorder(self)
        self._mode.__enter__()
        self._recording = True
        return self

    def __exit__(self, *exc) -> None:
        self._recording = False
        try:
            if len(self._log):
                self._finish_step()
        finally:
            self._mode.__exit__(*exc)
            self._mode = None
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def step_end(self) -> Optional[ProvenanceReport]:
        """Close the current step: one host sync; the step's report (also appended to ``reports``) or None."""
        self._recording = False
        try:
            return self._finish_step()
        finally:
            self._recording = self._mode is not None

    def report(self) -> Optional[ProvenanceReport]:
        """The first report since entering (closing the current step if it has ops), or None if all was finite."""
        if len(self._log):
            self.step_end()
        return self.reports[0] if self.reports else None

    # ------------------------------------------------------------------ context
    def _install_hooks(self) -> None:
        seen: set[int] = set()
        named: list[tuple[str, nn.Module]] = []
        if self.model is not None:
            root = type(self.model).__name__
            named += [(f"{root}.{name}" if name else root, m) for name, m in self.model.named_modules()]
            # Keyed by address so that views (weight.t() inside F.linear) find their parameter's name too.
            self._param_names = {t.data_ptr(): n for n, t in (*self.model.named_parameters(),
                                                                *self.model.named_buffers()) if t.numel()}
        if self.loss is not None:
            named.append((type(self.loss).__name__, self.loss))
            if hasattr(self.loss, "register_tap"):
                self._handles.append(self.loss.register_tap(self._on_tap))
        for name, module in named:
            if id(module) in seen:
                continue
            seen.add(id(module))
            label = f"{name} ({type(module).__name__})" if not name.endswith(type(module).__name__) else name
            is_loss = module is self.loss
            self._handles.append(module.register_forward_pre_hook(self._enter_module(label, is_loss)))
            self._handles.append(module.register_forward_hook(self._leave_module(is_loss), always_call=True))

    def _enter_module(self, label: str, is_loss: bool):
        def hook(module, args):
            self._modules.append(label)
            if is_loss:
                self._tap = None
        return hook

    def _leave_module(self, is_loss: bool):
        def hook(module, args, output):
            if self._modules:
                self._modules.pop()
            if is_loss:
                self._tap = None
        return hook

    def _on_tap(self, name: str, tensor: torch.Tensor) -> None:
        self._tap = name

    # ------------------------------------------------------------------ hot path
    def _reset_step(self) -> None:
        self._log = StepLog()
        self._host_ranges: list[float] = []     # min, max, min, max, ... read back (at step_end, or per op)
        self._producer: dict[int, int] = {}     # data_ptr -> slot of the output that last wrote there
        self._modules: list[str] = []
        self._tap: Optional[str] = None
        self._produced: Optional[ProvenanceReport] = None   # the first op with finite inputs, non-finite output
        self._received: Optional[ProvenanceReport] = None   # else the first op fed NaN/Inf from outside the step

    def _record(self, func, args, kwargs, out) -> None:
        kind = self._kinds.get(func)
        if kind is None:
            kind = self._kinds[func] = _kind(func)
        producer = self._producer
        outs = _tensors(out if isinstance(out, (list, tuple)) else (out,))
        if kind != _NORMAL:
            inputs = _tensors(args) if kind != _GARBAGE else ()
            source = inputs[-1] if inputs and func.overloadpacket.__name__ == "copy_" else inputs[0] if inputs else None
            if kind != _CAST or source is None or all(t.dtype.itemsize >= source.dtype.itemsize for t in outs):
                slot = producer.get(source.data_ptr()) if source is not None else None
                for t in outs:
                    if slot is None:
                        producer.pop(t.data_ptr(), None)
                    else:
                        producer[t.data_ptr()] = slot
                return
        if not outs:
            return
        log = self._log
        node = torch._C._current_autograd_node()
        if node is None:
            code, line = caller_code(3) if self.source_lines else (None, None)
            log.add_op(func, None, torch._C._autograd._get_sequence_nr() - 1,
                       self._modules[-1] if self._modules else None, self._tap, code, line)
        else:
            log.add_op(func, node.name(), node._sequence_nr(), None, None, None, None)
        for t in _tensors(args if not kwargs else (*args, *kwargs.values())):
            log.add_input(producer.get(t.data_ptr()), t)
        for t in outs:
            producer[t.data_ptr()] = log.add_output(t, kernels.min_max(t) or torch.aminmax(t))
        if self.sync == "op":
            self._check_now(len(log) - 1)

    # ------------------------------------------------------------------ resolution
    def _check_now(self, index: int) -> None:
        """sync="op": read this op's ranges now; at a producer, report with live tensors and stop recording."""
        slots = self._log.slots(index)
        self._host_ranges.extend(_read_back(self._log.ranges[2 * slots.start:]))
        if not all(self._slot_finite(slot) for slot in slots):
            self._consider(self._log.op(index))
            if self._produced is not None:
                self._recording = False

    def _finish_step(self) -> Optional[ProvenanceReport]:
        log = self._log
        if self.sync == "step" and log.ranges:
            self._host_ranges = _read_back(log.ranges)
            if not all(map(math.isfinite, self._host_ranges)):
                first = next(i for i, value in enumerate(self._host_ranges) if not math.isfinite(value)) // 2
                for index in range(log.op_of_slot(first), len(log)):
                    if not all(self._slot_finite(slot) for slot in log.slots(index)):
                        self._consider(log.op(index))
                        if self._produced is not None:
                            break
        report = self._produced or self._received
        if report is not None:
            self.reports.append(report)
        self._step += 1
        self._reset_step()
        return report

    def _slot_finite(self, slot: int) -> bool:
        low, high = self._host_ranges[2 * slot], self._host_ranges[2 * slot + 1]
        return math.isfinite(low) and math.isfinite(high)

    def _slot_max_abs(self, slot: int) -> float:
        return max(abs(self._host_ranges[2 * slot]), abs(self._host_ranges[2 * slot + 1]))

    def _slot_contents(self, slot: int) -> str:
        """What a slot's min/max say about it: NaN hides Inf (aminmax propagates NaN)."""
        low, high = self._host_ranges[2 * slot], self._host_ranges[2 * slot + 1]
        if math.isnan(low) or math.isnan(high):
            return "holds NaN"
        signs = [name for name, hit in (("+Inf", high == math.inf), ("-Inf", low == -math.inf)) if hit]
        return "holds " + " and ".join(signs) if signs else "finite"

    def _consider(self, op: LoggedOp) -> None:
        """Judge an op with a non-finite output: a producer (all inputs finite), the first op to receive a
        non-finite value from outside the step (kept in case no producer follows), or a pass-through."""
        inputs, step_inputs_finite, outside_inputs_finite = [], True, True
        for slot, dtype, shape, ref in op.inputs:
            if slot is not None:
                finite = self._slot_finite(slot)
                summary = TensorSummary(dtype, shape, f"made by {self._origin_op(self._writer_of(slot))}",
                                        max_abs_finite=self._slot_max_abs(slot) if finite else None)
                step_inputs_finite = step_inputs_finite and finite
            else:
                live = ref()
                summary = (summarize(live, self._outside_origin(live)) if live is not None else
                           TensorSummary(dtype, shape, "from outside the step, freed before it could be checked"))
                finite = summary.finite is not False
                outside_inputs_finite = outside_inputs_finite and finite
            inputs.append(summary)
        if not step_inputs_finite or (not outside_inputs_finite and self._received is not None):
            return
        forward = self._forward_of(op) if op.node is not None else op
        names = {str(op.func), str(op.func.overloadpacket), op.func.overloadpacket.__name__, op.node}
        if forward is not None:
            names |= {forward.tap, forward.module}
        if names & self.allow:
            return
        outputs = tuple(summarize(ref(), "") if ref() is not None else
                        TensorSummary(dtype, shape, f"{self._slot_contents(slot)}; values freed before step_end, "
                                                    "replay the batch for counts")
                        for slot, dtype, shape, ref in op.outputs)
        report = ProvenanceReport(
            step=self._step, phase="forward" if op.node is None else "backward",
            produced=outside_inputs_finite, op=str(op.func), node=op.node,
            forward_op=str(forward.func) if forward is not None and op.node is not None else None,
            module=forward.module if forward else None, tap=forward.tap if forward else None,
            source=source_line(forward.code, forward.line) if forward else None,
            inputs=tuple(inputs), outputs=outputs)
        if outside_inputs_finite:
            self._produced = report
        else:
            self._received = report

    def _forward_of(self, op: LoggedOp) -> Optional[LoggedOp]:
        """The forward op that created the autograd node of a backward op.

        Forward ops record the autograd sequence number current when they ran; ops that made no node share it
        with the op before them, so among equal numbers the one whose name matches the node's is preferred.
        """
        log = self._log
        candidates = [log.op(i) for i in range(len(log)) if log.node[i] is None and log.seq[i] == op.seq]
        stem = op.node.replace("_", "").lower()
        named = [f for f in candidates if stem.startswith(f.func.overloadpacket.__name__.replace("_", "").lower())]
        return (named or candidates or [None])[0]

    def _writer_of(self, slot: int) -> LoggedOp:
        return self._log.op(self._log.op_of_slot(slot))

    def _origin_op(self, op: LoggedOp) -> str:
        return f"{op.func}" + (f" in {op.node}" if op.node else "")

    def _outside_origin(self, t: torch.Tensor) -> str:
        name = self._param_names.get(t.data_ptr())
        return f"from outside the step: {name}" if name else "from outside the step"


def _read_back(ranges: Sequence) -> list[float]:
    """The flat min, max, min, max, ... list as floats: one device-to-host copy per device (normally one); values
    the CPU kernel gave are floats already."""
    by_device: dict[torch.device, list[int]] = {}
    for index, value in enumerate(ranges):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(index)
    if not by_device:
        return list(ranges)
    values = [value if not isinstance(value, torch.Tensor) else 0.0 for value in ranges]
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([ranges[i] for i in indices]).tolist()):
            values[index] = value
    return values
