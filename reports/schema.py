"""The contract between the producer (geodiag.diagnostics) and the renderers (geodiag.reports): the column names of
every table diagnostics write, the analysis verdicts, the replay classifications, and the atomic writers both sides
write files with.

Standard library only (no pandas, no numpy, no torch), so the producer can depend on it without depending on the
renderers, and the CLI can catch ``ReportInputError`` without loading pandas.

Why atomic: a report directory is read while sweeps still run; a half-written file must never be what a reader
sees, so every file goes to a temporary sibling first and replaces the target with ``os.replace``. The sibling is
created with mode 0666 less the user's umask, like any other file (``tempfile.mkstemp`` would make every report
0600, unreadable to the group a results folder is shared with on a cluster).
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

# Column schemas of what diagnostics write; producers and reports share these names exactly.
TENSORS_COLUMNS = (
    "precision", "tensor", "kind", "count", "nan", "posinf", "neginf", "zero", "subnormal", "negative",
    "fp16_overflow", "fp16_underflow", "bf16_overflow", "bf16_underflow",
    "min", "max", "mean", "abs_min", "abs_p50", "abs_p90", "abs_p99", "abs_p999", "abs_max",
)
HISTOGRAM_COLUMNS = ("precision", "tensor", "kind", "bin_low", "bin_high", "count")
EPS_FRACTION_COLUMNS = ("precision", "tensor", "eps", "fraction_below", "zero_grad_fraction")
TERM_COLUMNS = ("case", "precision", "term", "value", "grad_share")
SWEEP_COLUMNS = (
    "checkpoint", "dataset", "epoch", "geometric_active", "case", "stabilizer", "eps", "precision",
    "loss", "perimeter", "compactness", "aspect", "ref_perimeter", "ref_compactness", "ref_aspect",
    "bias_perimeter", "bias_compactness", "bias_aspect", "grad_max", "grad_l2", "grad_p999",
    "sqrt_deriv_max", "sqrt_deriv_p99", "frac_below_eps", "frac_zero_grad", "nonfinite_loss", "nonfinite_grad",
)
SWEEP_HIST_COLUMNS = ("checkpoint", "dataset", "epoch", "bin_low", "bin_high", "count")
# The study (geodiag.diagnostics.study, rendered by study_report):
# DIR/runs.csv: per run and epoch, nnU-Net's log and what geodiag watch recorded per step (term values are the
# unweighted values the trainer's train_step returned, epoch means; grad_norm_max is clip_grad_norm_'s return).
RUN_COLUMNS = ("run", "dataset", "trainer", "code", "warmup", "epoch", "geometric_active", "train_loss", "val_loss",
               "pseudo_dice", "watched_steps", "grad_norm_max", "nonfinite_steps", "skipped_steps", "train_dc_ce",
               "train_geometric", "train_compactness", "train_aspect", "train_boundary")
# DIR/study.json: the study's settings and one record per run with these fields (and, for a run watch stopped, its
# first_nonfinite.json). Run kinds are fields, never parsed from the run's name: ``code`` is "user" for a user's
# trainer and loss (the seed replica) or "geodiag"; ``seed_version`` names the version of the seed the run replays
# (``seed.VERSIONS``), null for geodiag's runs.
STUDY_RUN_FIELDS = ("run", "dataset", "trainer", "epochs", "iterations", "warmup", "patch_size", "batch_size",
                    "watched", "code", "loss", "seed_version", "first_nonfinite")
# DIR/switch_on_s.csv: per run, checkpoint, case, units ("seed" or "normalised") and threshold, the share below it.
SWITCH_ON_S_COLUMNS = ("run", "dataset", "checkpoint", "case", "units", "eps", "fraction_below", "pixels")
# DIR/s_distribution.csv: per run, checkpoint (``UNTRAINED``: nnU-Net's initialisation under the run's seed) and
# units, the distribution of s over the measured cases' pixels: [lower, upper) bins, the exact zeros as lower = upper
# = 0, the last bin's upper inf.
S_DISTRIBUTION_COLUMNS = ("run", "dataset", "checkpoint", "units", "lower", "upper", "pixels")
UNTRAINED = "untrained"  # the checkpoint column of both files for a run's architecture as nnU-Net initialises it
# DIR/term_gradients.csv: per run's switch-on checkpoint, training batch and term (dice_ce or a geometric term,
# weighted as trained): its value, max |d/dlogit| at full resolution, its network gradient norm, its share of the
# step's gradient g (<g_term, g> / |g|^2, summing to 1 over terms) and |g_term| / |g|, |g| itself (what
# clip_grad_norm_ would see before clipping), and non-finite gradient counts.
TERM_GRADIENT_COLUMNS = ("run", "dataset", "checkpoint", "batch", "term", "value", "max_abs_grad_logits",
                         "grad_norm_network", "share_of_step", "norm_ratio", "step_grad_norm",
                         "nonfinite_grad_logits", "nonfinite_grad_network")
# DIR/loss_precisions.csv: per user run and precision, whether its loss ran forward and backward under nnU-Net's
# autocast on the switch-on checkpoint's first case, else the exception and the user's line that raised it.
LOSS_PRECISION_COLUMNS = ("run", "precision", "runs", "error", "site")
# DIR/replica_sweep/site_sweep.csv as the study report reads it (clamp-sweep --loss --site at the replica's sqrt
# clamps): per checkpoint, case, precision and eps, the loss, its bias against fp64 at the smallest eps,
# max |dL/dlogit|, the clamps' mean at-bound share and non-finite counts.
REPLICA_SWEEP_COLUMNS = ("checkpoint", "dataset", "case", "precision", "eps", "loss", "bias_loss", "grad_max",
                         "frac_below_eps", "nonfinite_loss", "nonfinite_grad", "masked_nonfinite")
# DIR/loss_share.csv of analyze-checkpoint: per case, precision, pass (patches: each training patch alone as a step
# of one, at the logits and at the parameters; whole_image: at the logits only), sample (the patch) and piece
# (dice_ce, loss, or a term of the loss): its value, max |g| at the logits, and at each side |g_piece|, its share of
# the step's gradient g = g_dice_ce + g_loss (<g_piece, g>/|g|^2) and |g_piece|/|g|, and non-finite counts.
LOSS_SHARE_COLUMNS = ("case", "precision", "pass", "sample", "piece", "value", "max_abs_grad_logits",
                      "grad_norm_logits", "share_logits", "norm_ratio_logits", "grad_norm_params", "share_params",
                      "norm_ratio_params", "nonfinite_grad_logits", "nonfinite_grad_params")
# DIR/bench.csv of ``geodiag bench``: one measured ratio, count or size per row, with its target and method.
BENCH_COLUMNS = ("benchmark", "subject", "baseline", "value", "unit", "target", "met", "method")

# fp16's largest finite value and smallest subnormal, and GradScaler's initial scale: the headroom of the first
# scaled backward pass of nnU-Net's CUDA training. Quoted by the producer's checks and by the reports' figures and
# rule; tests check them against torch.finfo and torch.amp.GradScaler.
FP16_MAX = 65504.0
# fp32's largest finite value, (2 - 2^-23) * 2^127: the limit of every tensor of a run trained without autocast.
FP32_MAX = (2.0 - 2.0 ** -23) * 2.0 ** 127
FP16_SMALLEST_SUBNORMAL = 2.0 ** -24
GRAD_SCALER_INITIAL_SCALE = 65536.0

# An analysed checkpoint's verdict (summary.json's "verdict"): the first failure mechanism the evidence shows, in
# the order in which one causes the next; HEALTHY when none does.
HEALTHY = "healthy"
NON_FINITE_WEIGHTS = "non_finite_weights"
NON_FINITE_OPTIMIZER_STATE = "non_finite_optimizer_state"
GRAD_SCALER_COLLAPSED = "grad_scaler_collapsed"
LOSS_RAISED = "loss_raised"
NON_FINITE_LOSS = "non_finite_loss"
NON_FINITE_GRADIENT = "non_finite_gradient"
VERDICTS = (HEALTHY, NON_FINITE_WEIGHTS, NON_FINITE_OPTIMIZER_STATE, GRAD_SCALER_COLLAPSED, LOSS_RAISED,
            NON_FINITE_LOSS, NON_FINITE_GRADIENT)

# Why a replayed step went non-finite (the "classification" of first_nonfinite.json, of replay_<device>.json and of
# an analysis's provenance entries): each name with its meaning, which opens the replay's explanation.
REPLAY_MATHS = "maths"
REPLAY_PRECISION = "precision"
REPLAY_SCALER = "scaler"
REPLAY_NOT_REPRODUCED = "not-reproduced"
REPLAY_NON_FINITE_INPUT = "non-finite-input"
REPLAY_FAILED = "replay-failed"
REPLAY_CLASSIFICATIONS = {
    REPLAY_MATHS: "non-finite even in fp64 at loss scale 1: the formula itself fails; no change of precision fixes it",
    REPLAY_PRECISION: "finite in fp64 but non-finite in fp32, or under fp16/bf16 autocast, at loss scale 1: the dtype "
                      "lacks range or precision, the formula holds",
    REPLAY_SCALER: "finite at loss scale 1, non-finite with the GradScaler's scale: the scaled loss or gradients "
                   "overflow",
    REPLAY_NOT_REPRODUCED: "finite when replayed as run: the batch and weights alone do not fail; look at what the "
                           "replay does not restore (data pipeline, other side effects)",
    REPLAY_NON_FINITE_INPUT: "NaN/Inf in the batch or the weights before any op ran: fix the data or the checkpoint "
                             "(nothing was replayed)",
    REPLAY_FAILED: "the replayed step raised (the explanation is its exception): nothing is classified",
}

# A loss or term's part in a step's gradient, from its share <g_x, g>/|g|^2: "inert" below INERT_SHARE in
# magnitude, "dominant" above DOMINANT_SHARE, "contributes" between (analyze-checkpoint and the study alike).
INERT_SHARE = 0.01
DOMINANT_SHARE = 0.5


def share_role(share: float | None) -> str:
    """inert, contributes or dominant; "not measured" for a missing share."""
    if share is None or math.isnan(share):
        return "not measured"
    return "dominant" if share > DOMINANT_SHARE else "inert" if abs(share) < INERT_SHARE else "contributes"


class ReportInputError(ValueError):
    """A missing or malformed input table: the user's data, not a bug; the message is one line for the CLI."""


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, then ``os.replace``)."""
    return _atomic_write(Path(path), data)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return _atomic_write(Path(path), text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    """Plain JSON: NaN/Inf become null (JSON has no spelling for them), numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented, strict JSON atomically."""
    return write_text(path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON object; a missing or malformed file is a ReportInputError."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportInputError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ReportInputError(f"{path} must hold a JSON object, found {type(payload).__name__}")
    return payload
