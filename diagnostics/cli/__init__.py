"""The ``geodiag`` command: this dispatcher and one module per subcommand beside it (``python -m`` runs ``__main__``).

A subcommand module provides ``HELP`` (one line), ``configure(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so one command's heavy imports never slow down or break another.
The only room that knows flag names; may import every other room.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from geodiag.reports.schema import ReportInputError

from ..instruments.errors import ArgumentError, GeodiagError
from .options import flag

COMMANDS = {
    "env": "env",
    "doctor": "doctor",
    "make-dataset": "make_dataset",
    "analyze-checkpoint": "analyze_checkpoint",
    "clamp-sweep": "clamp_sweep",
    "check-bounds": "check_bounds",
    "bench": "bench",
    "demo": "demo",
    "reference-report": "reference_report",
    "watch": "watch",
    "replay": "replay",
}


def _load(command: str):
    return importlib.import_module(f"geodiag.diagnostics.cli.{COMMANDS[command]}")


class _Parser(argparse.ArgumentParser):
    """argparse with its rejections on one line (``geodiag CMD: error: ...``, exit 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser(selected: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="geodiag", description="Gradient-stability diagnostics for geometric losses in nnU-Net.")
    sub = parser.add_subparsers(dest="command", title="commands (geodiag COMMAND --help for each)", parser_class=_Parser)
    for name in COMMANDS:
        if name == selected:
            module = _load(name)
            module.configure(sub.add_parser(name, help=module.HELP, description=module.HELP))
        else:
            sub.add_parser(name, add_help=False)
    return parser


def _is_bad_input(exc: Exception) -> bool:
    """A GeodiagError, or the reports' ReportInputError (from the stdlib-only schema module, so ``geodiag env``,
    run on every shell start, does not load pandas to know it)."""
    return isinstance(exc, (GeodiagError, ReportInputError))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected not in COMMANDS:
        parser = _parser(None)
        if selected is None and not argv:
            parser.print_help()
            return 2
        if selected is not None:
            parser.error(f"unknown command {selected!r}; choose one of {', '.join(COMMANDS)}")
        parser.parse_args(argv)  # handles -h / --help
        return 2
    try:
        args = _parser(selected).parse_args(argv)
        return int(_load(selected).run(args) or 0)
    except KeyboardInterrupt:
        print(f"geodiag {selected}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user never gets a traceback unless asked for one
        if _is_bad_input(exc):
            message = exc.spelled(flag) if isinstance(exc, ArgumentError) else exc
            print(f"geodiag {selected}: error: {message}", file=sys.stderr)
            return 2
        if os.environ.get("GEODIAG_DEBUG"):
            raise
        print(f"geodiag {selected}: error: {type(exc).__name__}: {exc} (set GEODIAG_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 2  # 1 is check-bounds' 'regression found'; a crash is never a finding

