"""Data sets as in-memory splits that yield normalised, augmented batches on the training device.

`load(...)` returns a `Data` bundle with `train`, `val` (held out of the training set; every decision
uses it) and `test` (only reported).
"""
from compress.data.base import Data, Split, TensorSplit
from compress.data.build import load

__all__ = ["Data", "Split", "TensorSplit", "load"]
