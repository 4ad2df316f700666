"""What the study measures on its runs' checkpoints: the shares of small s, each term's gradient, the precisions
a user's loss runs in; then geodiag's tools on them (analyze-checkpoint, clamp-sweep, the sweep of the user's own
clamps), each writing its folder under the study's. The shares of small s and of the step are measured on every run;
the analysis and the sweeps on ``Study.analysed_runs``."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from geodiag.reports import schema, tables

from .definition import RunSpec, Study, epoch_checkpoint, nnunet_environment, switch_on_checkpoint


# Bin edges of the distribution of s: quarter decades from 1e-16 to 1e2, so each clamp the seed quotes is an edge.
S_EDGES = 10.0 ** (np.arange(-64, 9) / 4)
# Every bin of it as (lower, upper): the exact zeros as (0, 0), then (0, 1e-16), each quarter decade, [1e2, inf).
S_BINS = ((0.0, 0.0), *zip([0.0, *S_EDGES.tolist()], [*S_EDGES.tolist(), float("inf")]))


def s_histogram(s: torch.Tensor) -> list[tuple[float, float, int]]:
    """The distribution of s as (lower, upper, pixels), one row per bin of ``S_BINS``, empty or not, so histograms
    add up across cases."""
    flat = s.detach().flatten().double()
    positive = flat[flat > 0]
    edges = torch.as_tensor(S_EDGES, dtype=torch.float64, device=flat.device)
    counts = torch.bincount(torch.bucketize(positive, edges, right=True), minlength=len(S_EDGES) + 1).tolist()
    return [(lower, upper, count) for (lower, upper), count in zip(S_BINS, [int((flat == 0).sum()), *counts])]


def s_statistics(checkpoint, network: torch.nn.Module, max_cases: int,
                 device: str = "cpu") -> tuple[list[dict], list[dict]]:
    """On the whole-image fp32 predictions of ``network`` for a checkpoint's first cases: the distribution of s =
    gx^2 + gy^2 over the cases (``s_histogram``), and per case the share of pixels whose s lies below each threshold
    the seed quotes (``seed.BELOW_AT_SWITCH_ON``, each an edge of the bins, so read from them); s in the seed's units
    (raw Sobel, zero padding: the ``v2.3`` preset's s) and in geodiag's normalised units (the ``production``
    preset's, 1/``seed.UNITS_FACTOR`` of it in 2D)."""
    from geodiag.losses import GeometricLoss
    from geodiag.reports.seed import BELOW_AT_SWITCH_ON

    from ..nnunet.cases import find_cases, predict_logits, preprocess

    uppers = np.array([upper for _, upper in S_BINS])
    network = network.to(device)
    losses = {units: GeometricLoss.from_preset(preset, classes=checkpoint.foreground_classes, softmax=True,
                                               reference="prior", aspect_weight=0)
              for units, preset in (("seed", "v2.3"), ("normalised", "production"))}
    shares, pixels = [], {units: np.zeros(len(S_BINS), dtype=np.int64) for units in losses}
    for files in find_cases(checkpoint)[:max_cases]:
        case = preprocess(checkpoint, files)
        with torch.no_grad():
            logits = predict_logits(network, case.image, checkpoint.patch_size).float()
            for units, loss in losses.items():
                seen = {}
                with loss.register_tap(lambda name, t: seen.__setitem__(name, t),
                                       names=("compactness.grad_mag_squared",)):
                    loss(logits)
                counts = np.array([count for *_, count in s_histogram(seen["compactness.grad_mag_squared"])])
                shares += [{"case": files.name, "units": units, "eps": eps,
                            "fraction_below": counts[uppers <= eps].sum() / counts.sum(), "pixels": int(counts.sum())}
                           for eps in BELOW_AT_SWITCH_ON]
                pixels[units] += counts
    distribution = [{"units": units, "lower": lower, "upper": upper, "pixels": int(count)}
                    for units, counts in pixels.items() for (lower, upper), count in zip(S_BINS, counts)]
    return shares, distribution


def small_s(study: Study) -> None:
    """switch_on_s.csv (the shares of small s per case) and s_distribution.csv (the distribution of s over the
    cases), in the seed's units and ours, for each run untrained (nnU-Net's initialisation of its architecture,
    the run's seed), after epoch 0 and at the switch-on."""
    from geodiag.reports.schema import S_DISTRIBUTION_COLUMNS, SWITCH_ON_S_COLUMNS, UNTRAINED

    from ..nnunet.checkpoint import load_checkpoint

    rows, distribution = [], []
    for run in study.runs:
        first = epoch_checkpoint(study, run, 0)
        with nnunet_environment(study):
            checkpoints = {path: load_checkpoint(path) for path in (first, switch_on_checkpoint(study, run))}
            states = {UNTRAINED: (checkpoints[first], checkpoints[first].untrained_network(
                run.seed if run.seed is not None else study.seed))}
            states.update({path.name: (checkpoint, checkpoint.network()) for path, checkpoint in checkpoints.items()})
            measured = {state: s_statistics(checkpoint, network, study.cases, study.device)
                        for state, (checkpoint, network) in states.items()}
        for state, (shares, histogram) in measured.items():
            where = {"run": run.name, "dataset": run.dataset_id, "checkpoint": state}
            rows += [{**where, **row} for row in shares]
            distribution += [{**where, **row} for row in histogram]
            seed = pd.DataFrame(shares, columns=SWITCH_ON_S_COLUMNS[3:]).query("units == 'seed'")
            means = seed.groupby("eps")["fraction_below"].mean()
            study.log(f"  {run.name} {state}: " + ", ".join(
                f"{100 * share:.3g}% below {eps:g}" for eps, share in means.items())
                + " (mean over cases, seed's units)")
    tables.write_table(pd.DataFrame(rows, columns=SWITCH_ON_S_COLUMNS), study.out / "switch_on_s.csv")
    tables.write_table(pd.DataFrame(distribution, columns=S_DISTRIBUTION_COLUMNS), study.out / "s_distribution.csv")


def term_gradients(study: Study) -> None:
    """term_gradients.csv: at each run's switch-on checkpoint, on training batches, what Dice+CE and each geometric
    term send to the logits and to the network, and their shares of the step's gradient."""
    from geodiag.reports.schema import TERM_GRADIENT_COLUMNS

    from . import term_gradients as measured

    rows = []
    for run in study.runs:
        path = switch_on_checkpoint(study, run)
        with nnunet_environment(study), open(study.out / "term_gradients.log", "a") as log, \
                contextlib.redirect_stdout(log):  # nnU-Net's trainer prints its banner and split
            if run.user is not None:
                terms = measured.user_loss_terms(run.user.loss, dict(run.user.term_weights), run.user.samples)
            else:
                terms = measured.geometric_loss_terms(
                    schema.read_json(study.fold_folder(run) / "geometric_settings.json"))
            found = measured.measure(path, terms, study.term_batches, study.device, study.run_seed(run))
        rows += [{"run": run.name, "dataset": run.dataset_id, "checkpoint": path.name, **row} for row in found]
        frame = pd.DataFrame(found)
        shares = frame.groupby("term", sort=False)["share_of_step"].median()
        study.log(f"  {run.name} {path.name}: median share of the step's gradient " + ", ".join(
            f"{term} {share:.3g}" for term, share in shares.items()))
    tables.write_table(pd.DataFrame(rows, columns=TERM_GRADIENT_COLUMNS), study.out / "term_gradients.csv")


def loss_precisions(study: Study) -> None:
    """loss_precisions.csv: in which precisions each user run's loss runs at all under nnU-Net's autocast; the
    analysis and the replica sweep take those (a loss that raises in one precision would abort every other)."""
    from geodiag.reports.schema import LOSS_PRECISION_COLUMNS

    from .precision_probe import probe

    rows, running = [], {}
    for run in study.runs:
        if run.user is None:
            running[run.name] = study.precisions
            continue
        with nnunet_environment(study):
            found = probe(switch_on_checkpoint(study, run), run.user.loss, study.precisions, study.device)
        rows += [{"run": run.name, **row} for row in found]
        running[run.name] = tuple(row["precision"] for row in found if row["runs"])
        for row in found:
            if not row["runs"]:
                study.log(f"  {run.name}: the loss raises under {row['precision']} autocast at {row['site']}: "
                          f"{row['error']}")
    tables.write_table(pd.DataFrame(rows, columns=LOSS_PRECISION_COLUMNS), study.out / "loss_precisions.csv")
    study.products["precisions"] = running


def _precisions(study: Study, run: RunSpec) -> tuple[str, ...]:
    return study.products.get("precisions", {}).get(run.name, study.precisions)


def analyze(study: Study) -> None:
    """Each run's switch-on checkpoint: a user's loss through its SPEC (its sites table), geodiag's as recorded."""
    from geodiag.reports import analysis_report

    from ..tools.analyze import analyze_checkpoint

    summaries = {}
    for run in study.analysed_runs:
        path = switch_on_checkpoint(study, run)
        out = study.out / "analysis" / run.name
        study.log(f"  {run.name} {path.name}" + (f" --loss {run.user.loss}" if run.user else ""))
        with nnunet_environment(study):
            summary = analyze_checkpoint(str(path), out, max_cases=study.cases, precisions=_precisions(study, run),
                                         device=study.device, resume=(out / "cases").is_dir(),
                                         **({"loss_spec": run.user.loss} if run.user else {}))
        analysis_report.render(out)
        study.log(f"    verdict {summary['verdict']}: {summary['verdict_reason']}")
        summaries[out.name] = summary
    study.products["analyses"] = summaries


def sweep(study: Study) -> None:
    """geodiag's loss at every clamp eps on the checkpoints around its runs' switch-on (sweep/)."""
    from geodiag.reports import sweep_report

    from ..tools.sweep import parse_settings, run_sweep

    specs = []
    for run in study.analysed_runs:
        if run.user is not None:
            continue
        for offset in study.sweep_epochs:
            epoch = run.warmup + offset
            if 0 <= epoch < run.epochs and epoch_checkpoint(study, run, epoch).is_file():
                specs.append(f"{run.name}-e{epoch}={epoch_checkpoint(study, run, epoch)}")
    if not specs:
        study.log("  no geodiag run to sweep")
        return
    out = study.out / "sweep"
    with nnunet_environment(study):
        frame, timing = run_sweep(specs, out, cases=None, settings=parse_settings(("clamp",), study.sweep_eps),
                                  precisions=study.precisions, device=study.device,
                                  resume=(out / "cases").is_dir(), max_cases=study.cases,
                                  progress=lambda message: study.log("  " + message))
    sweep_report.render(out)
    study.log(f"  {len(frame)} rows; network forward {timing.forward_s:.1f} s of {timing.total_s:.1f} s")


def replica_sweep(study: Study) -> None:
    """The user runs' own sqrt clamps replaced at their lines by each eps (``clamp-sweep --loss SPEC --site
    FILE:LINE,FILE:LINE --eps …``) on their switch-on checkpoints (replica_sweep/): one loss serves every version,
    since the swept value replaces the only setting the versions differ in."""
    from geodiag.reports import site_sweep_report

    from ..tools.site_sweep import run_site_sweep

    users = [run for run in study.analysed_runs if run.user is not None]
    if not users:
        return
    specs = [f"{run.name}-e{run.warmup}={switch_on_checkpoint(study, run)}" for run in users]
    precisions = [p for p in study.precisions if all(p in _precisions(study, run) for run in users)]
    out = study.out / "replica_sweep"
    with nnunet_environment(study):
        frame = run_site_sweep(specs, out, users[0].user.loss, list(users[0].user.sites), study.sweep_eps,
                               precisions=precisions, device=study.device, resume=(out / "cases").is_dir(),
                               max_cases=study.cases, progress=lambda message: study.log("  " + message))
    site_sweep_report.render(out)
    study.log(f"  {len(frame)} rows at {', '.join(users[0].user.sites)}")
