"""How the study addresses the seed replica (seed_replica/) as a user's code, without importing it.

nnU-Net finds its trainers through ``nnUNet_extTrainer`` pointing at ``FOLDER``; the analyses read its loss
through ``--loss FILE:loss_v23`` / ``loss_v24``; the counterfactual sweep replaces the bounds of its two sqrt clamps
at their source lines, found here by reading the file as text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from geodiag.reports import seed

FOLDER = Path(__file__).parent / "seed_replica"
FILE = FOLDER / "nnUNetTrainerSeedReplica.py"
# The replica's terms and the attributes holding their weights (0.1, 0.15, 0.05 in the seed's copy that ran).
TERM_WEIGHTS = (("compactness", "w_compactness"), ("aspect", "w_aspect"), ("boundary", "w_boundary"))
# Its trainer feeds the loss the first samples of the batch, as the seed's did.
SAMPLES = seed.LOSS_SAMPLES
# The loss factory of each version of the seed, in the replica's file.
FACTORIES = {seed.V23: "loss_v23", seed.V24: "loss_v24"}
# What marks the two sqrt clamps (the only clamps whose min is the eps the seed changed between V2.3 and V2.4).
SQRT_CLAMP_MARKERS = {"compactness": "torch.clamp(grad_mag_squared, min=self.eps)",
                      "aspect": "torch.clamp(discriminant, min=self.eps"}


@dataclass(frozen=True)
class UserCode:
    """A trainer that is not geodiag's: the folder nnU-Net searches, its loss SPEC, the terms' weight attributes,
    how many samples the trainer feeds its loss, the clamp sites ("file.py:LINE") to sweep, and the name of the
    seed's version it replays (the study's run records carry it), if any."""

    folder: Path
    loss: str
    term_weights: tuple[tuple[str, str], ...]
    samples: int
    sites: tuple[str, ...]
    seed_version: Optional[str] = None


def sqrt_clamp_sites() -> dict[str, str]:
    """term -> "nnUNetTrainerSeedReplica.py:LINE" of its sqrt clamp."""
    lines = FILE.read_text().splitlines()
    sites = {}
    for term, marker in SQRT_CLAMP_MARKERS.items():
        found = [number for number, line in enumerate(lines, start=1) if marker in line]
        if len(found) != 1:
            raise RuntimeError(f"{FILE.name}: expected one line with {marker!r}, found {len(found)}")
        sites[term] = f"{FILE.name}:{found[0]}"
    return sites


def seed_replica(version: seed.Version) -> UserCode:
    """The replica at one of the seed's versions (``seed.V23``, ``seed.V24``)."""
    return UserCode(FOLDER, f"{FILE}:{FACTORIES[version]}", TERM_WEIGHTS, SAMPLES, tuple(sqrt_clamp_sites().values()),
                    seed_version=version.name)
