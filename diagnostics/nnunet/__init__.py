"""Everything that knows nnU-Net: checkpoint loading, cases and training patches, plans, the environment and the
`doctor` checks, synthetic datasets, and the trainer wrapper that records a training run (monitor), and
`geodiag watch` (any trainer nnU-Net resolves, guarded and recorded; the first non-finite step saved, replayed and
explained).

The only room that imports nnunetv2 (besides geodiag.losses' trainer module). May import
``geodiag.losses``, ``geodiag.reports`` (tables and writers), ``instruments`` and ``nonfinite``; never ``tools``,
``study`` or ``cli``. The discovery shim nnU-Net imports by top-level name stays in ``diagnostics/nnunet_ext/``,
the folder ``geodiag env`` puts on nnUNet_extTrainer.
"""
