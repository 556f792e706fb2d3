"""FGFP: Fractional Gaussian Filters (FGF) + Adaptive Unstructured Pruning (AUP).

The chosen convolutions become FGF layers (`compress.layers.fgf`: 7 numbers per output channel, 8 with
`amplitude`, generate each kernel), fitted to their pretrained kernels; then AUP's rounds prune the
remaining ordinary conv / linear weights. FGFP composes the two: the conversion here, the pruning by an
`AUP` it holds. Persistence is AUP's (`pruning_meta` / `restore_pruning`: FGF layers and masks, read
from the model itself), so a model.pt of either method, partly converted or not, reloads through either.

`convert` says when the layers are converted:

- `one_by_one` (default): `prepare` only chooses the layers and their order (largest first: most
  weights, ties to the deeper layer) and changes nothing; each round's `step` converts the next one, so
  the pipeline's round fine-tune is that layer's recovery and the round's threshold and rollback judge
  it. A conversion round that is rolled back leaves its layer an ordinary conv for good (AUP prunes it
  later) and the next round converts the next layer. Once every layer is converted or left ordinary,
  the steps are AUP rounds.
- `all`: `prepare` converts every chosen layer at once (schedule.prepare_epochs recovers), every step is
  an AUP round.

The progress (the order, which layers are converted, which were left ordinary) is the method's
`state_dict`, so the pipeline's rollback and resume restore it with the model.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress import CompressError
from compress.checks import is_count, is_number
from compress.layers import fgf
from compress.methods.aup import AUP, AUPOptions, pruning_meta, restore_pruning
from compress.methods.base import Context, Method
from compress.models.introspect import globs, matches
from compress.prune.features import run_hooked

log = logging.getLogger("compress")

# Bounds on what the options make us build: the GL sum's length (a tensor dimension) and the fit's
# restarts (copies of every kernel). Far beyond useful values (15 terms, 3 restarts).
MAX_TERMS = 100
MAX_RESTARTS = 16
CONVERT = ("one_by_one", "all")
# one_by_one's order: the largest layer first, or as `layers` lists them (a sensitivity order measured first)
ORDERS = ("largest", "listed")
FITS = ("weights", "outputs")
# fit=outputs keeps one layer's inputs and outputs on the calibration images in memory: at most this many
# numbers (512 MB of fp32), fewer images if a layer's maps are large (ImageNet's early stages).
MAX_FIT_NUMBERS = 2 ** 27


def is_strided(conv: nn.Conv2d) -> bool:
    """A conv that changes the resolution (stride > 1 on some axis): where a stage starts, or its shortcut."""
    return any(s > 1 for s in conv.stride)


def select_layers(model: nn.Module, layers: Any, skip_strided: bool = False) -> list[str]:
    """Names of the Conv2d layers to convert, in module order: those matching glob pattern(s), or (int N)
    the N convs with the most input channels, ties going to the deeper layer (the paper converts deep,
    wide layers). `skip_strided`: strided convs (stride > 1) are never candidates."""
    # Layers that are FGFs already (a model.pt from an earlier FGFP run) are not converted again.
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not parametrize.is_parametrized(m, "weight")]
    strided = [name for name, m in convs if is_strided(m)] if skip_strided else []
    convs = [(name, m) for name, m in convs if name not in strided]
    why = f" (method.skip_strided leaves out the {len(strided)} strided ones)" if strided else ""
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 0 < layers <= len(convs):
            raise CompressError(f"method.layers: {layers} layers asked for, the model has {len(convs)} "
                                f"convolutions{why}")
        ranked = sorted(enumerate(convs), key=lambda ic: (ic[1][1].in_channels, ic[0]), reverse=True)
        chosen = {name for _, (name, _) in ranked[:layers]}
        return [name for name, _ in convs if name in chosen]
    patterns = globs(layers)
    chosen = [name for name, _ in convs if matches(name, patterns)]
    if not chosen:
        raise CompressError(f"method.layers: {patterns} matches no Conv2d layer{why}")
    return chosen


def conversion_order(model: nn.Module, names: list[str]) -> list[str]:
    """`names` largest layer first (most weights; ties: the deeper layer first), the one-by-one order."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules = dict(model.named_modules())
    return sorted(names, key=lambda n: (modules[n].weight.numel(), position[n]), reverse=True)


