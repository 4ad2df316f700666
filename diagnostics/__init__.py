"""Diagnostics for geometric losses: recording, NaN provenance, checkpoint analysis, sweeps and the CLI."""
