"""`analyze-checkpoint`: why (or whether) a geometric loss goes non-finite, measured on one nnU-Net checkpoint.

For each precision and each real case, two inputs. Training patches drawn by nnU-Net's own data loader go through
the network with autograd on, as in a training step: Dice+CE and the geometric loss are back-propagated into the
network, and a Recorder histograms every tap of the loss, the logits and the parameter gradients. The whole case,
predicted as nnU-Net predicts it (no gradient into the network, which a sliding window over a case larger than
the patch cannot give), yields the per-image loss terms. On both, the loss and its terms' share of the step's
gradient against Dice+CE's (``loss_share``: each training patch alone, at the logits and the parameters; the whole
image at its logits) says whether the loss is inert, contributes or dominates. A pass that went non-finite is replayed (``nonfinite.replay``:
in its precision, then at fp32 and fp64) to name the first op that produced NaN/Inf and to classify it (maths,
precision...). The checkpoint's own state (weights, momentum, GradScaler scale) is
checked too. The loss is the user's ``--loss`` or the one the run folder records (``own_loss.choose_loss``); on
both inputs it runs under automatic taps, whose sites (risky ops by source line) each case stores. Each case's
results are written as soon as they are measured (DIR/cases/<precision>/<case>.npz + .json, atomically), so
``resume`` continues an interrupted run and the merged tables are the same as an uninterrupted run's;
DIR/settings.json keeps ``resume`` from merging cases computed with other settings. A loss that raises on a case
in a precision (a clamp bound that does not fit fp16, say) is that case's result: the exception on one line and
the user's line that raised it, stored like any other result; the other cases and precisions still run.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from geodiag.reports import loss_findings, schema, tables

from ..instruments.devices import PRECISIONS, parse_precisions
from ..instruments.errors import ArgumentError, GeodiagError
from ..instruments.histogram_bins import BinLayout
from ..instruments.histograms import LogHistogram, decade_grid
from ..instruments.recorder import THRESHOLDED, Recorder
from ..nnunet.cases import CaseFiles, find_cases, predict_logits, preprocess
from ..nnunet.checkpoint import Checkpoint, find_checkpoints, load_checkpoint
from ..nnunet.patches import training_patches
from ..nonfinite.replay import replay
from ..progress import Progress, progress_over
from . import run_record
from ..nonfinite.autotaps import AutoTaps
from ..nonfinite.loss_spec import UserLoss
from . import loss_share, own_loss
from .verdict import PASSES, checkpoint_state, failed, summarize

DEFAULT_PATCHES = 2


def dice_ce_for(checkpoint: Checkpoint):
    """nnU-Net's own Dice+CE as its trainer builds it (without deep supervision)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    config = checkpoint.configuration_manager
    labels = checkpoint.label_manager
    return DC_and_CE_loss({"batch_dice": config.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=labels.ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def _case_paths(out: Path, precision: str, case: str) -> tuple[Path, Path]:
    folder = out / "cases" / precision
    return folder / f"{case}.npz", folder / f"{case}.json"


def _loss_backward(logits: torch.Tensor, label: torch.Tensor, loss, dice_ce, taps: Optional[AutoTaps] = None):
    """Dice+CE + geometric loss on ``logits`` and its backward (the loss under ``taps`` when given);
    returns (geometric, total)."""
    geometric = taps.run(loss, logits, label) if taps is not None else loss(logits, label)
    total = dice_ce(logits.float(), label) + geometric
    with own_loss.raising_as_finding("the backward pass (autograd)"):
        total.backward()
    return geometric, total


def _patch_pass(network, image: torch.Tensor, label: torch.Tensor, loss, dice_ce, dtype: Optional[torch.dtype],
                device: torch.device, recorder: Optional[Recorder], taps: Optional[AutoTaps] = None):
    """Training's step on the patches (a PatchBatch's image and label) without the optimizer: forward (autocast in
    ``dtype``), loss, backward through the network; returns (logits, geometric, total)."""
    network.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = network(image.to(device))
    logits.retain_grad()
    if recorder is not None:
        recorder.attach_tensor("logits", logits)
    geometric, total = _loss_backward(logits, label.to(device), loss, dice_ce, taps)
    return logits, geometric, total


def _image_pass(network, image: torch.Tensor, label: torch.Tensor, loss, dice_ce,
                dtype: Optional[torch.dtype], patch_size, device: torch.device, taps: Optional[AutoTaps] = None):
    """The whole image predicted without gradients into the network, the loss back-propagated to its logits;
    returns (logits leaf, geometric, total)."""
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = predict_logits(network, image, patch_size)
    leaf = logits.detach().to(image.dtype).requires_grad_(True)  # fp32 logits, fp64 in a replay's fp64 run
    geometric, total = _loss_backward(leaf, label, loss, dice_ce, taps)
    return leaf, geometric, total


def _pass_result(logits: torch.Tensor, geometric: torch.Tensor, total: torch.Tensor) -> dict:
    return {"loss": float(total.detach()), "geometric_loss": float(geometric.detach()),
            "nonfinite_loss": int(not math.isfinite(float(total.detach()))),
            "nonfinite_logit_grad": int((~torch.isfinite(logits.grad)).sum())}


def _network_gradients(network) -> dict:
    """How many parameter-gradient tensors and values the last backward left, and how many are non-finite."""
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    return {"tensors": len(grads), "values": int(sum(g.numel() for g in grads)),
            "nonfinite": int(sum(int((~torch.isfinite(g)).sum()) for g in grads))}


def analyze_case(checkpoint: Checkpoint, network, files: CaseFiles, loss: own_loss.AnalysedLoss, dice_ce, precision: str,
                 patch_size, device: torch.device, patches: int, augment: bool = False,
                 terms: Optional[Mapping[str, UserLoss]] = None) -> tuple[dict[str, np.ndarray], dict]:
    """One case in one precision: packed histograms by 'name|kind' (training patches), and the case's results.

    ``patches`` training patches go through the network with gradients as in a training step: they give the
    histograms and the network's gradients, and, each patch alone, the loss's share of the step's gradient. The
    whole image, predicted as nnU-Net predicts it, gives the per-image loss terms and shares at its logits. A pass
    whose loss or gradient is non-finite is replayed with a check after every op (fairseq's pattern: full checks
    only on the failing batch), which names the op and classifies it.
    """
    case = preprocess(checkpoint, files)
    if case.label is None:
        raise GeodiagError(f"case {files.name} has no label; the geometric loss compares against labels")
    batch = training_patches(checkpoint, case, patches, augment=augment)
    label = case.label[None].to(device)
    dtype = PRECISIONS[precision]
    recorder = Recorder(eps_grid=decade_grid())
    call = own_loss.trainer_call(loss, dtype, device)
    taps = {name: AutoTaps() for name in PASSES}
    with own_loss.attach_named(recorder, loss), recorder.attach_network(network):
        logits, geometric, total = _patch_pass(network, batch.image, batch.label, call, dice_ce, dtype, device,
                                               recorder, taps["patches"])
    packed = {f"{name}|{kind}": h.packed().cpu().numpy() for (name, kind), h in recorder.histograms().items()}
    patch_result = {"count": patches, "patch_size": [int(p) for p in patch_size], "bboxes": batch.bboxes,
                    "forced_foreground": batch.forced_foreground,
                    "foreground_oversampling": batch.foreground_oversampling, "augmented": batch.augmented,
                    **_pass_result(logits, geometric, total), "network_gradients": _network_gradients(network)}
    network.zero_grad(set_to_none=True)
    image_logits, image_geometric, image_total = _image_pass(network, case.image, label, call, dice_ce, dtype,
                                                             patch_size, device, taps["whole_image"])
    image_result = {"shape": list(case.image.shape[1:]),
                    **_pass_result(image_logits, image_geometric, image_total)}
    shares = {"patches": loss_share.patch_shares(network, batch.image, batch.label, loss, dice_ce, terms or {},
                                                 dtype, device),
              "whole_image": loss_share.image_shares(image_logits, label, loss, dice_ce, terms or {}, dtype)}
    result = {"case": files.name, "precision": precision, "patches": patch_result, "whole_image": image_result,
              "terms": loss_share.term_rows(shares["whole_image"]), "loss_share": shares, "provenance": None,
              "sites": {name: own_loss.case_sites(t.result()) for name, t in taps.items()}}
    if failed(patch_result) or failed(image_result):
        inputs = (batch.image, batch.label) if failed(patch_result) else (case.image, label)
        result["provenance"] = _replayed(network, inputs, failed(patch_result), loss, call, dice_ce, dtype,
                                         patch_size, device)
    network.zero_grad(set_to_none=True)
    return packed, result


def _replayed(network, inputs: tuple[torch.Tensor, torch.Tensor], on_patches: bool, loss: own_loss.AnalysedLoss,
              call, dice_ce, dtype: Optional[torch.dtype], patch_size, device: torch.device) -> dict:
    """The failing pass (the patches' or the whole image's) replayed: the op that produced its first non-finite
    value (as the pass ran) and the replay's classification."""
    def step(replica, batch: dict, setting):
        if on_patches:
            return _patch_pass(replica, batch["image"], batch["label"], call, dice_ce, dtype, device, None)[2]
        return _image_pass(replica, batch["image"], batch["label"], call, dice_ce, dtype, patch_size, device)[2]

    replayed = replay(step, network, {"image": inputs[0], "label": inputs[1]}, autocast=dtype is not None,
                      loss_module=own_loss.loss_module(loss))
    report = replayed.runs[0].report if replayed.runs else None
    found = ({"phase": report.phase, "op": report.op, "node": report.node, "module": report.module,
              "tap": report.tap, "message": report.message} if report is not None else
             dict.fromkeys(("phase", "op", "node", "module", "tap", "message")))
    return {"pass": "patches" if on_patches else "whole_image", **found,
            "classification": replayed.classification, "explanation": replayed.explanation}


def _summaries(packed_by_precision: dict[str, dict[str, np.ndarray]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """tensors.csv, histograms.csv and eps_fractions.csv from merged packed histograms."""
    layout, grid = BinLayout(), decade_grid()
    edges = layout.edges()
    tensor_rows, hist_rows, eps_rows = [], [], []
    for precision, packed in packed_by_precision.items():
        summaries = {}
        for key, state in packed.items():
            name, kind = key.split("|")
            thresholds = grid if (kind == "value" and name in THRESHOLDED) else ()
            row = LogHistogram(layout, thresholds).summarize(state)
            summaries[(name, kind)] = row
            tensor_rows.append({
                "precision": precision, "tensor": name, "kind": kind, "count": row["count"], "nan": row["nan"],
                "posinf": row["posinf"], "neginf": row["neginf"], "zero": row["zero"],
                "subnormal": row["fp32_subnormal"], "negative": row["negative"],
                "fp16_overflow": row["fp16_overflow"], "fp16_underflow": row["fp16_underflow"],
                "bf16_overflow": row["bf16_overflow"], "bf16_underflow": row["bf16_underflow"],
                "min": row["min"], "max": row["max"], "mean": row["mean"], "abs_min": row["abs_min"],
                "abs_p50": row["abs_p50"], "abs_p90": row["abs_p90"], "abs_p99": row["abs_p99"],
                "abs_p999": row["abs_p99.9"], "abs_max": row["abs_max"]})
            hist_rows += [{"precision": precision, "tensor": name, "kind": kind, "bin_low": edges[i],
                           "bin_high": edges[i + 1], "count": int(c)} for i, c in enumerate(row["bin_counts"]) if c]
        for name in THRESHOLDED:
            value, grad = summaries.get((name, "value")), summaries.get((name, "grad"))
            if value is None:
                continue
            zero_grad = grad["zero"] / grad["count"] if grad and grad["count"] else math.nan
            eps_rows += [{"precision": precision, "tensor": name, "eps": t, "fraction_below": value[f"below_{t:g}"],
                          "zero_grad_fraction": zero_grad} for t in grid]
    return (pd.DataFrame(tensor_rows, columns=schema.TENSORS_COLUMNS),
            pd.DataFrame(hist_rows, columns=schema.HISTOGRAM_COLUMNS),
            pd.DataFrame(eps_rows, columns=schema.EPS_FRACTION_COLUMNS))


def _run_cases(checkpoint: Checkpoint, case_files: list[CaseFiles], loss: own_loss.AnalysedLoss, precisions: Sequence[str],
               out: Path, dev: torch.device, trust: bool, resume: bool, patches: int, augment: bool,
               progress: Optional[Progress],
               terms: Mapping[str, UserLoss]) -> tuple[dict[str, dict[str, np.ndarray]], list[dict]]:
    """Each case under each precision, written to OUT/cases/ as it finishes (a resumed run reads finished ones
    back); returns the merged packed statistics per precision and every case's result. A case whose loss raised
    is stored as ``{case, precision, raised: {message, site}}`` with no statistics."""
    network = None
    packed_by_precision: dict[str, dict[str, np.ndarray]] = {}
    results = []
    for precision in precisions:
        merged: dict[str, np.ndarray] = {}
        for files in progress_over(case_files, f"{precision} cases", progress):
            npz_path, json_path = _case_paths(out, precision, files.name)
            if not (resume and npz_path.exists() and json_path.exists()):
                if network is None:
                    network = checkpoint.network(trust=trust).to(dev)
                    dice_ce = dice_ce_for(checkpoint)
                try:
                    packed, result = analyze_case(checkpoint, network, files, loss, dice_ce, precision,
                                                  checkpoint.patch_size, dev, patches, augment, terms)
                except own_loss.LossRaised as exc:
                    network.zero_grad(set_to_none=True)
                    packed, result = {}, {"case": files.name, "precision": precision, "raised": exc.record()}
                buffer = io.BytesIO()
                np.savez(buffer, **packed)
                schema.write_bytes(npz_path, buffer.getvalue())
                schema.write_json(json_path, result)
            with np.load(npz_path) as saved:
                for key in saved.files:
                    merged[key] = LogHistogram.merge_packed(merged[key], saved[key]) if key in merged else saved[key]
            results.append(json.loads(json_path.read_text()))
        packed_by_precision[precision] = merged
    return packed_by_precision, results


def _constant_loss(results: list[dict]) -> list[dict]:
    """Per precision and pass, the loss's value when it is the same on every case (``loss_findings``): a loss that
    is a constant there sends no gradient, whatever its finiteness."""
    values = [{"precision": r["precision"], "pass": name, "case": r["case"], "loss": r[name]["geometric_loss"]}
              for r in results if "raised" not in r for name in PASSES]
    return loss_findings.constant_groups(values, ("precision", "pass"))


def analyze_checkpoint(path: str, out: str | Path, fold: Optional[str] = None, cases: Optional[str] = None,
                       device: str = "cpu", stabilizer: Optional[str] = None, eps: Optional[float] = None,
                       precisions: Sequence[str] = ("fp32",), max_cases: Optional[int] = None, trust: bool = False,
                       resume: bool = False, patches: int = DEFAULT_PATCHES, augment: bool = False,
                       progress: Optional[Progress] = None, loss_spec: Optional[str] = None,
                       loss_input: str = "probabilities", term: Sequence[str] = ()) -> dict:
    """Analyse one checkpoint; write DIR/summary.json and the tables; return the summary. ``term`` names the terms
    of a user's loss (``NAME=SPEC`` items, see ``loss_share.parse_terms``)."""
    out = run_record.check_out(out)
    if patches < 1:
        raise ArgumentError(f"{{patches}} must be at least 1, got {patches}", "patches")
    precisions = parse_precisions(precisions)
    found = find_checkpoints(path, fold)
    if len(found) > 1:
        raise ArgumentError(f"{path} holds {len(found)} folds; choose one with {{fold}}", "fold")
    checkpoint = load_checkpoint(found[0], trust=trust)
    _, has_results = run_record.open_cases(out, "*/*.json", "an analysis", resume)
    state = checkpoint_state(checkpoint)
    case_files = find_cases(checkpoint, cases)[: max_cases or None]
    loss, loss_info = own_loss.choose_loss(checkpoint, checkpoint.foreground_classes, loss_spec, loss_input,
                                           stabilizer, eps)
    terms = loss_share.parse_terms(loss, term)
    recorded = {"checkpoint": str(checkpoint.path.resolve()), **own_loss.run_settings(loss), "patches": patches,
                "augment": augment, **({"terms": list(term)} if term else {})}
    run_record.check_and_record(out, recorded, resume, has_results)
    dev = torch.device(device)
    packed_by_precision, results = _run_cases(checkpoint, case_files, loss, precisions, out, dev, trust, resume,
                                               patches, augment, progress, terms)
    tensors, histograms, eps_fractions = _summaries(packed_by_precision)
    sites, masked, misread, site_histograms = own_loss.merge_sites([(r["precision"], name, r["sites"][name])
                                                                     for r in results for name in PASSES
                                                                     if "sites" in r])
    from geodiag.reports import sites_report

    tables.write_table(own_loss.histogram_frame(site_histograms), out / sites_report.HISTOGRAMS_FILE)
    terms = pd.DataFrame([{"case": r["case"], "precision": r["precision"], **t}
                          for r in results for t in r.get("terms", ())], columns=[*schema.TERM_COLUMNS, "grad_norm"])
    shares = pd.DataFrame([{"case": r["case"], "precision": r["precision"], "pass": name, **row}
                           for r in results for name, rows in r.get("loss_share", {}).items() for row in rows],
                          columns=schema.LOSS_SHARE_COLUMNS)
    for frame, name in ((tensors, "tensors"), (histograms, "histograms"), (eps_fractions, "eps_fractions"),
                        (terms[list(schema.TERM_COLUMNS)], "terms"), (shares, "loss_share")):
        tables.write_table(frame, out / f"{name}.csv")
    summary = summarize(checkpoint, own_loss.run_settings(loss), state, results, tensors, terms, list(precisions),
                        dev, patches, augment, len(case_files))
    share_summary = loss_share.summarize(shares)
    summary.update(loss=loss_info, sites=sites, masked_nonfinite=masked, misread_input=misread,
                   constant_loss=_constant_loss(results), loss_share=share_summary,
                   loss_role=loss_share.headline(share_summary, sites, loss_info["spec"],
                                                 math.prod(checkpoint.patch_size)))
    summary["statistics_from"].update({"sites": "each row's pass", "misread_input": "each row's pass",
                                       "constant_loss": "each entry's pass", "loss_share.csv": "each row's pass",
                                       "loss_share": "each entry's pass", "loss_role": "patches"})
    schema.write_json(out / "summary.json", summary)
    return summary
