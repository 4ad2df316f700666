"""The one exception type whose message is shown to a user as-is: bad input, not a bug."""


class GeodiagError(Exception):
    """A problem with what the user asked for; the CLI prints its message on one line and exits 2."""
