"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class SpectralDiffusionError(Exception):
    """A bad input or a refused operation, explained in one line; never a bug."""
