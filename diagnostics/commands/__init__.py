"""Thin argparse adapters, one module per ``geodiag`` subcommand; the work lives in the diagnostics modules."""
