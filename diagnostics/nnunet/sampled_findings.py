"""What watch's sampled checks found over a run (``step_checks`` finds them step by step): the masked non-finite
values and swallowed errors with their iteration and line, the epochs in which the ``--loss`` prior was inert; as
row columns, console lines, ``masked_nonfinite.json`` / ``swallowed_errors.json`` and the end-of-run summary."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from geodiag.reports import schema
from geodiag.reports.schema import INERT_SHARE

from .step_checks import inert_epoch

MASKED_FILE = "masked_nonfinite.json"
SWALLOWED_FILE = "swallowed_errors.json"


class SampledFindings:
    """Run-long findings; ``prior_spec`` is the ``--loss`` SPEC (None without one)."""

    def __init__(self, prior_spec: Optional[str], progress: Callable[[str], None]) -> None:
        self.prior_spec = prior_spec
        self.progress = progress
        self.masked: list[dict] = []
        self.swallowed: list[dict] = []
        self.inert_epochs: list[dict] = []

    def add_step(self, found: dict, iteration: int, epoch: int) -> dict:
        """One sampled step's findings (``StepChecks.end``): kept, said on the console, returned as row columns."""
        where = {"iteration": iteration, "epoch": epoch}
        for masked in found["masked"]:
            self.masked.append({**where, **masked})
            self.progress(f"geodiag watch: iteration {iteration}: non-finite values hidden from a finite loss at "
                          f"{masked['site']} ({masked['op']}, {masked['calls']} outputs): masked")
        for raised in found["raised"]:
            self.swallowed.append({**where, **raised})
            self.progress(f"geodiag watch: iteration {iteration}: an error in {raised['op']} at {raised['site']} was "
                          f"caught by the trainer's code and training went on: {raised['message']}")
        columns = {"masked_nonfinite": sum(m["calls"] for m in found["masked"]),
                   "swallowed_errors": len(found["raised"])}
        if self.prior_spec is not None:
            columns.update(prior_value=found["prior_value"], prior_share=found["prior_share"],
                           prior_ran=int(found["prior_ran"]))
        return columns

    def end_epoch(self, rows: list[dict], epoch: int, folder: Path) -> None:
        """The inert line of an epoch whose sampled steps all ran the prior below the threshold; the files."""
        share = inert_epoch(rows) if self.prior_spec is not None else None
        if share is not None:
            self.inert_epochs.append({"epoch": epoch, "median_share": share})
            self.progress(f"geodiag watch: the loss at {self.prior_spec} carried {100 * share:.3g}% of the gradient "
                          f"at the network's output this epoch (epoch {epoch}): inert")
        if self.masked:
            schema.write_json(folder / MASKED_FILE, {"masked_nonfinite": self.masked})
        if self.swallowed:
            schema.write_json(folder / SWALLOWED_FILE, {"swallowed_errors": self.swallowed})

    def summary_lines(self, folder: Path) -> list[str]:
        """The end-of-run findings (nothing when there were none)."""
        lines = []
        if self.masked:
            sites = sorted({f"{m['site']} ({m['op']})" for m in self.masked})
            lines.append(f"non-finite values hidden from a finite loss in {len(self.masked)} sampled steps at "
                         f"{', '.join(sites)}: see {folder / MASKED_FILE}")
        if self.swallowed:
            sites = sorted({f"{e['site']} ({e['message']})" for e in self.swallowed})
            lines.append(f"{len(self.swallowed)} errors caught by the trainer's code in sampled steps: "
                         f"{'; '.join(sites)}: see {folder / SWALLOWED_FILE}")
        if self.inert_epochs:
            lines.append(f"the loss at {self.prior_spec} was inert in epochs "
                         f"{', '.join(str(e['epoch']) for e in self.inert_epochs)} (|share| < {INERT_SHARE})")
        return lines