def listed_order(names: list[str], layers: Any) -> list[str]:
    """`names` (in module order) in the order the `layers` patterns list them: the first pattern's matches
    first, each pattern's matches in module order (`order: listed`)."""
    patterns = globs(layers)
    return sorted(names, key=lambda n: next(i for i, p in enumerate(patterns) if matches(n, [p])))


@dataclass
class FGFPOptions(AUPOptions):
    """FGFP: Fractional Gaussian Filters (chosen convs become generated kernels of 7 parameters per output
    channel, fitted to the pretrained ones; by default one layer per round, largest first), then AUP rounds
    on the remaining conv / linear weights: AUP's options (pr, prune_layers, keep_layers) plus the FGF
    ones below. See docs/fgfp.md."""

    name: str = "fgfp"
    # which convs become FGFs: glob pattern(s) over module names, or N = the N convs with the most input
    # channels (ResNet-20: 5 = stage 3's stride-1 convs)
    layers: Any = 5
    # leave the convs with stride > 1 ordinary (where a stage changes resolution, and strided shortcuts)
    skip_strided: bool = True
    # one_by_one: one layer per round (largest first), each judged by the round's threshold; all: every
    # layer in prepare
    convert: str = "one_by_one"
    # one_by_one's order: largest (most weights first) | listed (as `layers` lists its patterns, e.g. the
    # layers that lose least when converted alone, first)
    order: str = "largest"
    # one_by_one: fine-tuning epochs of a conversion round (null: the schedule's round_epochs, as a pruning
    # round); a conversion re-initialises a layer and may need a longer recovery than a pruning step
    convert_epochs: Optional[int] = None
    # Grunwald-Letnikov terms L
    terms: int = 15
    # Grunwald-Letnikov step h (in grid units)
    step: float = 0.25
    # sample positions: pixel (integer offsets, channel index too) | unit (every axis on [-1, 1])
    grid: str = "pixel"
    # a per-output-channel gain (8 parameters per channel instead of the paper's 7; a following BatchNorm
    # absorbs the gain anyway)
    amplitude: bool = False
    # Adam steps fitting each FGF layer to its pretrained kernel (batched over output channels)
    fit_steps: int = 100
    fit_lr: float = 0.05
    # restarts: initial a = b = c; each channel keeps its best
    fit_init_orders: List[float] = field(default_factory=lambda: [0.25, 1.0, 1.75])
    # weights: the fit above alone; outputs: then refine each converted layer so that its outputs on
    # calibration images follow the pretrained layer's, channel by channel up to scale and shift
    fit: str = "weights"
    # fit=outputs: training images (no augmentation) whose layer inputs are fitted, Adam steps, learning rate
    output_fit_images: int = 1024
    output_fit_steps: int = 300
    output_fit_lr: float = 0.02
    # AUP's options (above, inherited) prune the remaining ordinary conv / linear weights in the rounds;
    # prune_layers: [] = the FGF conversion alone (the rounds end once every layer is converted).

    def __post_init__(self) -> None:
        super().__post_init__()

        def positive(v: Any) -> bool:
            return is_number(v) and v > 0

        layers, orders = self.layers, self.fit_init_orders
        self.check(is_count(layers) or isinstance(layers, str) or isinstance(layers, (list, tuple))
              and len(layers) > 0 and all(isinstance(v, str) for v in layers),
              "layers", "a number of layers >= 1, a glob pattern or a list of them")
        self.flag("skip_strided")
        self.choice("convert", CONVERT)
        self.choice("order", ORDERS)
        self.check(self.order != "listed" or not is_count(layers), "order",
                   f"'largest' while method.layers is a count ({layers}): 'listed' follows the order of "
                   "method.layers' patterns")
        self.count("convert_epochs", allow_none=True)
        self.count("terms", 1, MAX_TERMS)
        self.number("step", 0, 1e3, low_open=True)
        self.choice("grid", fgf.GRIDS)
        self.flag("amplitude")
        self.count("fit_steps", 0)
        self.choice("fit", FITS)
        self.count("output_fit_images")
        self.count("output_fit_steps", 0)
        self.number("output_fit_lr", 0, 1e3, low_open=True)
        self.number("fit_lr", 0, 1e3, low_open=True)
        self.check(isinstance(orders, (list, tuple)) and 1 <= len(orders) <= MAX_RESTARTS
              and all(positive(o) and o < 2 for o in orders), "fit_init_orders", f"1 to {MAX_RESTARTS} orders in (0, 2)")


