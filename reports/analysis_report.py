"""The report of one analysed checkpoint: verdict in plain language first, then the numbers that led to it.

Reads DIR/summary.json and DIR/tensors.csv (required), DIR/histograms.csv, DIR/eps_fractions.csv and
DIR/terms.csv (optional); writes DIR/figures/*.png, DIR/report.md and DIR/report.html. What each verdict means
and what to do next is fixed text per verdict; every statement about this checkpoint is formatted from the tables.
The gradient shares (the loss's role on the first screen, the share table) come from summary.json's loss_share
and loss_role.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from . import analysis_screen, figures, loss_findings, schema, seed, sites_report
from .html import Figure, RenderedReport, Section, write_report
from .screens import Answer, first_screen, hidden_answers
from .schema import (EPS_FRACTION_COLUMNS, GRAD_SCALER_INITIAL_SCALE, HISTOGRAM_COLUMNS, TENSORS_COLUMNS, TERM_COLUMNS,
                     ReportInputError, read_json)
from .tables import format_eps, format_number, markdown_table, read_optional_table, read_table

TITLE = "geodiag checkpoint analysis"
# Below this many decades between a measured magnitude and its dtype's limit, the report flags the tensor.
HEADROOM_WARN_DECADES = 1.0
# eps values named in the eps-fraction sentences: the values of the seed's V2.3 and V2.4 clamps; its clamps
# themselves only when the loss analysed computes s as the seed does (sobel "seed"; see _eps_units).
SEED_EPS = tuple(version.eps for version in seed.VERSIONS)
# How the sentences name the seed's eps and versions.
_SEED_EPS_NAMED = "eps " + " and ".join(format_eps(eps) for eps in SEED_EPS)
_SEED_VERSIONS_NAMED = " and ".join(version.name for version in seed.VERSIONS)

# verdict (one of schema.VERDICTS) -> (tone, what it means, what to do next)
VERDICT_TEXT: dict[str, tuple[str, str, str]] = {
    schema.HEALTHY: (
        "ok",
        "No NaN or Inf was found in the weights, the optimizer state, the loss or its gradient on the replayed "
        "cases, in any measured precision.",
        "Nothing in this checkpoint needs fixing. If training diverged later, analyse a later checkpoint; the "
        "headroom below says how far the largest values are from their dtype's limit.",
    ),
    schema.NON_FINITE_WEIGHTS: (
        "bad",
        "The stored network weights already contain NaN or Inf. Every forward pass from this checkpoint is "
        "non-finite: this is the end state of a divergence, not its cause.",
        "Do not resume from it. Analyse an earlier checkpoint (or run geodiag clamp-sweep over several epochs) "
        "to find the first step whose loss or gradient became non-finite.",
    ),
    schema.NON_FINITE_OPTIMIZER_STATE: (
        "bad",
        "The weights are finite but the optimizer state (e.g. SGD momentum) holds NaN or Inf; the next optimizer "
        "step writes it into the weights.",
        "Do not resume with this optimizer state: resume from an earlier checkpoint, and find which gradient "
        "first became non-finite (provenance below, or an earlier checkpoint's analysis).",
    ),
    schema.GRAD_SCALER_COLLAPSED: (
        "bad",
        "The fp16 GradScaler's scale has collapsed: many consecutive steps were skipped as non-finite, and once "
        "1/scale is no longer finite in fp32 the next finite step is unscaled to NaN.",
        "The scaler only hides the cause: find the op that made the scaled gradients non-finite (provenance "
        "below) and replay the batch in fp32 to tell a formula problem from fp16 range.",
    ),
    schema.LOSS_RAISED: (
        "bad",
        "The loss raised an exception on some cases in some precisions (listed below with the line that raised): "
        "a training step there would stop the run, and those evaluations have no loss or gradient to measure.",
        "Fix the line named below for that precision (e.g. a clamp bound larger than fp16's maximum 65504 "
        "under fp16 autocast), then analyse again; the precisions that ran are reported as measured.",
    ),
    schema.NON_FINITE_LOSS: (
        "bad",
        "The loss itself is NaN or Inf on the replayed cases: the forward pass produced a non-finite value.",
        "Read the provenance below for the first op that produced it; if it is non-finite in fp32 and fp64 too, "
        "the formula is at fault, not the precision.",
    ),
    schema.NON_FINITE_GRADIENT: (
        "bad",
        "The loss is finite but its gradient is not: a backward op produced NaN or Inf.",
        "Read the provenance below for the backward op that produced it (its producer, not a downstream op), "
        "and compare precisions: a value non-finite only in fp16 is range, one non-finite in fp64 is the maths.",
    ),
}
STATE_TENSOR_COLUMNS = ("tensor", "kind", "count", "nan", "posinf", "neginf", "zero", "subnormal", "fp16_overflow",
                        "fp16_underflow", "bf16_overflow", "bf16_underflow", "min", "max", "abs_min", "abs_p50",
                        "abs_p99", "abs_max")


def _field(summary: dict, key: str) -> dict:
    """A JSON-object field of summary.json ({} when absent); any other type is the producer's mistake, said once."""
    value = summary.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportInputError(f"summary.json: {key!r} must be an object, found {type(value).__name__}")
    return value


