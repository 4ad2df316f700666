"""Pipelines that chain the tools end to end on synthetic data: the study, `geodiag demo` and the reference study.

May import every room except ``cli``, and ``geodiag.reports`` for the final report.
"""
