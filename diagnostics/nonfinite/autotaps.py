"""Automatic taps: the numerically risky calls of any loss, measured per source line while it runs.

Why: the researcher whose loss went NaN wrote it their way; they should not have to rewrite it with named taps
first. A ``TorchFunctionMode`` sees every torch call the loss makes (``torch.sqrt``, ``Tensor.clamp``, ``x ** 0.5``,
``a / b``) from the caller's frame, so each risky call is measured where the user wrote it (``sites``).

Per site: calls; log histograms (``LogHistogram``) of the risky input, of the output, of the gradient arriving at
the output and of the local derivative (1/(2 sqrt x) for sqrt, |a|/b^2 for a/b, 1/|x| for log, ...); for a clamp
the fraction of elements it moved to each bound (output above its input: raised to ``min``; below: lowered to
``max``; those get zero gradient); non-finite elements in the output and in the gradient the op sends back to its
inputs. Besides: ``masked_nonfinite``, op outputs (any op) that held NaN/Inf in a loss call whose final value was
finite (the ``if isnan: return pred.sum() * 0`` pattern), and host syncs (``.item()``, ``bool(t)``...) by line.

Cost: each call only appends references on the host; the tensors are reduced on their device when the pending
elements exceed ``budget`` or at ``result()``, whose read-back is the single host sync. A tensor that an in-place
op is about to overwrite is checked first. Nothing is installed outside ``run``/``with``: zero cost when not attached.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from geodiag.diagnostics.instruments import kernels
from geodiag.diagnostics.instruments.histograms import LogHistogram, summarize_states
from geodiag.diagnostics.nonfinite.autotap_result import AutoTapResult, assemble
from geodiag.diagnostics.nonfinite.given_input import InputReads
from geodiag.diagnostics.nonfinite.local_derivative import local_derivative
from geodiag.diagnostics.nonfinite.sites import (HOST_SYNCS, RISKY_OPS, boolean_index, caller_location, clamp_bounds,
                                                 format_site, func_name, is_inplace, made_by_geodiag, made_by_user,
                                                 risky_operands, runs_inside)

HISTOGRAM_KINDS = ("input", "output", "grad", "local_derivative")
# Calls passed straight through: attribute access, shape queries, and views and copies, whose values are those of
# a tensor already checked where it was made (a mask index is still counted as a host sync).
_PASS_THROUGH = frozenset({
    "__get__", "__set__", "dim", "size", "numel", "__len__", "is_floating_point", "__repr__", "__format__",
    "register_hook", "requires_grad_", "detach", "__hash__", "__eq__", "__getitem__", "view", "view_as", "reshape",
    "reshape_as", "expand", "expand_as", "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze", "flatten",
    "unflatten", "clone", "narrow", "select", "split", "chunk", "unbind", "movedim", "type_as", "to", "float",
    "half", "double", "bfloat16", "__contains__", "__iter__", "_is_view", "data_ptr", "untyped_storage"})


@dataclass(eq=False)
class _Site:
    name: str            # user's file:line
    op: str
    kind: str            # "risky", "host_sync" or "other"
    index: int
    calls: int = 0
    bounds: set = field(default_factory=set)               # numeric (min, max) a clamp was called with
    pending: list = field(default_factory=list)            # (input, output, extra) references, forward
    pending_grad: list = field(default_factory=list)       # (grad at output, [grads sent to inputs])
    histograms: dict = field(default_factory=dict)
    counters: Optional[torch.Tensor] = None                # at min, at max, clamp elements, non-finite sent back

    def histogram(self, kind: str, device: torch.device) -> LogHistogram:
        if kind not in self.histograms:
            self.histograms[kind] = LogHistogram(device=device)
        return self.histograms[kind]


class _TapMode(TorchFunctionMode):
    def __init__(self, taps: "AutoTaps") -> None:
        super().__init__()
        self.taps = taps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        if made_by_geodiag(caller) or (self.taps.user_calls_only and not made_by_user(caller)):
            return func(*args, **kwargs)
        if self.taps.codes is not None and not self.taps.codes_ran:
            self.taps.codes_ran = runs_inside(caller, self.taps.codes)
        kind = _KINDS.get(func)
        if kind is None:
            kind = _KINDS[func] = _kind(func)
        name, op, sync, inplace = kind
        if name in _PASS_THROUGH:
            if name == "__getitem__" and boolean_index(args):
                self.taps._site(*caller_location(2), "boolean index", "host_sync").calls += 1
            out = func(*args, **kwargs)
            if self.taps.input_reads.active:
                self._follow_input(name, args, kwargs, out)
            return out
        taps = self.taps
        operands = risky_operands(op, name, args, kwargs) if op is not None else None
        if inplace:
            taps._before_overwrite(args[0] if args else None)
            if operands is not None:
                operands = (operands[0].detach().clone(),) + operands[1:]
            if name == "__setitem__" and boolean_index(args):
                taps._site(*caller_location(2), "boolean index", "host_sync").calls += 1
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            taps.raised.append({"site": format_site(*caller_location(2)), "op": name.strip("_"),
                                "message": f"{type(exc).__name__}: {exc}".splitlines()[0]})
            raise
        if taps.input_reads.active:
            self._follow_input(name, args, kwargs, out)
        if sync is not None:
            taps._site(*caller_location(2), sync, "host_sync").calls += 1
            return out
        first = out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) else out
        if not isinstance(first, torch.Tensor) or not first.is_floating_point():
            return out
        file, line = caller_location(2)
        if operands is None:
            site = taps._site(file, line, name.strip("_"), "other")
        else:
            site = taps._site(file, line, op, "risky")
            taps._record(site, operands, first, name, args, kwargs)
        site.calls += 1
        (taps._scalars if first.dim() == 0 else taps._outputs).append((site.index, first))
        return out

    def _follow_input(self, name: str, args: tuple, kwargs: dict, out) -> None:
        """The loss's input followed through this call; a call reading it as the other kind is recorded."""
        misread = self.taps.input_reads.follow(name, args, kwargs, out)
        if misread is not None:
            self.taps.input_reads.record(format_site(*caller_location(3)), misread)


