"""compress: frequency-domain and functional compression of convolutional networks."""

__version__ = "0.1.0"


class CompressError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 2."""
