"""What the seed report says about its own design and run, in one place: its two versions and their sqrt clamps,
the units its s is in, the shares of small s it measured, and the size and schedule of its training.

Why one module: these facts are quoted by the study, the sweeps, the analysis report and the command line; each
sentence that states one is formatted from here, so a correction is made once. Run kinds (which version of the
replica a run is) are fields of the study's run records, written from ``VERSIONS``, never read back out of names.

Standard library only, like ``schema``: the producer (geodiag.diagnostics) imports it without pandas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The seed bounds its sqrt inputs as sqrt(clamp(s, min=eps)): a stabiliser "clamp" in geodiag's terms.
STABILIZER = "clamp"


@dataclass(frozen=True)
class Version:
    """One version of the seed's loss: its name and the eps of its sqrt clamps, in its own units (raw Sobel)."""

    name: str
    eps: float

    @property
    def setting(self) -> tuple[str, float]:
        """The (stabiliser, eps) of a clamp sweep that reproduces this version's bound, in the seed's units."""
        return STABILIZER, self.eps


V23 = Version("V2.3", 1e-4)  # the setting the seed blamed for its NaN
V24 = Version("V2.4", 1e-2)  # its "fix"
VERSIONS = (V23, V24)


def version_of(setting: tuple[str, float]) -> Optional[Version]:
    """The seed's version whose bound a (stabiliser, eps) setting is, or None."""
    return next((version for version in VERSIONS if version.setting == setting), None)


# Units: the seed's raw Sobel kernel [-1 0 1; -2 0 2; -1 0 1] has gain 8 per axis, which geodiag's normalised s
# divides out; so inside the image (2D) the seed's s is 64x the normalised s and its perimeter 8x the geometric one.
SOBEL_GAIN = 8
UNITS_FACTOR = float(SOBEL_GAIN ** 2)

# What the seed reports at its switch-on: the share of pixels whose s (its units) lies below each version's eps, on
# SWITCH_ON_IMAGES images.
BELOW_AT_SWITCH_ON = {V23.eps: 0.003, V24.eps: 0.283}
SWITCH_ON_IMAGES = 8

# The seed's two datasets, 2D synthetic shapes (geodiag regenerates them: ``geodiag make-dataset``): what each
# image shows.
DATASETS = {501: "2–5 circles", 502: "one circle"}

# The run it trained: image side, batch size, iterations per epoch, epochs, and the warm-up that ran (epochs of
# Dice+CE alone before the geometric term switches on). Its trainer's source said WARMUP_INTENDED; a stale copy of
# that trainer in site-packages, with WARMUP, is what nnU-Net found.
IMAGE_SIZE = 512
BATCH_SIZE = 8
ITERATIONS = 250
EPOCHS = 100
WARMUP = 5
WARMUP_INTENDED = 20
# Its train_step: clip_grad_norm_(params, CLIP_NORM) (nnU-Net's own bound), the loss fed the first LOSS_SAMPLES
# samples of each batch.
CLIP_NORM = 12
LOSS_SAMPLES = 4
