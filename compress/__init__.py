"""compress: frequency-domain and functional compression of convolutional networks."""

import os

# Set before torch loads OpenMP (when compress is imported first): spinning worker threads turn CPU
# oversubscription (two runs, or a run beside tests, on a small machine) into a tenfold slowdown.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


class CompressError(Exception):
    """A user-facing error: printed as one line by the CLI, exit status 2."""
