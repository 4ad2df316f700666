"""Which loss analyze-checkpoint evaluates, how it is called, and its automatic-tap sites merged over cases.

Which loss: the SPEC the user typed (``--loss``); else the geometric settings geodiag's trainer recorded in the
run folder (``geometric_settings.json``, read as data: a name found there is never imported); else the preset
of geodiag's trainer class named by the checkpoint; else the production preset. The summary says which and why.
How it is called: a user's loss as nnU-Net's ``train_step`` calls its loss, inside the autocast of the network
forward; a loss that raises (e.g. a clamp bound that does not fit fp16) raises ``LossRaised``, naming the user's
line, so that one case in one precision becomes a finding and the others still run. Sites: every pass of every
case runs the loss under ``AutoTaps``; a case stores its rows with the element counts behind each fraction and
the input histograms of its sqrt and clamp sites, so rows merge over cases (and over a resumed run) by adding
counts.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Optional, Union

import pandas as pd
import torch
from torch import nn

from geodiag.losses import GEOMETRIC_TERMS, GeometricLoss
from geodiag.reports.sites_report import SITE_HISTOGRAM_COLUMNS

from ..instruments.errors import ArgumentError, GeodiagError
from ..instruments.histogram_bins import BinLayout
from ..nnunet.checkpoint import Checkpoint
from ..nonfinite.autotap_result import AutoTapResult
from ..nonfinite.given_input import given
from ..nonfinite.loss_spec import UserLoss, load_loss, one_line
from ..nonfinite.sites import exception_site

AnalysedLoss = Union[GeometricLoss, UserLoss]
SETTINGS_FILE = "geometric_settings.json"
# Ops whose input histogram is drawn in the report with the op's bound.
BOUNDED_OPS = ("sqrt", "clamp")
_ADDED = ("calls", "nonfinite_forward", "nonfinite_backward", "host_syncs", "masked_calls", "elements", "at_min",
          "at_max")
_LARGEST = ("max_abs_grad", "max_local_derivative")


def choose_loss(checkpoint: Checkpoint, classes: tuple[int, ...], spec: Optional[str] = None,
                input_kind: str = "probabilities", stabilizer: Optional[str] = None,
                eps: Optional[float] = None) -> tuple[AnalysedLoss, dict]:
    """(loss, ``{spec, input, why}``) for the summary; ``stabilizer``/``eps`` override a GeometricLoss."""
    if spec is not None:
        if stabilizer is not None or eps is not None:
            raise ArgumentError("{stabilizer} and {eps} set GeometricLoss's settings; a {loss_spec} is analysed as "
                                "it is", "stabilizer", "eps", "loss_spec")
        return load_loss(spec, input_kind), {"spec": spec, "input": input_kind, "why": "--loss"}
    kwargs = dict(classes=classes, softmax=True)
    recorded = checkpoint.path.parent / SETTINGS_FILE
    preset, why = "production", "production preset (no loss recorded)"
    if recorded.is_file():
        settings = _read_settings(recorded)
        preset, why = settings.pop("geometric_preset"), f"recorded by the run folder's {SETTINGS_FILE}"
        kwargs.update(settings)
    else:
        from geodiag.losses.nnunet import trainer as nnunet_trainer

        trainer = getattr(nnunet_trainer, checkpoint.trainer_name, None)
        if trainer is not None and hasattr(trainer, "geometric_preset"):
            preset = trainer.geometric_preset
            why = f"preset of geodiag's trainer {checkpoint.trainer_name} (no {SETTINGS_FILE} beside the checkpoint)"
            kwargs.update({f"{term}_weight": getattr(trainer, f"{term}_weight") for term in GEOMETRIC_TERMS},
                          reference=trainer.geometric_reference)
    if stabilizer is not None:
        kwargs["stabilizer"] = stabilizer
    if eps is not None:
        kwargs["eps"] = eps
    try:
        loss = GeometricLoss.from_preset(preset, **kwargs)
    except (ValueError, TypeError) as exc:
        raise GeodiagError(f"{recorded if recorded.is_file() else 'loss'}: {exc}") from None
    described = (f"GeometricLoss(preset={preset!r}, stabilizer={loss.stabilizer.name!r}, eps={loss.stabilizer.eps:g}, "
                 f"aspect_formula={loss.aspect_formula!r}, sobel={loss.sobel!r})")
    if stabilizer is not None or eps is not None:
        why += "; --stabilizer/--eps override"
    return loss, {"spec": described, "input": "logits", "why": why}


def _read_settings(path: Path) -> dict:
    """The GeometricLoss keywords geodiag's trainer recorded (class names and the like are ignored)."""
    try:
        data = json.loads(path.read_text())
        weights = data.get("weights", {})
        return {"geometric_preset": str(data["geometric_preset"]), "stabilizer": str(data["stabilizer"]),
                "eps": float(data["eps"]), "aspect_formula": str(data["aspect_formula"]),
                "sobel": str(data.get("sobel", "normalised")), "reference": str(data.get("reference", "target")),
                **{f"{term}_weight": float(weights.get(term, 0.0)) for term in GEOMETRIC_TERMS}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GeodiagError(f"{path} is not a geodiag geometric_settings.json: {type(exc).__name__}: {exc}") from None


def run_settings(loss: AnalysedLoss) -> dict:
    """What a resumed run must share with the cases already computed."""
    if isinstance(loss, UserLoss):
        return {"loss": loss.spec, "loss_input": loss.input_kind}
    return {"stabilizer": loss.stabilizer.name, "eps": loss.stabilizer.eps, "aspect_formula": loss.aspect_formula,
            "sobel": loss.sobel}


class LossRaised(Exception):
    """The loss raised on one evaluation: ``message`` is the exception on one line, ``site`` the user's
    ``file:line`` that made the failing call."""

    def __init__(self, message: str, site: str):
        super().__init__(f"{message} (at {site})")
        self.message, self.site = message, site

    def record(self) -> dict:
        return {"message": self.message, "site": self.site}


@contextlib.contextmanager
def raising_as_finding(unknown_site: str = "<unknown>"):
    """Turns an exception of the loss into ``LossRaised``; geodiag's own errors (GeodiagError) pass through.
    ``unknown_site`` names where it happened when no frame of the traceback is the user's (an autograd error in
    backward, e.g. a saved tensor modified in place, is raised from the engine)."""
    try:
        yield
    except (GeodiagError, LossRaised):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's loss failing on an input is that input's finding
        site = exception_site(exc)
        raise LossRaised(one_line(exc), unknown_site if site == "<unknown>" else site) from exc


def trainer_call(loss: AnalysedLoss, dtype: Optional[torch.dtype], device: torch.device) -> Callable:
    """``loss(logits, label)`` as nnU-Net's train_step makes it: a user's loss inside the forward's autocast
    (its softmax is then what torch.softmax returns there); GeometricLoss as analyze has always called it. An
    exception of the loss comes out as ``LossRaised``. Automatic taps attached around the call follow the input a
    user's loss receives (``given_input``)."""
    autocast = isinstance(loss, UserLoss) and dtype is not None

    def call(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with raising_as_finding(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=autocast):
            if not isinstance(loss, UserLoss):
                return loss(logits, label)
            prediction = loss.prepare(logits)
            with given(prediction, loss.input_kind):
                return loss.call(prediction, label)
    return call


def loss_module(loss: AnalysedLoss) -> Optional[nn.Module]:
    """The nn.Module behind the loss, for module context in provenance; None for a plain function."""
    fn = loss.fn if isinstance(loss, UserLoss) else loss
    return fn if isinstance(fn, nn.Module) else None


def tappable(loss: AnalysedLoss) -> bool:
    """Whether the loss has geodiag's named taps (GeometricLoss); a user's loss has automatic taps only."""
    return hasattr(loss, "register_tap")


def attach_named(recorder, loss: AnalysedLoss):
    return recorder.attach_loss(loss) if tappable(loss) else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- sites per case
def case_sites(result: AutoTapResult) -> dict:
    """One pass's sites as JSON: rows with the counts behind their fractions, and the |input| histograms of the
    sqrt and clamp sites."""
    rows, histograms = [], {}
    for row in result.sites:
        output = result.histograms.get((row["site"], row["op"], "output"))
        elements = output["count"] if output is not None and row["op"] == "clamp" else 0
        stored = {**row, "elements": elements,
                  "at_min": round((row["at_min_fraction"] or 0.0) * elements),
                  "at_max": round((row["at_max_fraction"] or 0.0) * elements),
                  "has_min": row["at_min_fraction"] is not None, "has_max": row["at_max_fraction"] is not None,
                  "bounds": [list(b) for b in row.get("bounds", [])]}
        rows.append(stored)
        source = result.histograms.get((row["site"], row["op"], "input"))
        if row["op"] in BOUNDED_OPS and source is not None:
            histograms[f"{row['site']}|{row['op']}"] = {k: source[k] for k in ("bin_counts", "zero", "nan",
                                                                                 "posinf", "neginf", "count")}
    return {"rows": rows, "masked_nonfinite": result.masked_nonfinite, "misread_input": result.misread_input,
            "histograms": histograms}


def merge_sites(cases: list[tuple[str, str, dict]]) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(sites, masked_nonfinite, misread_input, histograms) over ``(precision, pass, case_sites)``: counts added,
    maxima taken, fractions recomputed from the added counts; rows keyed by precision, pass, site and op."""
    merged: dict = {}
    calls: dict = {"masked_nonfinite": {}, "misread_input": {}}
    histograms: dict = {}
    for precision, pass_name, sites in cases:
        for row in sites["rows"]:
            key = (precision, pass_name, row["site"], row["op"])
            into = merged.get(key)
            if into is None:
                merged[key] = {"precision": precision, "pass": pass_name, **row,
                               "bounds": [list(b) for b in row["bounds"]]}
                continue
            for name in _ADDED:
                into[name] += row[name]
            for name in _LARGEST:
                values = [v for v in (into[name], row[name]) if v is not None]
                into[name] = max(values) if values else None
            into["has_min"] |= row["has_min"]
            into["has_max"] |= row["has_max"]
            into["bounds"] += [b for b in row["bounds"] if b not in into["bounds"]]
        for field, added in calls.items():
            for row in sites.get(field, ()):  # a case written before misread_input was recorded has none
                key = (precision, pass_name, row["site"], row["op"])
                added.setdefault(key, {"precision": precision, "pass": pass_name, **row, "calls": 0})
                added[key]["calls"] += row["calls"]
        for name, hist in sites["histograms"].items():
            key = (precision, pass_name, *name.rsplit("|", 1))
            if key in histograms:
                histograms[key] = {k: ([a + b for a, b in zip(histograms[key][k], v)] if k == "bin_counts"
                                       else histograms[key][k] + v) for k, v in hist.items()}
            else:
                histograms[key] = dict(hist)
    rows = []
    for row in merged.values():
        elements = row.pop("elements")
        at_min, at_max = row.pop("at_min"), row.pop("at_max")
        has_min, has_max = row.pop("has_min"), row.pop("has_max")
        if row["op"] == "clamp" and elements:
            row["at_min_fraction"] = at_min / elements if has_min else None
            row["at_max_fraction"] = at_max / elements if has_max else None
            row["at_bound_fraction"] = (at_min + at_max) / elements
            row["elements"] = elements
        rows.append(row)
    groups = list(dict.fromkeys((r["precision"], r["pass"]) for r in rows))
    ranked = [r for g in groups for r in AutoTapResult([r for r in rows if (r["precision"], r["pass"]) == g],
                                                       [], {}).by_risk()]
    return ranked, list(calls["masked_nonfinite"].values()), list(calls["misread_input"].values()), histograms


def histogram_frame(histograms: dict) -> pd.DataFrame:
    """The merged site histograms as rows of SITE_HISTOGRAM_COLUMNS (raw |x| bin edges, non-empty bins only)."""
    edges = BinLayout().edges()
    rows = [{"precision": precision, "pass": pass_name, "site": site, "op": op, "bin_low": edges[i],
             "bin_high": edges[i + 1], "count": int(c)}
            for (precision, pass_name, site, op), hist in histograms.items()
            for i, c in enumerate(hist["bin_counts"]) if c]
    return pd.DataFrame(rows, columns=list(SITE_HISTOGRAM_COLUMNS))
