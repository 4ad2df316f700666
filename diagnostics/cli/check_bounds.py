"""`geodiag check-bounds`: fail CI when a loss change lets a gradient grow or a NaN appear."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import options

HELP = "check a loss's gradients against analytic bounds and a committed baseline (exit 1 naming each regression)"

_LOSS_HELP = ("check your own loss: a callable (probabilities [B, 2, ...], target label map [B, 1, ...]) -> scalar, "
              "an nn.Module instance, or a zero-argument factory or class returning one; default: the built-in "
              "GeometricLoss under every --settings entry")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", metavar="MODULE:CALLABLE", help=_LOSS_HELP)
    parser.add_argument("--baseline", metavar="FILE", type=Path,
                        help="baseline JSON (default: the packaged one for the built-in loss, none for --loss)")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write the measurements into the baseline (merging with its other entries)")
    parser.add_argument("--junit", metavar="FILE", type=Path, help="also write JUnit XML, one testcase per run")
    parser.add_argument("--cases", metavar="NAMES", type=options.names, help="comma-separated case names (default: all)")
    parser.add_argument("--settings", metavar="NAMES", type=options.names,
                        help="comma-separated built-in loss settings (default: all)")
    options.add_precision(parser, None, "precisions", old_spelling=True)
    options.add_device(parser)
    parser.add_argument("--list", action="store_true", help="list the cases and settings, then exit")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..tools import bounds
    from ..instruments.devices import PRECISIONS, resolve_device
    from ..instruments.errors import GeodiagError

    if args.list:
        print("cases:")
        for case in bounds.CASES.values():
            print(f"  {case.name:<14}{case.description}")
        print("settings:")
        for name, kwargs in bounds.SETTINGS.items():
            print(f"  {name:<14}{', '.join(f'{k}={v}' for k, v in kwargs.items())}")
        return 0

    device = torch.device(resolve_device(args.device))
    if args.loss:
        if args.settings:
            raise GeodiagError("--settings picks built-in GeometricLoss settings; a --loss is checked as it is")
        if args.update_baseline and args.baseline is None:
            raise GeodiagError("--update-baseline with --loss needs --baseline FILE")
        losses = {args.loss: bounds.load_loss(args.loss)}
        baseline_path = args.baseline
    else:
        losses = bounds.builtin_losses(args.settings)
        baseline_path = args.baseline or bounds.BASELINE_PATH
    cases = bounds.select_cases(args.cases)
    precisions = args.precision or list(PRECISIONS)

    baseline = None
    if baseline_path is not None and not (args.update_baseline and not baseline_path.exists()):
        baseline = bounds.Baseline.load(baseline_path)

    start = time.perf_counter()
    outcomes = bounds.run_checks(losses, cases, precisions, device,
                                 baseline=None if args.update_baseline else baseline)
    elapsed = time.perf_counter() - start
    print(bounds.format_table(outcomes))

    if args.update_baseline:
        updated = (baseline or bounds.Baseline()).updated([o.measurement for o in outcomes], device)
        _write(lambda: updated.save(baseline_path), baseline_path, "baseline")
        print(f"baseline: wrote {len(outcomes)} entries to {baseline_path}")
    if args.junit:
        _write(lambda: bounds.write_junit(outcomes, args.junit), args.junit, "JUnit file")

    failed = [o for o in outcomes if not o.passed]
    unbaselined = sum(not o.baselined for o in outcomes)
    if args.update_baseline:
        note = "; analytic bounds only (--update-baseline)"
    else:
        note = f"; {unbaselined} without a baseline entry (ok*)" if unbaselined else ""
    print(f"\n{len(outcomes)} checks on {device.type} in {elapsed:.1f} s: {len(outcomes) - len(failed)} passed, "
          f"{len(failed)} failed{note}")
    for outcome in failed:
        for regression in outcome.regressions:
            print(f"REGRESSION {regression}")
    return 1 if failed else 0


def _write(write, path: Path, what: str) -> None:
    from ..instruments.errors import GeodiagError

    try:
        write()
    except OSError as exc:
        raise GeodiagError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None
