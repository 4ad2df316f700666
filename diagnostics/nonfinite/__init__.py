"""Where a NaN or Inf comes from: provenance, replay and automatic taps; torch only, never nnunetv2.

``provenance`` names the first op that produced a non-finite value; ``replay`` re-runs a recorded batch to tell
maths from fp16 overflow; ``loss_spec`` loads a user's loss from the SPEC they typed; ``sites`` names a call by the
user's source line; ``autotaps`` measures the numerically risky calls of any loss while it runs; ``override``
changes a clamp bound or a sqrt's added constant at a chosen line without editing the user's file.
May import torch, ``geodiag.diagnostics.instruments`` and ``geodiag.reports.schema``; never nnunetv2, the rest of
geodiag.reports or the other rooms.
"""