def _verdict_section(summary: dict) -> Section:
    verdict = summary.get("verdict")
    if verdict not in schema.VERDICTS:
        raise ReportInputError(f"summary.json: unknown verdict {verdict!r}; expected one of "
                               f"{', '.join(schema.VERDICTS)}")
    tone, meaning, next_step = VERDICT_TEXT[verdict]
    reason = summary.get("verdict_reason") or "no reason recorded"
    body = f"**{verdict.replace('_', ' ')}**: {reason}\n\n{meaning}\n\n**Next:** {next_step}"
    lines = [line for line in (_loss_role_line(summary), *loss_findings_lines(summary)) if line]
    return Section("Verdict", "\n\n".join([body, *lines]), tone=tone)


def loss_findings_lines(summary: dict) -> list[str]:
    """What the verdict on finiteness does not show, one line each: the loss read its input as the other kind;
    per precision, it is a constant over the cases, and a guard hid non-finite values (``loss_findings``)."""
    constant = loss_findings.by_precision(summary.get("constant_loss") or [])
    masked = loss_findings.by_precision(summary.get("masked_nonfinite") or [])
    misread = loss_findings.misread_input_line(summary.get("misread_input") or [])
    return [*([misread] if misread else []),
            *loss_findings.precision_lines(constant, masked, loss_findings.masked_sites_line)]


def _range(stats: dict) -> str:
    low, high = format_number(stats.get("min")), format_number(stats.get("max"))
    return "–" if low == high == "–" else f"{low} to {high}"


def _loss_role_line(summary: dict) -> Optional[str]:
    """One line: whether the loss is inert, contributes or dominates the step at this checkpoint, and why when a
    clamp explains it (summary.json's loss_role)."""
    role = _field(summary, "loss_role")
    if not role.get("role"):
        return None
    verb = {"inert": "is **inert**", "contributes": "**contributes**", "dominant": "**dominates** the step"}
    line = (f"**Gradient share:** the loss analysed (`{role.get('loss')}`) {verb.get(role['role'], role['role'])} at "
            f"this checkpoint: its share of the step's gradient at the network's parameters, <g_loss, g>/|g|² with "
            f"g = g_Dice+CE + g_loss, is {format_number(role.get('share'))} (median over {role.get('samples')} "
            f"training patches in {role.get('precision')}; range {format_number(role.get('share_min'))} to "
            f"{format_number(role.get('share_max'))}; "
            f"inert below {format_number(role.get('inert_below'))} in magnitude, dominant above "
            f"{format_number(role.get('dominant_above'))})")
    terms = role.get("terms") or {}
    if terms:
        line += "; its terms: " + ", ".join(f"{name} {term_role}" for name, term_role in terms.items())
    explained = role.get("explained_by") or {}
    if explained:
        line += (f". {'Why: t' if role['role'] == 'inert' else 'T'}he clamp at {explained['site']} holds "
                 f"{100 * explained['at_bound_fraction']:.3g}% of its elements at its bound, where it passes zero "
                 "gradient")
    return line + "."