_KINDS: dict = {}  # torch function -> (name, risky op or None, host sync or None, in place)


def _kind(func) -> tuple:
    name = func_name(func)
    return name, RISKY_OPS.get(name), HOST_SYNCS.get(name), is_inplace(name) if name else False


class AutoTaps:
    """Collects the risky calls, masked non-finite values and host syncs of every loss call made through it.

    ``value = taps.run(loss, *args)`` (or ``with taps: ...`` for code that is not one loss call, with
    ``taps.judge(final)`` before leaving it to judge masked values against that code's final value),
    ``value.backward()``, then ``taps.result()``: one read-back of everything. With ``user_calls_only`` only the
    calls the user's own code makes are tapped (a training step's network and nnU-Net's loss pass through); a call
    that raises is listed in ``raised`` and its exception goes on unchanged; ``codes_ran`` says whether a call was
    made inside one of the functions ``codes`` names.
    """

    def __init__(self, budget: int = 1 << 22, user_calls_only: bool = False,
                 codes: Optional[frozenset] = None) -> None:
        self.budget = budget               # pending elements held before reducing on the device
        self.user_calls_only = user_calls_only  # tap only calls the user's own code makes (not nnU-Net's, torch's)
        self.codes = codes                 # (file, first line) of functions to notice running (``codes_ran``)
        self.codes_ran = False
        self.raised: list[dict] = []       # calls that raised: site, op, one-line message (re-raised unchanged)
        self.input_reads = InputReads()    # calls reading the loss's input as the other kind (``given_input``)
        self._sites: dict = {}
        self._order: list[_Site] = []
        self._outputs: list = []           # (site index, output) of the current loss call, not yet checked
        self._scalars: list = []           # the same, for 0-dim outputs (checked together in one stack)
        self._checked: list = []           # (site indices, non-finite flags) of the current loss call
        self._masked: dict = {}            # output sequence -> (site indices, masked counts); see _masked_counts
        self._pending_elements = 0
        self._mode: Optional[_TapMode] = None

    # ------------------------------------------------------------------ attach
    def __enter__(self) -> "AutoTaps":
        self._attach()
        return self

    def __exit__(self, *exc) -> None:
        self._detach()
        self._outputs, self._scalars, self._checked = [], [], []  # no final value: nothing to judge masked against

    def _attach(self) -> None:
        self._mode = _TapMode(self)
        self._mode.__enter__()
        self.input_reads.listen()

    def _detach(self) -> None:
        self.input_reads.stop_listening()
        self._mode.__exit__(None, None, None)
        self._mode = None

    def run(self, loss: Callable, *args, **kwargs):
        """``loss(*args, **kwargs)`` with taps; its outputs' non-finite values count as masked if it is finite."""
        self._attach()
        try:
            value = loss(*args, **kwargs)
        except BaseException:
            self._outputs, self._scalars, self._checked = [], [], []  # a failed call has no value to judge against
            raise
        finally:
            self._detach()
        if isinstance(value, torch.Tensor):
            self.judge(value)
        self._checked = []
        return value

    def judge(self, final: torch.Tensor) -> None:
        """The outputs seen since the last judgment held NaN/Inf while ``final`` (the value they led to) is finite:
        count them as masked. No sync: the counts stay on the device until ``result()``."""
        self._check_outputs()
        if self._checked:
            flags = torch.cat([f for _, f in self._checked])
            final_finite = torch.isfinite(final.detach().to(flags.device)).all()
            indices = tuple(i for site_indices, _ in self._checked for i in site_indices)
            self._masked_counts(indices, flags.device)[1].add_(flags & final_finite)
        self._checked = []

    def _masked_counts(self, indices: tuple, device: torch.device) -> tuple:
        """(site index per output, masked count per output) for one sequence of outputs. A loss makes the same
        sequence of calls every time, so the copy of the indices to the device (on CUDA a stream sync when
        copied from pageable memory) happens once per distinct sequence, and the counts stay one tensor."""
        key = (indices, device)
        entry = self._masked.get(key)
        if entry is None:
            entry = self._masked[key] = (torch.tensor(indices, device=device),
                                         torch.zeros(len(indices), dtype=torch.int64, device=device))
        return entry

    # ------------------------------------------------------------------ called by the mode
    def _site(self, file: str, line: int, op: str, kind: str) -> _Site:
        key = (file, line, op)
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = _Site(format_site(file, line), op, kind, len(self._order))
            self._order.append(site)
        return site

    def _record(self, site: _Site, operands: tuple, out: torch.Tensor, name: str, args: tuple, kwargs: dict) -> None:
        watched, extra = operands
        if site.op == "clamp":
            extra = None
            site.bounds.add(clamp_bounds(name, args, kwargs))
        elif site.op == "div" and isinstance(watched, torch.Tensor) and watched.shape != out.shape:
            watched = watched.expand_as(out)
        site.pending.append((watched.detach(), out.detach(), extra))
        self._pending_elements += 2 * out.numel()
        if out.requires_grad and out.grad_fn is not None:
            out.grad_fn.register_hook(partial(self._record_grad, site))
        if self._pending_elements > self.budget:
            self._reduce()

    def _record_grad(self, site: _Site, grad_inputs, grad_outputs) -> None:
        arriving = grad_outputs[0] if grad_outputs else None
        sent = [g for g in grad_inputs if g is not None]
        site.pending_grad.append((arriving, sent))
        self._pending_elements += (arriving.numel() if arriving is not None else 0) + sum(g.numel() for g in sent)
        if self._pending_elements > self.budget:
            self._reduce()

    def _before_overwrite(self, target) -> None:
        """An in-place op is about to change ``target``: judge the outputs held so far, and reduce the pending
        risky tensors now if ``target`` shares memory with one of them."""
        self._check_outputs()
        if not isinstance(target, torch.Tensor):
            return
        memory = target.untyped_storage().data_ptr()
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == memory
               for site in self._order for record in site.pending for t in record[:2]):
            self._reduce()

    def _check_outputs(self) -> None:
        """Flags the outputs seen so far that hold a NaN/Inf: one stack for the 0-dim outputs, and for the others
        the compiled min/max on fp32 CPU tensors, else one fused max |x| (NaN propagates)."""
        if not (self._outputs or self._scalars):
            return
        indices, flags = [], []
        with torch.no_grad():
            if self._scalars:
                indices += [i for i, _ in self._scalars]
                flags.append(~torch.isfinite(torch.stack([t for _, t in self._scalars]).float()))
            if self._outputs:
                indices += [i for i, _ in self._outputs]
                tensors = [t if t.numel() else t.new_zeros(()) for _, t in self._outputs]
                ranges = [kernels.min_max(t) for t in tensors]
                if all(r is not None for r in ranges):  # fp32 on the CPU: read in place, no copies
                    flags.append(torch.tensor([not (math.isfinite(low) and math.isfinite(high))
                                               for low, high in ranges]))
                else:
                    largest = torch._foreach_max(torch._foreach_abs(tensors))
                    flags.append(~torch.isfinite(torch.stack(largest).float()))
        self._outputs, self._scalars = [], []
        self._checked.append((indices, torch.cat(flags)))

    # ------------------------------------------------------------------ reduce on the device
    @torch.no_grad()
    def _reduce(self) -> None:
        for site in self._order:
            if site.pending:
                self._reduce_forward(site)
            if site.pending_grad:
                self._reduce_backward(site)
        self._pending_elements = 0

    def _reduce_forward(self, site: _Site) -> None:
        records, site.pending = site.pending, []
        device = records[0][1].device
        inputs = _joined([_flat(x, y) for x, y, _ in records])
        outputs = _joined([y.reshape(-1).float() if y.dtype != torch.float64 else y.reshape(-1) for _, y, _ in records])
        site.histogram("input", device).update(inputs)
        site.histogram("output", device).update(outputs)
        counters = self._counters(site, device)
        if site.op == "clamp" and inputs.numel() == outputs.numel():
            counters[0] += (outputs > inputs).sum()  # raised to min
            counters[1] += (outputs < inputs).sum()  # lowered to max
            counters[2] += outputs.numel()
        derivative = local_derivative(site.op, inputs, outputs, [(y.numel(), e) for _, y, e in records])
        if derivative is not None:
            site.histogram("local_derivative", device).update(derivative)

    def _reduce_backward(self, site: _Site) -> None:
        records, site.pending_grad = site.pending_grad, []
        arriving = [a.reshape(-1) for a, _ in records if a is not None]
        sent = [g.reshape(-1) for _, gs in records for g in gs]
        if not arriving and not sent:
            return
        device = (arriving or sent)[0].device
        if arriving:
            site.histogram("grad", device).update(*arriving)
        if sent:
            sent = _joined([g.float() if g.dtype != torch.float64 else g for g in sent])
            self._counters(site, device)[3] += sent.numel() - torch.isfinite(sent).sum()

    @staticmethod
    def _counters(site: _Site, device: torch.device) -> torch.Tensor:
        if site.counters is None:
            site.counters = torch.zeros(4, dtype=torch.int64, device=device)
        return site.counters

    # ------------------------------------------------------------------ read back
    def result(self) -> AutoTapResult:
        """Everything measured so far, read back from the device in one transfer."""
        self._reduce()
        parts, layout = [], []
        for site in self._order:
            for kind in HISTOGRAM_KINDS:
                if kind in site.histograms:
                    parts.append(site.histograms[kind].packed())
                    layout.append((site, kind, site.histograms[kind]))
            if site.counters is not None:
                parts.append(site.counters.double())
                layout.append((site, "counters", None))
        masked = torch.zeros(len(self._order), dtype=torch.float64)
        if self._masked:
            device = next(iter(self._masked.values()))[0].device
            per_site = torch.zeros(len(self._order), dtype=torch.float64, device=device)
            for indices, counts in self._masked.values():
                per_site.index_add_(0, indices, counts.double())
            parts.append(per_site)
        host = torch.cat([p.to(parts[0].device) for p in parts]).cpu().numpy() if parts else None
        states, counters, offset = [], {}, 0
        for site, kind, hist in layout:
            size = hist.packed_size if hist is not None else 4
            chunk = host[offset:offset + size]
            offset += size
            if hist is not None:
                states.append(chunk)
            else:
                counters[site.index] = [int(v) for v in chunk]
        tapped = [(site, kind, hist) for site, kind, hist in layout if hist is not None]
        histograms = {(site.name, site.op, kind): summary for (site, kind, _), summary in
                      zip(tapped, summarize_states([hist for _, _, hist in tapped], states))}
        if self._masked:
            masked = host[offset:offset + len(self._order)]
        return assemble(self._order, histograms, counters, masked, self.input_reads.rows())


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """One flat tensor of the parts, without a copy when there is one (a fresh AutoTaps per loss call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _flat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The watched input flattened, broadcast to its output's shape where it was broadcast, in fp32 or fp64."""
    if isinstance(x, torch.Tensor) and x.shape != y.shape and x.numel() < y.numel():
        try:
            x = x.expand_as(y)
        except RuntimeError:
            pass
    return x.reshape(-1).float() if x.dtype != torch.float64 else x.reshape(-1)
