"""The contract between the pipeline and a compression method.

A method is a class with a typed options dataclass (`Options`, a subclass of `MethodOptions`). The
pipeline builds the options from the `method` config group (Hydra checks every key's type against the
dataclass; `__post_init__` checks ranges and raises `CompressError("method.<key>: ...")`), constructs the
method with them — every constructor has the same shape, `Method(options)` — hands it a model and a
`Context`, and measures whatever comes back. A method never reads files or configs; the pipeline never
looks inside a method: it reads the declared capabilities below.

Capabilities:
    one_shot       implements `compress` (schedule.rounds = 0)
    iterative      implements `prepare` / `step` (schedule.rounds > 0: compress a step, fine-tune,
                   validate, roll back below a threshold)
    requires_rounds  only meaningful in rounds (AUP): the pipeline refuses rounds = 0 with a one-line hint
    changes_model  `compress` / `prepare` change the model (False: the `compressed` row repeats the
                   baseline's numbers instead of measuring again)
    parts()        a one-shot method made of several (method=chain) lists them: a row and a resume
                   point each (`compress_part`)

Methods that change the model's structure implement `meta` and `restore` so that `model.pt` reloads into
the compressed form. Reparameterised layers (generated kernels, masks, fake quantisation) live in
`compress.layers` and bake themselves; `compress.layers.deployable` turns any model into plain modules.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
from torch import nn

from compress import CompressError, checks
from compress.checks import require


@dataclass
class MethodOptions:
    """The options of `method=none`; every method's options dataclass subclasses this one.

    Field defaults are the one place a default lives (no YAML repeats them). Types are what Hydra checks
    on an override; `__post_init__` checks ranges (raise `CompressError("method.<key>: ...")`).
    """

    name: str = "none"

    # The one way an option is checked in `__post_init__` (compress.checks, with the `method.` prefix): each
    # raises one line naming `method.<key>` and its value.
    def check(self, ok: bool, key: str, expected: str) -> None:
        """A bespoke condition: unless `ok`, "method.<key>: must be <expected>, got <value>"."""
        require(ok, f"method.{key}", expected, getattr(self, key))

    def count(self, key: str, low: int = 1, high: int = checks.MAX_COUNT, allow_none: bool = False) -> None:
        """An integer in [low, high]."""
        checks.int_in(f"method.{key}", getattr(self, key), low, high, allow_none)

    def number(self, key: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
               allow_none: bool = False) -> None:
        """A finite number in the interval (closed unless `low_open` / `high_open`)."""
        checks.number_in(f"method.{key}", getattr(self, key), low, high, low_open=low_open, high_open=high_open,
                         allow_none=allow_none)

    def choice(self, key: str, choices: tuple[str, ...]) -> None:
        checks.require_choice(getattr(self, key), f"method.{key}", tuple(choices))

    def flag(self, key: str) -> None:
        checks.flag(f"method.{key}", getattr(self, key))


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

    name: ClassVar[str] = "none"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    # Declared capabilities (see the module docstring); the pipeline reads these, nothing else.
    one_shot: ClassVar[bool] = True
    iterative: ClassVar[bool] = False
    requires_rounds: ClassVar[bool] = False
    changes_model: ClassVar[bool] = False
    # The schedule option that runs this method as intended (named in the hint when rounds are required).
    recipe: ClassVar[str | None] = None

    def __init__(self, options: MethodOptions | None = None):
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(self.options).__name__}")

    # -- one-shot ---------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Compress once; may modify `model` in place and return it, or return a new module."""
        return model

    # -- parts: a one-shot method made of several (method=chain) ------------------------------------------
    def parts(self) -> list[str]:
        """Labels of the parts `compress` is made of, when each should get its own row and resume point (the
        pipeline then calls `compress_part(i, ...)` for each in turn instead of `compress`). [] = one step."""
        return []

    def compress_part(self, index: int, model: nn.Module, ctx: Context) -> nn.Module:
        """Part `index` of `compress` (see `parts`); the method's state_dict records which parts are done."""
        raise CompressError(f"method '{self.name}' is not made of parts")

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

    def round_epochs(self, scheduled: int) -> int:
        """Fine-tuning epochs for the round just stepped (asked after `step`, before the round's fine-tune).
        Default: `scheduled`, the schedule's round_epochs; a method whose steps differ in how much they take
        away (FGFP: a conversion re-initialises a layer, a pruning step removes a few weights) may ask for
        more after some of them."""
        return scheduled

    def state_dict(self) -> dict:
        """Plain-data state the method carries between rounds (saved for resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rolled_back(self, state: dict) -> bool:
        """The round just stepped fell under the threshold: the pipeline has restored the model and hands back
        `state`, this method's state_dict() from before the step. Return whether the next step should be
        smaller (the pipeline then applies schedule.on_rollback's shrink); False when a smaller step means
        nothing for what was rolled back."""
        self.load_state_dict(state)
        return True

    # -- persistence ------------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        """Plain data (str/int/float/list/dict) that `restore` needs to rebuild the compressed structure."""
        return {}

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """Turn a freshly built model into the structure whose parameters `state_dict` holds."""
        return model

    # -- measurement ------------------------------------------------------------------------------------
    def storage_bytes(self, model: nn.Module) -> int | None:
        """Bytes to store the compressed model if it differs from the dense fp32 serialisation
        (sparse or quantised forms); None means use the serialised size."""
        return None
