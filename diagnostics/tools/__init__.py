"""The analyses a user runs: analyze (one checkpoint's gradients), sweep (stabiliser settings), check-bounds
(gradient bounds against geometry and a stored baseline, the ``bounds`` package) and bench (what the instruments
cost: ``bench`` the runner and table, one ``bench_*`` module per benchmark family); ``verdict`` is what an analysis
concludes, ``run_record`` the output folder of a resumable run.

Each is a library function a test or a notebook can call. May import ``instruments``, ``nonfinite``, ``nnunet``,
``geodiag.losses`` and ``geodiag.reports``; never ``cli`` (errors name arguments; the CLI maps them to flags).
"""
