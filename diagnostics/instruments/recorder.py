"""Records forward values and backward gradients of a loss's taps, of chosen tensors and of a network.

Why: to see where a gradient becomes large, zero or non-finite, one needs the distribution of every
intermediate in forward and of the gradient that reaches it in backward, every N steps, cheaply enough to
leave on. Everything accumulates into device-side ``LogHistogram``s (no host sync per step); ``snapshot()``
reads all of them back in one transfer per device.

For each sqrt of the loss (taps ``compactness.sqrt_input`` and, with the seed formula, ``aspect.sqrt_input``)
the recorder also histograms the local derivative 1 / (2 sqrt(x)) computed from the input, and for the
quantity the stabiliser acts on (``compactness.grad_mag_squared``, ``aspect.discriminant``) it counts exactly
the fraction below each eps of ``eps_grid``; the zero-gradient fraction there is the clamp's dead zone.

Gradients are recorded as they arrive: under a GradScaler they are scaled by the current scale, which is
what decides fp16 overflow. Network gradients use per-parameter tensor hooks and conv outputs use forward
hooks plus tensor hooks (``register_full_backward_hook`` breaks on nnU-Net's in-place LeakyReLU); pooled parameter
gradients come through one multi-grad hook, so they are histogrammed in one update per step.
"""
from __future__ import annotations

from functools import partial
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .histogram_bins import BinLayout
from .histograms import LogHistogram, decade_grid, summarize_states

KINDS = ("value", "grad", "local_derivative")
# sqrt input tap -> the tap holding what the stabiliser acts on (s for the perimeter, tr^2 - 4 det for aspect).
SQRT_STAGES = {
    "compactness.sqrt_input": "compactness.grad_mag_squared",
    "aspect.sqrt_input": "aspect.discriminant",
}
THRESHOLDED = tuple(SQRT_STAGES.values())