def _key_value_table(pairs: list[tuple[str, Any]]) -> str:
    return markdown_table(pd.DataFrame(pairs, columns=["", "value"]).astype({"value": object}))


def _checkpoint_section(summary: dict) -> Section:
    checkpoint = _field(summary, "checkpoint")
    settings = _field(summary, "settings")
    path = str(checkpoint.get("path") or "")
    pairs = [("checkpoint", "/".join(Path(path).parts[-2:]) or None)]
    pairs += [(key, checkpoint.get(key)) for key in ("trainer_name", "configuration", "fold", "epoch",
                                                    "geometric_active")]
    eps = settings.get("eps")
    pairs += [("stabilizer", settings.get("stabilizer")), ("eps", None if eps is None else format_eps(eps)),
              ("precisions", ", ".join(map(str, settings.get("precisions") or [])) or None),
              ("device", settings.get("device")), ("cases replayed", summary.get("cases"))]
    return Section("Checkpoint and settings", _key_value_table(pairs) + (f"\n\nFull path: `{path}`" if path else ""))


def _state_section(summary: dict) -> Section:
    state = _field(summary, "state")
    broken = state.get("non_finite_weight_tensors") or []
    scale = state.get("grad_scaler_scale")
    pairs = [("non-finite weight elements", state.get("non_finite_weights")),
             ("tensors holding them", ", ".join(broken[:10]) + (f" … (+{len(broken) - 10})" if len(broken) > 10 else "")
              if broken else "none"),
             ("non-finite optimizer-state elements", state.get("non_finite_optimizer")),
             ("GradScaler scale", "no scaler (CPU or fp32 training)" if scale is None else scale),
             ("1/scale finite in fp32", state.get("inverse_scale_finite"))]
    text = _key_value_table(pairs)
    if scale is not None and scale > 0:
        text += (f"\n\nThe scale is {scale:.3g}, {math.log2(scale):.1f} halvings from 1 "
                 f"(the initial scale {GRAD_SCALER_INITIAL_SCALE:g} is 2^16); 1/scale = {1 / scale:.3g}.")
    return Section("Training state", text)


_FP32_MAX = schema.FP32_MAX
# nnU-Net's CUDA training: fp16 autocast with a GradScaler starting at its initial scale.
_CUDA_REGIME = f"fp16 autocast, GradScaler starting at {GRAD_SCALER_INITIAL_SCALE:g}"


def _headroom_text(measured: str, decades: float) -> tuple[str, bool]:
    """'MEASURED, d decades of headroom. That is (not) less than the flagged decade...', and whether flagged."""
    text = f"{measured}, {format_number(decades, 2)} decades of headroom."
    if decades is None or not math.isfinite(decades):
        return text, False
    flagged = decades < HEADROOM_WARN_DECADES
    return text + (f" That is {'less' if flagged else 'not less'} than the {HEADROOM_WARN_DECADES:g} decade this "
                   f"report flags: a value {10 ** decades:.3g}× larger would reach the limit."), flagged


