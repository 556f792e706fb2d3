"""FGFP: Fractional Gaussian Filters (FGF) + Adaptive Unstructured Pruning (AUP).

`prepare` turns the chosen convolutions into FGF layers (`compress.layers.fgf`: 7 or 8 numbers per output
channel generate each kernel), fitted to their pretrained kernels; the rounds (`step`) are AUP's, on the
remaining ordinary conv / linear weights. FGFP composes the two: the conversion here, the rounds by an
`AUP` it holds. Persistence is AUP's (`pruning_meta` / `restore_pruning`: FGF layers and masks), so a
model.pt of either method reloads through either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

from torch import nn
from torch.nn.utils import parametrize

from compress import CompressError
from compress.checks import is_count, is_number
from compress.layers import fgf
from compress.methods.aup import AUP, AUPOptions, globs, matches, pruning_meta, restore_pruning
from compress.methods.base import Context, Method

# Bounds on what the options make us build: the GL sum's length (a tensor dimension) and the fit's
# restarts (copies of every kernel). Far beyond useful values (15 terms, 3 restarts).
MAX_TERMS = 100
MAX_RESTARTS = 16


def select_layers(model: nn.Module, layers: Any) -> list[str]:
    """Names of the Conv2d layers to convert: those matching glob pattern(s), or (int N) the N convs with
    the most input channels, ties going to the deeper layer (the paper converts deep, wide layers)."""
    # Layers that are FGFs already (a model.pt from an earlier FGFP run) are not converted again.
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not parametrize.is_parametrized(m, "weight")]
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 < layers <= len(convs):
            raise CompressError(f"method.layers: {layers} layers asked for, the model has {len(convs)} convolutions")
        ranked = sorted(enumerate(convs), key=lambda ic: (ic[1][1].in_channels, ic[0]), reverse=True)
        chosen = {name for _, (name, _) in ranked[:layers]}
        return [name for name, _ in convs if name in chosen]
    patterns = globs(layers)
    chosen = [name for name, _ in convs if matches(name, patterns)]
    if not chosen:
        raise CompressError(f"method.layers: {patterns} matches no Conv2d layer")
    return chosen


@dataclass
class FGFPOptions(AUPOptions):
    """FGFP: Fractional Gaussian Filters (chosen convs become 7-parameter-per-output-channel generated
    kernels, fitted to the pretrained ones in `prepare`), then AUP rounds on the remaining conv / linear
    weights: AUP's options (pr, prune_layers, keep_layers) plus the FGF ones below. See docs/fgfp.md."""

    name: str = "fgfp"
    # which convs become FGFs: glob pattern(s) over module names, or N = the N convs with the most input channels
    layers: Any = 6
    # Grunwald-Letnikov terms L
    terms: int = 15
    # Grunwald-Letnikov step h (in grid units)
    step: float = 0.25
    # sample positions: pixel (integer offsets, channel index too) | unit (every axis on [-1, 1])
    grid: str = "pixel"
    # a per-output-channel gain (8 parameters per channel instead of 7)
    amplitude: bool = True
    # Adam steps fitting each FGF layer to its pretrained kernel (batched over output channels)
    fit_steps: int = 100
    fit_lr: float = 0.05
    # restarts: initial a = b = c; each channel keeps its best
    fit_init_orders: List[float] = field(default_factory=lambda: [0.25, 1.0, 1.75])
    # AUP's options (above, inherited) prune the remaining ordinary conv / linear weights in the rounds;
    # prune_layers: [] = the FGF conversion alone (the rounds end at once).

    def __post_init__(self) -> None:
        super().__post_init__()


        def positive(v: Any) -> bool:
            return is_number(v) and v > 0

        layers, orders = self.layers, self.fit_init_orders
        self.check(is_count(layers) or isinstance(layers, str) or isinstance(layers, (list, tuple))
              and len(layers) > 0 and all(isinstance(v, str) for v in layers),
              "layers", "a number of layers >= 1, a glob pattern or a list of them")
        self.check(is_count(self.terms, 1, MAX_TERMS), "terms", f"an integer in [1, {MAX_TERMS}]")
        self.check(positive(self.step), "step", "a finite number > 0")
        self.check(self.grid in fgf.GRIDS, "grid", f"one of {', '.join(fgf.GRIDS)}")
        self.check(isinstance(self.amplitude, bool), "amplitude", "true or false")
        self.check(is_count(self.fit_steps, 0), "fit_steps", "an integer >= 0")
        self.check(positive(self.fit_lr), "fit_lr", "a finite number > 0")
        self.check(isinstance(orders, (list, tuple)) and 1 <= len(orders) <= MAX_RESTARTS
              and all(positive(o) and o < 2 for o in orders), "fit_init_orders", f"1 to {MAX_RESTARTS} orders in (0, 2)")


class FGFP(Method):
    """FGF conversion of the chosen layers (`prepare`), then AUP rounds on the remaining weights (`step`)."""

    name = "fgfp"
    Options = FGFPOptions
    one_shot = False
    iterative = True
    # Without rounds FGFP would be the conversion alone, half the method: the pipeline asks for rounds.
    requires_rounds = True
    changes_model = True
    recipe = "fgfp_cifar"

    def __init__(self, options: FGFPOptions | None = None):
        super().__init__(options)
        o = self.options
        self.spec = {"terms": o.terms, "step": float(o.step), "grid": o.grid, "amplitude": o.amplitude}
        self.rounds = AUP(AUPOptions(pr=o.pr, prune_layers=o.prune_layers, keep_layers=o.keep_layers))

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        o = self.options
        names = select_layers(model, o.layers)
        before = sum(p.numel() for p in model.parameters())
        fit_steps = min(o.fit_steps, 2) if ctx.quick else o.fit_steps
        errors = fgf.convert(model, names, self.spec, fit_steps, float(o.fit_lr), [float(v) for v in o.fit_init_orders])
        after = sum(p.numel() for p in model.parameters())
        for name, err in errors.items():
            ctx.log.info("fgfp: %s -> FGF, relative fit error %.3f", name, err)
        ctx.log.info("fgfp: %d layers converted, parameters %d -> %d", len(names), before, after)
        return model

    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        if not self.rounds.prune_layers:
            ctx.log.info("fgfp: method.prune_layers is empty: FGF conversion only, no pruning rounds")
            return None
        return self.rounds.step(model, ctx, round_index, step_scale)

    def meta(self, model: nn.Module) -> dict:
        return pruning_meta(model)

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict) -> nn.Module:
        return restore_pruning(model, meta, state_dict)

    def storage_bytes(self, model: nn.Module) -> int | None:
        return self.rounds.storage_bytes(model)
