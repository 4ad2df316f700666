"""Where a NaN or Inf comes from: provenance, replay and automatic taps; torch only, never nnunetv2.

``provenance`` names the first op that produced a non-finite value (its findings are ``provenance_report``'s types);
``replay`` re-runs a failing step (a trainer's ``train_step`` or any step function) to tell maths from precision from
the GradScaler; ``loss_spec`` loads a user's loss from the SPEC they typed; ``sites`` names a call by the user's source
line; ``autotaps`` measures the numerically risky calls of any loss while it runs (``autotap_result`` ranks what it
found); ``override`` changes a clamp bound or a sqrt's added constant at a chosen line without editing the user's
file. May import torch, ``geodiag.diagnostics.instruments``,
``geodiag.losses`` (torch only) and ``geodiag.reports.schema``; never nnunetv2, the rest of geodiag.reports or the other rooms.
"""