def _closest_section(summary: dict) -> Section:
    """How near the largest measured value came to its limit, said in the precision and with the scaler the run
    has (Training state). The producer picks the tensor against nnU-Net's CUDA regime (network gradients x the
    initial scale and network values against fp16, the loss's own values against fp32); for a run without a
    scaler that regime is a what-if, named so, after the headroom in the run's own fp32."""
    closest = _field(summary, "closest_to_trouble")
    if not closest or closest.get("tensor") is None:
        return Section("Closest to trouble", "Not measured.")
    value, limit, decades = closest.get("value"), closest.get("limit"), closest.get("headroom_decades")
    fp16, initial = schema.FP16_MAX, GRAD_SCALER_INITIAL_SCALE
    named = f"`{closest['tensor']}` ({closest.get('kind')}, measured in {closest.get('precision')})"
    producer = f"{named}: {closest.get('quantity')} = {format_number(value)} against the limit {format_number(limit)}"
    grad = limit is not None and math.isclose(limit, fp16 / initial)
    if not (grad or limit == fp16) or not value:  # a loss value against fp32: the same in every regime
        text, flagged = _headroom_text(producer, decades)
        return Section("Closest to trouble", text, tone="warn" if flagged else "")
    scale = _field(summary, "state").get("grad_scaler_scale", math.nan)
    magnitude = f"{'max |grad|' if grad else 'max |x|'} = {format_number(value)}"
    if scale is None:
        text, flagged = _headroom_text(
            "This run trained in fp32 without a GradScaler (Training state: no scaler), where every tensor's limit is "
            f"fp32's largest value {_FP32_MAX:.3g}: {named}, {magnitude}", math.log10(_FP32_MAX / value))
        what_if = (f"**What-if**, had it trained as nnU-Net trains on CUDA ({_CUDA_REGIME}), this is the tensor "
                   f"closest to trouble: {magnitude} against "
                   + (f"{fp16:g} / {initial:g} = {limit:.4g}" if grad else f"fp16's {fp16:g}"))
        return Section("Closest to trouble", text + "\n\n" + _headroom_text(what_if, decades)[0],
                       tone="warn" if flagged else "")
    if isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0:
        limit = fp16 / scale if grad else fp16
        text, flagged = _headroom_text(
            f"This run trained under fp16 autocast with a GradScaler at scale {scale:g} (Training state): {named}, "
            f"{magnitude} against " + (f"{fp16:g} / {scale:g} = {limit:.4g} (scaled by {scale:g}, it must stay "
                                       f"below fp16's {fp16:g})" if grad else f"fp16's {fp16:g}"),
            math.log10(limit / value))
    else:
        text, flagged = _headroom_text(f"The run's precision and scaler are not recorded; assuming nnU-Net's CUDA "
                                       f"training ({_CUDA_REGIME}): {producer}", decades)
    return Section("Closest to trouble", text, tone="warn" if flagged else "")


def _share_table(summary: dict) -> Optional[str]:
    """summary.json's loss_share as a table: per precision, pass and value, its shares' medians and range."""
    shares = _field(summary, "loss_share")
    rows = [{"precision": precision, "pass": pass_name, "value": piece, "samples": stats.get("samples"),
             "share, params (median)": stats.get("share_params", {}).get("median"),
             "share, params (range)": _range(stats.get("share_params", {})),
             "share, logits (median)": stats.get("share_logits", {}).get("median"),
             "|g_x|/|g|, params (median)": stats.get("norm_ratio_params", {}).get("median"),
             "role": stats.get("role")}
            for precision, passes in shares.items() for pass_name, pieces in passes.items()
            for piece, stats in pieces.items()]
    if not rows:
        return None
    return ("Each value's share of the step's gradient g = g_Dice+CE + g_loss, <g_x, g>/|g|², and |g_x|/|g|: on "
            "each training patch alone (at the network's parameters and at the logits) and on each whole image (at "
            "its logits only); the role is judged on the median share at the parameters for patches, at the logits "
            "for whole images (loss_share.csv holds every patch).\n\n" + markdown_table(pd.DataFrame(rows)))


def gradient_share_text(summary: dict) -> str:
    """The loss's role and the share table, as the console shows them after the verdict ("" when not measured)."""
    return "\n\n".join(part for part in (_loss_role_line(summary), _share_table(summary)) if part)


def _gradient_section(summary: dict, terms: Optional[pd.DataFrame]) -> Section:
    dominant = _field(summary, "dominant_gradient")
    parts = [table for table in [_share_table(summary)] if table]
    if dominant.get("term") is not None and dominant.get("share") is not None:
        parts.append(f"`{dominant['term']}` carries {100 * dominant['share']:.3g}% of the L2 norm of the "
                     "geometric gradient dL/dlogits.")
    if terms is not None and not terms.empty:
        table = (terms.groupby(["precision", "term"], sort=False)
                 .agg(cases=("case", "nunique"), median_value=("value", "median"),
                      median_grad_share=("grad_share", "median"), max_grad_share=("grad_share", "max"))
                 .reset_index())
        parts.append("Per term, over the replayed cases:\n\n" + markdown_table(table))
    return Section("What dominates the gradient", "\n\n".join(parts) or "Not measured.")


