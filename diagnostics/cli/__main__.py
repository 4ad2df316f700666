"""``python -m geodiag.diagnostics.cli``: the ``geodiag`` command."""
import sys

from geodiag.diagnostics.cli import main

sys.exit(main())
