"""The analyses a user runs: analyze (one checkpoint's gradients), sweep (stabiliser settings), check-bounds
(gradient bounds against geometry and a stored baseline) and bench (what the instruments cost).

Each is a library function a test or a notebook can call. May import ``instruments``, ``nonfinite``, ``nnunet``,
``geodiag.losses`` and ``geodiag.reports``; never ``cli`` (errors name arguments; the CLI maps them to flags).
"""