def _tensor_findings(tensors: pd.DataFrame) -> str:
    nonfinite = tensors[(tensors["nan"] + tensors["posinf"] + tensors["neginf"]) > 0]
    overflow = tensors[tensors["fp16_overflow"] > 0]
    lines = []
    if nonfinite.empty:
        lines.append("- no tensor holds NaN or Inf in any precision")
    for row in nonfinite.itertuples(index=False):
        lines.append(f"- `{row.tensor}` {row.kind} ({row.precision}): {int(row.nan)} NaN, {int(row.posinf)} +Inf, "
                     f"{int(row.neginf)} −Inf of {int(row.count)}")
    for row in overflow.itertuples(index=False):
        lines.append(f"- `{row.tensor}` {row.kind} ({row.precision}): {int(row.fp16_overflow)} values would overflow "
                     "fp16 (|x| ≥ 65520)")
    return "\n".join(lines)


def _tensor_sections(directory: Path, tensors: pd.DataFrame, histograms: Optional[pd.DataFrame]) -> list[Section]:
    sections = [Section("Tensors", _tensor_findings(tensors))]
    for precision, group in tensors.groupby("precision", sort=False):
        table = markdown_table(group[list(STATE_TENSOR_COLUMNS)])
        figure_list = []
        if histograms is not None:
            path = figures.tensor_histograms(histograms, tensors, precision, directory / "figures"
                                             / f"histograms_{precision}.png")
            figure_list.append(Figure(path, f"Histograms of log10 |x| (bars span log10 of each bin's edges; "
                                            f"count on a log axis) of every recorded tensor in {precision} (values "
                                            "and gradients side by side, two tensors to a row); in each panel's "
                                            "corner: its exact counts of 0, NaN, +Inf, −Inf where not zero (not in "
                                            "the bins). Dashed: fp16's range."))
        sections.append(Section(f"Tensors in {precision}", "Over finite values: `min` and `max` are signed; the `abs_` "
                                "columns are magnitudes |x|, their quantiles read from the exact histogram (each "
                                "within its bin and between `abs_min` and `abs_max`).\n\n" + table,
                                figures=figure_list))
    return sections


def _eps_units(summary: dict) -> str:
    sobel = _field(summary, "settings").get("sobel")
    if sobel == "seed":
        return (f"s in the seed's units (raw Sobel, zero padding): {_SEED_EPS_NAMED} are the seed's "
                f"{_SEED_VERSIONS_NAMED} clamps")
    if sobel == "normalised":
        moved = " and ".join(format_eps(eps / seed.UNITS_FACTOR, digits=2) for eps in SEED_EPS)
        return (f"s in geodiag's normalised units (Sobel divided by {seed.SOBEL_GAIN}), 1/{seed.UNITS_FACTOR:g} of the "
                f"seed's: {_SEED_EPS_NAMED} here are not the seed's clamps, which sit at {moved} in these units")
    return "units of s not recorded"


def _eps_section(directory: Path, fractions: Optional[pd.DataFrame], summary: dict) -> Optional[Section]:
    if fractions is None or fractions.empty:
        return None
    lines = []
    for (precision, tensor), group in fractions.groupby(["precision", "tensor"], sort=False):
        named = [f"{100 * row.fraction_below:.3g}% below {format_eps(row.eps)}"
                 for row in group.itertuples(index=False)
                 if any(math.isclose(row.eps, e, rel_tol=1e-9) for e in SEED_EPS)]
        zero = float(group["zero_grad_fraction"].iloc[0])
        lines.append(f"- {precision}, `{tensor}`: {', '.join(named) or _SEED_EPS_NAMED + ' not measured'}; exactly "
                     f"zero gradient arriving at it: {100 * zero:.3g}% of its elements")
    path = figures.eps_fractions(fractions, directory / "figures" / "eps_fractions.png")
    body = ("Fraction of the elements of each clamped tensor below each eps: a clamp at that eps passes them zero "
            f"gradient; {_eps_units(summary)}.\n\n" + "\n".join(lines) + "\n\n"
            + markdown_table(fractions[list(EPS_FRACTION_COLUMNS)].assign(eps=fractions["eps"].map(format_eps))))
    return Section("Clamped tensors below eps", body, figures=[Figure(
        path, "One panel per clamped tensor: share of its elements below eps (%) per precision (solid, one marker "
              "and width per precision, so precisions that agree stay visible); dotted: share with exactly zero "
              "gradient.")])


