"""Diagnostics for geometric losses, in rooms that build on each other (each ``__init__`` says what it may import):

``instruments`` (device-side measurement, torch only) and ``nonfinite`` (NaN/Inf provenance and replay, torch only);
``nnunet`` (everything that knows nnU-Net); ``tools`` (analyze, sweep, check-bounds, bench); ``study`` (end-to-end
pipelines); ``cli`` (the ``geodiag`` command). ``progress`` (terminal progress, shared by tools, study and cli) and
``testing`` (the public ``assert_gradient_bounds``) stay at the top. Importing this package imports nothing.
"""
