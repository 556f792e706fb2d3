"""The contract between the pipeline and a compression method.

The pipeline builds a method from the `method` config group (every key but `name` becomes a keyword
argument), hands it a model and a `Context`, and measures whatever comes back. A method never reads
files or configs; the pipeline never looks inside a method.

One-shot methods implement `compress`. Methods that can work in rounds (the iterative schedule:
compress a step, fine-tune, validate, roll back below a threshold) implement `step`. Methods that change
the model's structure implement `meta` and `restore` so that `model.pt` reloads into the compressed form.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from compress import CompressError


@dataclass
class Context:
    """What a method may use besides the model: all of it prepared by the pipeline."""

    device: torch.device
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("compress"))
    # calibration(batches, batch_size) -> iterator over normalised image batches from the training split
    # (no augmentation unless `augment=True`), already on `device`. Deterministic for a given seed.
    calibration: Callable[..., Iterator[torch.Tensor]] | None = None
    # evaluate(model) -> validation top-1 in percent; for methods that decide by accuracy.
    evaluate: Callable[[nn.Module], float] | None = None
    # Smoke runs: a method may cut its own optimisation budgets (kernel fits, autoencoder training) to a
    # token amount, so that every config can be exercised end to end in seconds.
    quick: bool = False

    def calibration_batches(self, batches: int, batch_size: int, augment: bool = False) -> Iterator[torch.Tensor]:
        if self.calibration is None:
            raise CompressError("this method needs calibration data, but the pipeline gave none")
        return self.calibration(batches, batch_size, augment=augment)


class Method:
    """Base class: `method=none` is this class unchanged (evaluate and fine-tune only)."""

    name = "none"
    # True when the method only makes sense in rounds (AUP); the pipeline then requires schedule.rounds > 0.
    requires_rounds = False

    def __init__(self, **params: Any):
        if params:
            raise CompressError(f"method.{next(iter(params))}: not an option of method '{self.name}'")

    # -- one-shot ---------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Compress once; may modify `model` in place and return it, or return a new module."""
        return model

    # -- iterative schedule -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Before the first round of an iterative schedule (e.g. convert layers); measured as the
        `compressed` row. Default: unchanged."""
        return model

    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        """One round's compression step. `step_scale` starts at 1 and shrinks after rollbacks.

        Return None when there is nothing left to compress (the schedule then stops).
        """
        raise CompressError(f"method '{self.name}' has no iterative step; set schedule.rounds=0")

    def state_dict(self) -> dict:
        """Plain-data state the method carries between rounds (saved for resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- persistence ------------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        """Plain data (str/int/float/list/dict) that `restore` needs to rebuild the compressed structure."""
        return {}

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """Turn a freshly built model into the structure whose parameters `state_dict` holds."""
        return model

    # -- deployment and measurement --------------------------------------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """The plain deployable model (e.g. kernels baked from coefficients). Default: unchanged."""
        return model

    def storage_bytes(self, model: nn.Module) -> int | None:
        """Bytes to store the compressed model if it differs from the dense fp32 serialisation
        (sparse or quantised forms); None means use the serialised size."""
        return None