def _provenance_section(summary: dict) -> Section:
    entries = summary.get("provenance") or []
    if not entries:
        return Section("Provenance", "No non-finite value was produced during the replay, so there is no first op "
                                     "to name.")
    table = pd.DataFrame(entries).reindex(columns=["phase", "op", "node", "module", "tap", "message",
                                                  "classification"])
    legend = "\n".join(f"- **{name}**: {meaning}" for name, meaning in schema.REPLAY_CLASSIFICATIONS.items()
                       if name in set(table["classification"]))
    return Section("Provenance", "The first non-finite values, in the order they were produced; each failing pass "
                   "was replayed in its precision and at fp32 and fp64 to classify it:\n\n"
                   + markdown_table(table.astype(object).where(table.notna(), None))
                   + (f"\n\n{legend}" if legend else ""))


def _raised_section(summary: dict) -> Optional[Section]:
    """Which case-precision pairs the loss raised on, at which of the user's lines, with what message."""
    entries = summary.get("raised") or []
    if not entries:
        return None
    table = pd.DataFrame(entries).reindex(columns=["precision", "case", "site", "message"])
    return Section("Evaluations where the loss raised", (
        "These case-precision pairs produced no loss: the loss raised at the line shown (the innermost frame of "
        "the loss's own code). Their statistics are absent from every table above and below.\n\n"
        + markdown_table(table)), tone="bad")


def first_screen_answers(summary: dict, tensors: pd.DataFrame) -> list[Answer]:
    """The first screen's answers; a check of its own appends its line to this list."""
    _, meaning, next_step = VERDICT_TEXT[summary["verdict"]]
    hidden = loss_findings_lines(summary)
    found = [analysis_screen.health(summary, meaning), analysis_screen.closest(summary),
             analysis_screen.loss_role(summary), *hidden_answers(hidden, "Verdict"),
             analysis_screen.fp16_zero_gradients(tensors), analysis_screen.next_step(next_step)]
    return [answer for answer in found if answer is not None]


def render(directory: str | Path) -> RenderedReport:
    """Render the analysis report in ``directory`` from the files ``geodiag analyze-checkpoint`` wrote there."""
    directory = Path(directory)
    summary = read_json(directory / "summary.json")
    tensors = read_table(directory / "tensors.csv", TENSORS_COLUMNS)
    histograms = read_optional_table(directory / "histograms.csv", HISTOGRAM_COLUMNS)
    fractions = read_optional_table(directory / "eps_fractions.csv", EPS_FRACTION_COLUMNS)
    terms = read_optional_table(directory / "terms.csv", TERM_COLUMNS)
    raised = _raised_section(summary)
    verdict = _verdict_section(summary)
    sections = [first_screen(first_screen_answers(summary, tensors)), verdict, *([raised] if raised else []),
                _checkpoint_section(summary),
                _state_section(summary), _closest_section(summary), _gradient_section(summary, terms)]
    site_histograms = read_optional_table(directory / sites_report.HISTOGRAMS_FILE,
                                          sites_report.SITE_HISTOGRAM_COLUMNS)
    sections += sites_report.sections(directory, summary, site_histograms)
    sections += _tensor_sections(directory, tensors, histograms)
    eps_section = _eps_section(directory, fractions, summary)
    if eps_section is not None:
        sections.append(eps_section)
    sections.append(_provenance_section(summary))
    return write_report(directory, TITLE, sections)
