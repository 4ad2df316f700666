"""Geometric (shape-prior) losses for segmentation, numerically safe by construction; torch only."""
from .geometric_loss import GEOMETRIC_TERMS, GeometricLoss
from .presets import PRESETS, preset_kwargs
from .stabilizers import STABILIZERS, SqrtStabilizer, StabilizersPerImage
from .taps import Tap, Tappable

__all__ = ["GEOMETRIC_TERMS", "GeometricLoss", "PRESETS", "preset_kwargs", "STABILIZERS", "SqrtStabilizer",
           "StabilizersPerImage", "Tap", "Tappable"]
