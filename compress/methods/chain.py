"""`method=chain`: several one-shot methods applied one after another to the same model, e.g. CFDP channel
pruning, then ApproxConv kernels, then 8-bit quantisation:

    compress run method=chain 'method.steps=[{name: cfdp}, {name: approxconv, harmonics: [3,3,3,2]}, {name: quant, bits: 8}]'

Each step is a map: the method's `name` and any of its options (checked as `method.steps[i].<key>`). The
pipeline records a row per step (stage `step_<i>_<method>`, resumable one by one), then the `compressed`
row and the fine-tune. `model.pt` reloads the result: its meta lists each step's own meta, taken right
after that step, and `restore` replays them in order. The storage size is the last step's own format
(a quantised model's packed bytes), which reflects every step before it (the smaller, series-coded model).

The registry of methods is handed in by `compress.methods` (`use_catalogue`), so this module imports none.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, List

import torch
from torch import nn

from compress import CompressError
from compress.methods.base import Context, Method, MethodOptions

MAX_STEPS = 16
_CATALOGUE: dict[str, type[Method]] = {}


def use_catalogue(methods: dict[str, type[Method]]) -> None:
    """The methods a chain may name (called once by compress.methods with its registry)."""
    _CATALOGUE.clear()
    _CATALOGUE.update(methods)


def _step_options(index: int, step: Any) -> MethodOptions:
    """One step's map as that method's checked options; errors name `method.steps[<index>].<key>`."""
    key = f"method.steps[{index}]"
    if not isinstance(step, dict) or not isinstance(step.get("name"), str):
        raise CompressError(f"{key}: must be a map with the method's name, e.g. {{name: cfdp}}, got {str(step)[:80]!r}")
    name = step["name"]
    cls = _CATALOGUE.get(name)
    if cls is None:
        raise CompressError(f"{key}.name: unknown method {name[:60]!r} (known: {', '.join(sorted(_CATALOGUE))})")
    if name == Chain.name or not cls.one_shot or cls.requires_rounds:
        raise CompressError(f"{key}.name: '{name}' cannot be a step (a step is a one-shot method; "
                            f"{'chains do not nest' if name == Chain.name else 'it works in rounds'})")
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(str(k) for k in step if k not in known)
    if unknown:
        raise CompressError(f"{key}.{unknown[0][:60]}: not an option of method '{name}'")
    try:
        return cls.Options(**step)
    except CompressError as e:
        message = str(e)
        raise CompressError(f"{key}.{message[len('method.'):]}" if message.startswith("method.")
                            else f"{key}: {message}") from None


@dataclass
class ChainOptions(MethodOptions):
    """`method=chain`: one-shot methods applied in order (`steps`: a list of maps, each `{name: <method>,
    <option>: <value>...}`), a row per step. See compress/methods/chain.py."""

    name: str = "chain"
    steps: List[Any] = field(default_factory=lambda: [{"name": "cfdp"}, {"name": "quant", "bits": 8}])

    def __post_init__(self) -> None:
        self.check(isinstance(self.steps, (list, tuple)) and 1 <= len(self.steps) <= MAX_STEPS, "steps",
                   f"a list of 1 to {MAX_STEPS} maps, e.g. [{{name: cfdp}}, {{name: quant, bits: 8}}]")
        # Not a field: each step's checked options, built here so that a bad step fails before any work.
        self.step_options = [_step_options(i, dict(step) if isinstance(step, dict) else step)
                             for i, step in enumerate(self.steps)]


class Chain(Method):
    """Apply `steps` one after another; each is one of the pipeline's `parts` (a row each)."""

    name = "chain"
    Options = ChainOptions
    one_shot = True
    changes_model = True

    def __init__(self, options: ChainOptions | None = None):
        super().__init__(options)
        self.steps = [_CATALOGUE[o.name](o) for o in self.options.step_options]
        self.metas: list[dict] = []  # per applied step: {"method", "meta"} taken right after it

    def parts(self) -> list[str]:
        return [step.name for step in self.steps]

    def compress_part(self, index: int, model: nn.Module, ctx: Context) -> nn.Module:
        if index != len(self.metas):
            raise CompressError(f"method.steps: step {index} asked for after {len(self.metas)} steps")
        step = self.steps[index]
        ctx.log.info("chain step %d/%d: %s", index + 1, len(self.steps), step.name)
        model = step.compress(model, ctx)
        self.metas.append({"method": step.name, "meta": copy.deepcopy(step.meta(model))})
        return model

    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        for index in range(len(self.metas), len(self.steps)):
            model = self.compress_part(index, model, ctx)
        return model

    def state_dict(self) -> dict:
        return {"metas": copy.deepcopy(self.metas)}

    def load_state_dict(self, state: dict) -> None:
        self.metas = copy.deepcopy(list(state.get("metas", [])))

    def meta(self, model: nn.Module) -> dict:
        return {"steps": copy.deepcopy(self.metas)}

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        for step in meta.get("steps", []):
            method = _CATALOGUE.get(step.get("method"))
            if method is None:
                raise CompressError(f"arch.checkpoint: the chain's step {step.get('method')!r} is not a known method")
            model = method.restore(model, step.get("meta") or {}, state_dict)
        return model

    def storage_bytes(self, model: nn.Module) -> int | None:
        for step in reversed(self.steps[:len(self.metas)]):
            size = step.storage_bytes(model)
            if size is not None:
                return size
        return None
