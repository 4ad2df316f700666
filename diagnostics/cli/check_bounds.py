"""`geodiag check-bounds`: fail CI when a loss change lets a gradient grow or a NaN appear, or silences a gradient."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import options

HELP = "check a loss's gradients against analytic bounds and a committed baseline (exit 1 naming each regression)"


def configure(parser: argparse.ArgumentParser) -> None:
    from ..tools.bounds.baseline import DEFAULT_TOLERANCES
    from ..tools.bounds.output import describe_tolerance

    options.add_loss(parser, "the built-in GeometricLoss under every --settings entry (the loss gets probabilities "
                             "[B, 2, ...] and the label map [B, 1, ...])")
    parser.add_argument("--dims", metavar="N[,N]", type=options.dims,
                        help="run only the cases of these dimensionalities (2, 3); the others are listed as skipped")
    parser.add_argument("--baseline", metavar="FILE", type=options.path_object,
                        help="baseline JSON (default: the packaged one for the built-in loss, none for --loss)")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write the measurements into the baseline (merging with its other entries), with the "
                             "tolerances in effect")
    parser.add_argument("--tolerance", action="append", default=[], metavar="NAME=VALUE",
                        help="set a tolerance of the comparison with the baseline (repeatable; VALUE a fraction: "
                             "0.1 is 10%% or 10 points); defaults: " + _escaped("; ".join(
                                 describe_tolerance(name, t) for name, t in DEFAULT_TOLERANCES.items())))
    parser.add_argument("--junit", metavar="FILE", type=options.path_object,
                        help="also write JUnit XML, one testcase per run")
    parser.add_argument("--cases", metavar="NAMES", type=options.names, help="comma-separated case names (default: all)")
    parser.add_argument("--settings", metavar="NAMES", type=options.names,
                        help="comma-separated built-in loss settings (default: all)")
    options.add_precision(parser, None, "precisions", old_spelling=True)
    options.add_device(parser)
    parser.add_argument("--list", action="store_true", help="list the cases and settings, then exit")


def _escaped(text: str) -> str:
    """Help text with argparse's %-formatting escaped."""
    return text.replace("%", "%%")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..tools import bounds
    from ..instruments.devices import PRECISIONS, resolve_device
    from ..instruments.errors import GeodiagError
    from ..nonfinite.loss_spec import load_loss

    if args.list:
        _print_list(bounds)
        return 0

    device = torch.device(resolve_device(args.device))
    if args.loss:
        if args.settings:
            raise GeodiagError("--settings picks built-in GeometricLoss settings; a --loss is checked as it is")
        if args.update_baseline and args.baseline is None:
            raise GeodiagError("--update-baseline with --loss needs --baseline FILE")
        losses = {args.loss: load_loss(args.loss, args.loss_input)}
        baseline_path = args.baseline
    else:
        losses = bounds.builtin_losses(args.settings)
        baseline_path = args.baseline or bounds.BASELINE_PATH
    cases = bounds.select_cases(args.cases)
    precisions = args.precision or list(PRECISIONS)
    tolerances = bounds.parse_tolerances(args.tolerance)

    baseline = None
    if baseline_path is not None and not (args.update_baseline and not baseline_path.exists()):
        baseline = bounds.Baseline.load(baseline_path).with_tolerances(tolerances)

    start = time.perf_counter()
    outcomes = bounds.run_checks(losses, cases, precisions, device,
                                 baseline=None if args.update_baseline else baseline, dims=args.dims)
    elapsed = time.perf_counter() - start
    print(bounds.format_table(outcomes))
    print(bounds.output.headroom_legend())
    checked_with = (baseline or bounds.Baseline().with_tolerances(tolerances)).tolerances
    if baseline_path is not None:
        print(f"\ntolerances against the baseline (the larger allowance applies; --tolerance NAME=VALUE):\n"
              f"{bounds.format_tolerances(checked_with)}")

    if args.update_baseline:
        measured = [o.measurement for o in outcomes if o.measured]
        updated = (baseline or bounds.Baseline().with_tolerances(tolerances)).updated(measured, device)
        _write(lambda: updated.save(baseline_path), baseline_path, "baseline")
        print(f"baseline: wrote {len(measured)} entries to {baseline_path}")
    if args.junit:
        _write(lambda: bounds.write_junit(outcomes, args.junit, tolerances=checked_with if baseline else None),
               args.junit, "JUnit file")

    failed = _print_summary(outcomes, device, elapsed, args.update_baseline)
    return 1 if failed else 0


def _print_list(bounds) -> None:
    print("cases:")
    for case in bounds.CASES.values():
        print(f"  {case.name:<14}{case.description}")
    print("settings:")
    for name, kwargs in bounds.SETTINGS.items():
        print(f"  {name:<14}{', '.join(f'{k}={v}' for k, v in kwargs.items())}")


def _print_summary(outcomes, device, elapsed: float, update_baseline: bool) -> list:
    """The counts line, then one line per skipped run and per failure; returns the failed outcomes."""
    failed = [o for o in outcomes if not o.passed]
    skipped = [o for o in outcomes if o.skipped]
    unbaselined = sum(not o.baselined for o in outcomes if o.measured)
    if update_baseline:
        note = "; analytic bounds only (--update-baseline)"
    else:
        note = f"; {unbaselined} without a baseline entry (ok*)" if unbaselined else ""
    print(f"\n{len(outcomes)} checks on {device.type} in {elapsed:.1f} s: "
          f"{len(outcomes) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped{note}")
    for outcome in skipped:
        m = outcome.measurement
        print(f"SKIPPED {m.case} / {m.setting} / {m.precision}: {outcome.skipped}")
    for outcome in failed:
        if outcome.error:
            m = outcome.measurement
            print(f"RAISED {m.case} / {m.setting} / {m.precision}: {outcome.error}")
        for regression in outcome.regressions:
            print(f"REGRESSION {regression}")
    return failed


def _write(write, path: Path, what: str) -> None:
    from ..instruments.errors import GeodiagError

    try:
        write()
    except OSError as exc:
        raise GeodiagError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None
