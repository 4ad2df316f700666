"""How the study addresses the seed replica (seed_replica/) as a user's code, without importing it.

nnU-Net finds its trainers through ``nnUNet_extTrainer`` pointing at ``FOLDER``; the analyses read its loss
through ``--loss FILE:loss_v23`` / ``loss_v24``; the counterfactual sweep replaces the bounds of its two sqrt clamps
at their source lines, found here by reading the file as text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).parent / "seed_replica"
FILE = FOLDER / "nnUNetTrainerSeedReplica.py"
# The replica's terms and the attributes holding their weights (0.1, 0.15, 0.05 in the seed's copy that ran).
TERM_WEIGHTS = (("compactness", "w_compactness"), ("aspect", "w_aspect"), ("boundary", "w_boundary"))
# Its trainer feeds the loss the first 4 samples of the batch.
SAMPLES = 4
# What marks the two sqrt clamps (the only clamps whose min is the eps the seed changed between V2.3 and V2.4).
SQRT_CLAMP_MARKERS = {"compactness": "torch.clamp(grad_mag_squared, min=self.eps)",
                      "aspect": "torch.clamp(discriminant, min=self.eps"}


@dataclass(frozen=True)
class UserCode:
    """A trainer that is not geodiag's: the folder nnU-Net searches, its loss SPEC, the terms' weight attributes,
    how many samples the trainer feeds its loss, and the clamp sites ("file.py:LINE") to sweep."""

    folder: Path
    loss: str
    term_weights: tuple[tuple[str, str], ...]
    samples: int
    sites: tuple[str, ...]


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


def seed_replica(version: str) -> UserCode:
    """The replica at the seed's "V2.3" (eps 1e-4) or "V2.4" (eps 1e-2)."""
    factory = {"V2.3": "loss_v23", "V2.4": "loss_v24"}[version]
    return UserCode(FOLDER, f"{FILE}:{factory}", TERM_WEIGHTS, SAMPLES, tuple(sqrt_clamp_sites().values()))
