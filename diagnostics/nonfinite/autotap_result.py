"""What automatic taps found, as rows a report can rank: one row per risky or host-sync site (``AutoTapResult``),
built from the taps' single read-back (``assemble``). Kept apart from the ``TorchFunctionMode`` that measures, so
tools that only read or merge results (own_loss's per-case tables) need not know the mode."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AutoTapResult:
    """``sites``: one row per risky or host-sync site, in order of first call; ``masked_nonfinite``: sites whose
    outputs held NaN/Inf in loss calls that returned a finite value; ``histograms``: (site, op, kind) -> row of
    ``LogHistogram.summarize`` (kind: input, output, grad arriving at the output, local_derivative);
    ``misread_input``: sites that read the loss's input as the other kind (a softmax over the channels of the
    probabilities it was given, the log of the logits it was given; ``given_input``)."""

    sites: list
    masked_nonfinite: list
    histograms: dict
    misread_input: list = field(default_factory=list)

    def site(self, name: str, op: str) -> dict:
        for row in self.sites:
            if row["site"] == name and row["op"] == op:
                return row
        raise KeyError(f"{name} {op}")

    def by_risk(self) -> list:
        """The rows most likely behind a NaN first: non-finite gradients sent back, non-finite outputs, masked
        non-finite outputs, then the largest share of elements held at a clamp bound (zero gradient), then the
        largest local derivative, then host syncs."""
        def risk(row: dict) -> tuple:
            return (row["nonfinite_backward"] > 0, row["nonfinite_forward"] > 0, row["masked_calls"] > 0,
                    row["at_bound_fraction"] or 0.0, row["max_local_derivative"] or 0.0, row["host_syncs"])
        return sorted(self.sites, key=risk, reverse=True)


def assemble(order: list, histograms: dict, counters: dict, masked, misread_input: list = ()) -> AutoTapResult:
    """The result of one read-back: per site (in order of first call), its row from the site's calls, clamp bounds
    and device counters (at_min, at_max, elements, nonfinite_backward) and its histograms' summaries; the rows of
    ``misread_input`` as they are."""
    rows, masked_rows = [], []
    for site in order:
        if masked[site.index] > 0:
            masked_rows.append({"site": site.name, "op": site.op, "calls": int(masked[site.index])})
        if site.kind == "other":
            continue
        row = {"site": site.name, "op": site.op, "calls": site.calls, "nonfinite_forward": 0,
               "nonfinite_backward": 0, "at_bound_fraction": None, "at_min_fraction": None,
               "at_max_fraction": None, "max_abs_grad": None, "max_local_derivative": None,
               "host_syncs": site.calls if site.kind == "host_sync" else 0, "masked_calls": int(masked[site.index])}
        output = histograms.get((site.name, site.op, "output"))
        if output is not None:
            row["nonfinite_forward"] = output["nan"] + output["posinf"] + output["neginf"]
        grad = histograms.get((site.name, site.op, "grad"))
        if grad is not None and grad["finite"]:
            row["max_abs_grad"] = max(abs(grad["min"]), abs(grad["max"]))
        derivative = histograms.get((site.name, site.op, "local_derivative"))
        if derivative is not None and derivative["finite"]:
            row["max_local_derivative"] = max(abs(derivative["min"]), abs(derivative["max"]))
        at_min, at_max, elements, nonfinite_backward = counters.get(site.index, (0, 0, 0, 0))
        row["nonfinite_backward"] = nonfinite_backward
        if site.op == "clamp" and elements:
            lows = {b[0] for b in site.bounds}
            highs = {b[1] for b in site.bounds}
            row["at_min_fraction"] = at_min / elements if lows != {None} else None
            row["at_max_fraction"] = at_max / elements if highs != {None} else None
            row["at_bound_fraction"] = (at_min + at_max) / elements
            row["bounds"] = sorted(site.bounds, key=str)
        rows.append(row)
    return AutoTapResult(rows, masked_rows, histograms, list(misread_input))