def fresh_state() -> dict:
    """The method's round state (plain data, saved in state.pt for resume):

    order       the layers to convert, in conversion order (None until `prepare` or the first step)
    converted   those converted so far
    skipped     those whose conversion round was rolled back: they stay ordinary convs (AUP prunes them)
    """
    return {"order": None, "converted": [], "skipped": []}


class FGFP(Method):
    """FGF conversion of the chosen layers (all in `prepare`, or one per round, largest first), then AUP
    rounds on the remaining weights (`step`)."""

    name = "fgfp"
    Options = FGFPOptions
    one_shot = False
    iterative = True
    # Without rounds FGFP would be the conversion alone, half the method: the pipeline asks for rounds.
    requires_rounds = True
    changes_model = True  # per instance: False with convert=one_by_one, whose `prepare` changes nothing
    recipe = "fgfp_cifar"

    def __init__(self, options: FGFPOptions | None = None):
        super().__init__(options)
        o = self.options
        self.changes_model = o.convert == "all"
        self.spec = {"terms": o.terms, "step": float(o.step), "grid": o.grid, "amplitude": o.amplitude}
        self.rounds = AUP(AUPOptions(pr=o.pr, prune_layers=o.prune_layers, keep_layers=o.keep_layers,
                                     target_params=o.target_params))
        self.progress = fresh_state()
        self.converting = False  # the last step converted a layer (its round may fine-tune longer)

    # -- conversion -------------------------------------------------------------------------------------
    def _convert(self, model: nn.Module, names: list[str], ctx: Context) -> None:
        o = self.options
        fit_steps = min(o.fit_steps, 2) if ctx.quick else o.fit_steps
        before = sum(p.numel() for p in model.parameters())
        seen = self._layer_io(model, names, ctx) if o.fit == "outputs" else {}
        errors = fgf.convert(model, names, self.spec, fit_steps, float(o.fit_lr), [float(v) for v in o.fit_init_orders])
        after = sum(p.numel() for p in model.parameters())
        for name, err in errors.items():
            ctx.log.info("fgfp: %s -> FGF, relative fit error %.3f", name, err)
        steps = min(o.output_fit_steps, 2) if ctx.quick else o.output_fit_steps
        for name, (inputs, outputs) in seen.items():
            start, end = fgf.fit_outputs(model.get_submodule(name), inputs, outputs, steps, float(o.output_fit_lr),
                                         seed=ctx.seed)
            ctx.log.info("fgfp: %s fitted to its outputs on %d images: output correlation %.3f -> %.3f", name,
                         inputs.shape[0], start, end)
        ctx.log.info("fgfp: %d layer%s converted, parameters %d -> %d", len(names), "" if len(names) == 1 else "s",
                     before, after)

    def _layer_io(self, model: nn.Module, names: list[str], ctx: Context) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each named conv's inputs and (pretrained) outputs on calibration images, in one pass per batch
        (`run_hooked`: eval mode, no grad); fewer images where a layer's maps would pass MAX_FIT_NUMBERS."""
        wanted = 8 if ctx.quick else self.options.output_fit_images
        batch_size = min(128, wanted)
        seen: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {name: ([], []) for name in names}
        budget = dict.fromkeys(names, MAX_FIT_NUMBERS)

        def keep(name: str, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
            if budget[name] >= inputs.numel() + outputs.numel():
                budget[name] -= inputs.numel() + outputs.numel()
                seen[name][0].append(inputs)
                seen[name][1].append(outputs)

        run_hooked(model, {name: model.get_submodule(name) for name in names},
                   ctx.calibration_batches(math.ceil(wanted / batch_size), batch_size), keep)
        return {name: (torch.cat(xs)[:wanted], torch.cat(ys)[:wanted]) for name, (xs, ys) in seen.items() if xs}

    def _choose(self, model: nn.Module) -> list[str]:
        o = self.options
        names = select_layers(model, o.layers, o.skip_strided)
        return listed_order(names, o.layers) if o.order == "listed" else conversion_order(model, names)

    def next_layer(self) -> str | None:
        """The layer the next step converts (None: the conversions are over, steps prune)."""
        done = set(self.progress["converted"]) | set(self.progress["skipped"])
        return next((name for name in self.progress["order"] or [] if name not in done), None)

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        self.rounds.prepare(model, ctx)  # AUP's target_params counts from the model before any conversion
        order = self._choose(model)
        self.progress = {**fresh_state(), "order": order}
        if self.options.convert == "all":
            chosen = set(order)
            names = [name for name, _ in model.named_modules() if name in chosen]  # module order, as before
            self._convert(model, names, ctx)
            self.progress["converted"] = names
        else:
            ctx.log.info("fgfp: converting one layer per round, in this order: %s; AUP rounds follow",
                         ", ".join(order))
        return model

    # -- rounds -----------------------------------------------------------------------------------------
    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        p = self.progress
        if p["order"] is None:  # a step without `prepare`: choose now
            p["order"] = self._choose(model)
        name = self.next_layer()
        self.converting = name is not None
        if name is not None:
            left = len(p["order"]) - len(p["converted"]) - len(p["skipped"]) - 1
            ctx.log.info("fgfp round %d: converting %s (%d more after it)", round_index, name, left)
            self._convert(model, [name], ctx)
            p["converted"].append(name)
            return model
        if not self.rounds.prune_layers:
            ctx.log.info("fgfp: method.prune_layers is empty: FGF conversion only, no pruning rounds")
            return None
        return self.rounds.step(model, ctx, round_index, step_scale)

    def round_epochs(self, scheduled: int) -> int:
        """A conversion round fine-tunes `convert_epochs` when set; a pruning round what the schedule says."""
        if self.converting and self.options.convert_epochs is not None:
            return self.options.convert_epochs
        return scheduled

    def state_dict(self) -> dict:
        return {**copy.deepcopy(self.progress), "aup": self.rounds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        state = copy.deepcopy(dict(state))
        self.rounds.load_state_dict(state.pop("aup", None) or {})
        self.progress = {**fresh_state(), **state}

    def rolled_back(self, state: dict) -> bool:
        """A rolled-back conversion leaves its layer ordinary for good: the retried round converts the next
        layer (the fit is deterministic, so the same conversion would fail again), and the pruning step is
        not shrunk for it. A rolled-back pruning round shrinks the next one, as AUP's."""
        self.load_state_dict(state)
        if self.progress["order"] is None:  # the step chose the order; choose it again the same way
            return True
        layer = self.next_layer()
        if layer is None:
            return True
        self.progress["skipped"].append(layer)
        log.info("fgfp: the conversion of %s was rolled back: it stays an ordinary conv (AUP prunes it)", layer)
        return False

    # -- persistence ------------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        return pruning_meta(model)

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict) -> nn.Module:
        return restore_pruning(model, meta, state_dict)

    def storage_bytes(self, model: nn.Module) -> int | None:
        return self.rounds.storage_bytes(model)
