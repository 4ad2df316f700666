"""Instruments: what is measured on the device while a loss or a training step runs, without host syncs.

Log-binned histograms (``histogram_bins`` the counting definition, ``histograms`` the accumulator), the hook
recorder, the training-state recorder, host-sync detection, devices and precisions, and geodiag's one user-facing
error type. Torch only: never imports nnunetv2, geodiag.reports (except its standard-library ``schema``, where the
fp16 limits live once) or another room of geodiag.diagnostics; from ``geodiag.losses`` (torch only) it takes the
finiteness scan and rot rule the trainer guard shares, so every other room can build on these.
"""
