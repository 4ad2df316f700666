"""Discovery shim: nnU-Net imports this folder's modules by top-level name (nnUNet_extTrainer), so only absolute imports."""
from geodiag.diagnostics.nnunet.watched_trainers import (  # noqa: F401 - re-exported for nnU-Net's trainer lookup
    nnUNetTrainerGeometricMonitored,
    nnUNetTrainerGeometricMonitoredQuick,
)