class Attachment:
    """The hooks one ``attach_*`` call installed; ``remove()`` or use as a context manager to detach."""

    def __init__(self, handles: Sequence[RemovableHandle]) -> None:
        self._handles = list(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Recorder:
    """Value / gradient histograms of named tensors, recorded on every ``every``-th step (or when its owner says).

    ``names`` is a whitelist over everything this recorder would record (loss tap names, names given to
    ``attach_tensor``, ``network.parameters`` or ``network.<module>``); None records all.
    """

    def __init__(
        self,
        every: int = 1,
        names: Optional[Iterable[str]] = None,
        eps_grid: Sequence[float] = decade_grid(),
        layout: BinLayout = BinLayout(),
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.names = None if names is None else frozenset(names)
        self.eps_grid = tuple(sorted(float(e) for e in eps_grid))
        self.layout = layout
        self._step = 0
        self.recording = True  # whether the current step is recorded (step 0 is)
        self._histograms: dict[tuple[str, str], LogHistogram] = {}
        self._attachments: list[Attachment] = []

    # ------------------------------------------------------------------ schedule
    def step(self, number: Optional[int] = None, record: Optional[bool] = None) -> None:
        """Advance to the next step (call once per training iteration), or to step ``number`` (numbered as its owner
        numbers them); it is recorded when ``record`` says so, else when it is an ``every``-th step."""
        self._step = self._step + 1 if number is None else number
        self.recording = self._step % self.every == 0 if record is None else record

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names

    # ------------------------------------------------------------------ attach
    def attach_loss(self, loss) -> Attachment:
        """Record every tap of ``loss`` (a ``Tappable`` such as GeometricLoss) that ``names`` allows."""
        tap_names = None if self.names is None else [n for n in loss.TAP_NAMES if n in self.names]
        return self._keep([loss.register_tap(self.attach_tensor, names=tap_names)])

    def attach_network(
        self,
        net: nn.Module,
        prefix: str = "network",
        per_parameter: bool = False,
        conv_outputs: bool = False,
    ) -> Attachment:
        """Record parameter gradients (one pooled histogram, or one per parameter) and optionally the value
        and gradient of every convolution's output."""
        handles = []
        named = [(param_name, param) for param_name, param in net.named_parameters() if param.requires_grad]
        if per_parameter:
            handles += [param.register_hook(partial(self._on_grad, f"{prefix}.{param_name}"))
                        for param_name, param in named]
        elif named:  # one call with every gradient once backward has them all: one histogram update, not one each
            handles.append(torch.autograd.graph.register_multi_grad_hook(
                [param for _, param in named], partial(self._on_grads, f"{prefix}.parameters"), mode="all"))
        if conv_outputs:
            for module_name, module in net.named_modules():
                if isinstance(module, nn.modules.conv._ConvNd):
                    hook = partial(self._on_module_output, f"{prefix}.{module_name}")
                    handles.append(module.register_forward_hook(hook))
        return self._keep(handles)

    def detach(self) -> None:
        """Remove every hook this recorder installed."""
        for attachment in self._attachments:
            attachment.remove()
        self._attachments.clear()

    # ------------------------------------------------------------------ hooks
    def attach_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Record ``tensor``'s value now and, if it requires grad, the gradient that reaches it in the coming
        backward (e.g. the logits). Pass this step's tensor: the gradient hook lives as long as the tensor.
        Also the tap callable of ``attach_loss``."""
        if not (self.recording and self.wants(name)):
            return
        self._histogram(name, "value", tensor).update(tensor)
        if name in SQRT_STAGES:
            self._histogram(name, "local_derivative", tensor).update(0.5 * torch.rsqrt(tensor.detach()))
        if tensor.requires_grad:
            tensor.register_hook(partial(self._on_grad, name))

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        if self.recording and self.wants(name):
            self._histogram(name, "grad", grad).update(grad)

    def _on_grads(self, name: str, grads: Sequence[Optional[torch.Tensor]]) -> None:
        if self.recording and self.wants(name):
            present = [g for g in grads if g is not None]
            if present:
                self._histogram(name, "grad", present[0]).update(*present)

    def _on_module_output(self, name: str, module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            self.attach_tensor(name, output)

    def _histogram(self, name: str, kind: str, like: torch.Tensor) -> LogHistogram:
        key = (name, kind)
        histogram = self._histograms.get(key)
        if histogram is None:
            thresholds = self.eps_grid if (kind == "value" and name in THRESHOLDED) else ()
            histogram = LogHistogram(self.layout, thresholds, device=like.device)
            self._histograms[key] = histogram
        return histogram

    def _keep(self, handles: Sequence[RemovableHandle]) -> Attachment:
        attachment = Attachment(handles)
        self._attachments.append(attachment)
        return attachment

    # ------------------------------------------------------------------ read back
    def histograms(self) -> dict[tuple[str, str], LogHistogram]:
        """The live histograms keyed by (name, kind), e.g. to merge or all_reduce them."""
        return dict(self._histograms)

    def snapshot(self) -> list[dict]:
        """Rows (name, kind, step, stats..., bin_counts) for every histogram that saw data; one transfer
        per device."""
        by_device: dict[torch.device, list[tuple[tuple[str, str], LogHistogram]]] = {}
        for key, histogram in self._histograms.items():
            by_device.setdefault(histogram.device, []).append((key, histogram))
        rows = []
        for items in by_device.values():
            host = torch.cat([h.packed() for _, h in items]).cpu().numpy()
            offsets = np.cumsum([0] + [h.packed_size for _, h in items])
            summaries = summarize_states([h for _, h in items],
                                         [host[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])])
            for ((name, kind), _), summary in zip(items, summaries):
                if summary["count"]:
                    rows.append({"name": name, "kind": kind, **summary})
        rows.sort(key=lambda row: (row["name"], KINDS.index(row["kind"])))
        return rows

    def reset(self) -> None:
        """Zero every histogram (kept allocated); the step counter and hooks stay."""
        for histogram in self._histograms.values():
            histogram.reset()


def sqrt_summary(rows: Sequence[dict]) -> list[dict]:
    """Per sqrt of the loss, from ``Recorder.snapshot()`` rows: what the sqrt saw, its local derivative, the
    gradient that reached the stabilised quantity, the dead zone (exactly zero gradient there) and the
    exact fraction of that quantity below each eps of the grid."""
    table = {(row["name"], row["kind"]): row for row in rows}
    out = []
    for sqrt_input, stabilised in SQRT_STAGES.items():
        if (sqrt_input, "value") not in table:
            continue
        entry = {"sqrt": sqrt_input, "stabilised": stabilised}
        source = table[(sqrt_input, "value")]
        entry.update(input_min=source["min"], input_p50=source["abs_p50"],
                     input_nonfinite=source["count"] - source["finite"])
        derivative = table.get((sqrt_input, "local_derivative"))
        if derivative is not None:
            entry.update(local_derivative_max=derivative["max"], local_derivative_p99=derivative["abs_p99"],
                         local_derivative_inf=derivative["posinf"])
        grad = table.get((stabilised, "grad"))
        if grad is not None:
            entry.update(grad_abs_max=max(abs(grad["min"]), abs(grad["max"])),
                         grad_nonfinite=grad["count"] - grad["finite"], dead_zone_fraction=grad["zero_fraction"])
        value = table.get((stabilised, "value"))
        if value is not None:
            entry.update({k: v for k, v in value.items() if k.startswith("below_")})
        out.append(entry)
    return out
