"""The one exception type whose message is shown to a user as-is: bad input, not a bug; and its variant that names
the library function's arguments, so the CLI can say which of its flags was wrong."""
from __future__ import annotations

import re


class GeodiagError(Exception):
    """A problem with what the user asked for; the CLI prints its message on one line and exits 2."""


class ArgumentError(GeodiagError):
    """Bad input whose message names the function's arguments as ``{name}`` placeholders (listed in ``arguments``).

    ``str()`` spells each by its parameter name (``out``) for a library caller; the CLI spells it as its flag
    (``--out``) with ``spelled``. Library code thus never tells a notebook user to "pass --resume".
    """

    def __init__(self, template: str, *arguments: str) -> None:
        self.template, self.arguments = template, arguments
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell) -> str:
        """The message with each ``{argument}`` replaced by ``spell(argument)``."""
        names = "|".join(map(re.escape, self.arguments)) or r"(?!)"
        return re.sub(r"\{(" + names + r")\}", lambda match: spell(match.group(1)), self.template)
