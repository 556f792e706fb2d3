"""The `Context` a method gets from the pipeline, built directly for unit tests on tiny CPU models."""
from __future__ import annotations

import torch

from compress.methods.base import Context


def cpu_context(arch: str = "tiny", num_classes: int = 4, size: int = 8, **fields) -> Context:
    """A CPU Context for `arch` with (3, size, size) inputs; `fields` sets the others (calibration, seed...)."""
    return Context(device=torch.device("cpu"), arch=arch, num_classes=num_classes, input_shape=(3, size, size), **fields)
