"""Discovery shim: nnU-Net imports this folder's modules by top-level name (nnUNet_extTrainer), so only absolute imports."""
from geodiag.losses.nnunet.trainer import (  # noqa: F401 - re-exported for nnU-Net's trainer lookup
    nnUNetTrainerGeometric,
    nnUNetTrainerGeometricQuick,
    nnUNetTrainerGeometricV23,
    nnUNetTrainerGeometricV23Quick,
    nnUNetTrainerGeometricV24,
    nnUNetTrainerGeometricV24Quick,
)
