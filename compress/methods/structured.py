"""Structured (channel) pruning: the shared base class of every criterion that removes whole output channels.

A criterion only says how much each output channel is worth; this base class does the rest:
finds the prunable channel groups (Torch-Pruning's dependency graph: channels tied together by residual
additions, concatenations, BatchNorm/Linear neighbours form one group), turns the rate spec into a
number of channels to keep per group, removes the lowest-scoring channels by real surgery (the result is
an ordinary, smaller nn.Module), and saves/restores the pruned shapes.

To add a criterion, give it an options dataclass extending `StructuredOptions` (its `name` default is the
method's name; range checks in `__post_init__`), subclass `StructuredPruning`, list the class in
`compress/methods/__init__.py`, and implement `channel_scores`:

    @dataclass
    class MineOptions(StructuredOptions):
        name: str = "mine"
        feature: str = "relu"   # relu: relu(BN(conv)) | conv: the conv's own output
        batches: int = 5        # calibration batches ...
        batch_size: int = 128   # ... of this many training images

        def __post_init__(self) -> None:
            super().__post_init__()   # compress_rate, threshold, step_rate
            require_choice(self.feature, "method.feature", FEATURES)

    class MyCriterion(StructuredPruning):
        name = "mine"
        Options = MineOptions

        def channel_scores(self, model, ctx, layers):
            batches = ctx.calibration_batches(self.options.batches, self.options.batch_size)
            return feature_scores(model, layers, batches, my_score_fn, self.options.feature)   # compress.prune.features

Budget targets (`target_macs` / `target_params`, compress/prune/allocation.py): instead of a rate, the
channels to remove are searched so that the measured MACs / parameters land within 1 % of a fraction of
the baseline's, with one rate for every group (`allocation=uniform`) or channels ranked across groups on
group-normalised scores (`allocation=global`); see docs/structured-pruning.md. A criterion needs nothing
more for that.

Scores: one float per output channel of every layer in `layers`, higher = keep. When several convolutions
share one channel group (e.g. all block outputs of a ResNet stage, tied by the residual additions), their
scores are averaged over the group's convolutions, so scores of one layer should be on a comparable scale
across layers of a group; with `threshold` set they are compared with one number across all groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from compress.checks import is_number, require
from compress.deploy.measure import count_macs, count_params
from compress.methods.base import Context, Method, MethodOptions
from compress.prune import allocation, engine
from compress.prune.features import FEATURES, feature_scores
from compress.prune.rates import RateSpec, paper_rate, round_down, round_up
from compress.prune.scorers import hrank_map_score, l1_scores, random_scores

ALLOCATIONS = ("uniform", "global")
# One-shot passes towards a target: the cost model is exact for conv/linear/BN networks, so one pass lands;
# a further pass corrects (from the measured cost) whatever an unusual layer type makes it miss.
TARGET_PASSES = 3


def parse_compress_rate(value: Any) -> RateSpec | None:
    """The parsed rate spec; None for "paper", which names a list per architecture (resolved when the model
    arrives). Parsing here makes a bad rate fail before any heavy work."""
    return None if value == "paper" else RateSpec.parse(value)


@dataclass
class StructuredOptions(MethodOptions):
    """Options shared by all structured criteria (`method.<key>`); each criterion's options extend these.

    compress_rate: fraction of channels to REMOVE: a float for every group; a dict of layer-name glob
        patterns -> float (`{"layer3.*.conv1": 0.5}`; first matching pattern wins, unmatched groups are not
        pruned); the HRank/CFDP per-architecture list notation as a string (`"[0.]+[0.18]*29"`), mapped to
        layers as in HRank's code; or "paper". Kept channels: int(C * (1 - rate)), never fewer than 1.
        With a target (below): the most each group may lose (rate 0: not pruned; "paper": every group, no cap).
    threshold: if not None, prune every channel whose (group-averaged) score is below this number; the rate
        of each group is then the most it may lose (rate 0: untouched, 1.0: no cap; a layer keeps at least
        one channel). For criteria whose scores are comparable across layers. Not with a target.
    step_rate: iterative schedule only: each round removes `step_rate * step_scale` of each group's
        remaining channels (at least one), never going past the target given by the rate spec; with a
        target, each round lowers the cost by `step_rate * step_scale` of the way from the baseline to it.
    target_macs / target_params: keep this fraction of the baseline's MACs / parameters (measured as
        compress.deploy.measure does), within 1 % of the target (`allocation.TOLERANCE`); see docs/structured-pruning.md.
    allocation: with a target, how channels are taken across groups: uniform | global.
    min_keep: with a target, the fraction of its original channels every group keeps at least.
    """

    name: str = "structured"
    # fraction of channels to REMOVE: float | {glob: rate} | "[0.]+[0.18]*29" (HRank layout) | paper (the
    # CFDP/HRank tables' list for resnet56, vgg16_bn, googlenet, resnet50_imagenet)
    compress_rate: Any = "paper"
    # prune every channel scoring below this, in the groups the rate covers (rate = max removed)
    threshold: Optional[float] = None
    # iterative schedule: fraction of a group's remaining channels removed per round (x step_scale)
    step_rate: float = 0.1
    # Budget targets, instead of a rate spec: the fraction of the baseline's MACs / parameters to KEEP, in
    # (0, 1) (target_macs=0.47: ~2.1x fewer MACs); at most one of the two. The pruned model lands within 1 %
    # of the target, as measured; with schedule.rounds > 0 the target is approached in rounds.
    target_macs: Optional[float] = None
    target_params: Optional[float] = None
    # How channels are taken across layers: uniform (one rate for every prunable group) | global (channels
    # ranked across all groups on layer-normalised scores, as Torch-Pruning's global pruning)
    allocation: str = "uniform"
    # global allocation: the fraction of its channels every group keeps at least
    min_keep: float = 0.1
    # every pruned group keeps a multiple of this many channels (Torch-Pruning's round_to; 8 or 16 suit
    # the vectorised convolution kernels of CPU runtimes); groups narrower than it are not pruned. 1: off
    round_to: int = 1

    def __post_init__(self) -> None:
        # Not a field: the parsed form of `compress_rate` (None = "paper"), for the method.
        self.rate_spec = parse_compress_rate(self.compress_rate)
        self.check(self.threshold is None or is_number(self.threshold), "threshold", "a finite number or null")
        self.number("step_rate", 0, 1, low_open=True)
        for key in ("target_macs", "target_params"):  # the fraction of the baseline to keep
            self.number(key, 0, 1, low_open=True, high_open=True, allow_none=True)
        self.check(self.target_macs is None or self.target_params is None, "target_params",
                   "null when method.target_macs is set (one target at a time)")
        targeted = self.target_macs is not None or self.target_params is not None
        self.check(self.threshold is None or not targeted, "threshold",
                   "null when method.target_macs / method.target_params is set (a budget target decides how many "
                   "channels go)")
        self.choice("allocation", ALLOCATIONS)
        self.number("min_keep", 0, 1, low_open=True)
        self.count("round_to")  # 1: widths not rounded


class StructuredPruning(Method):
    """Abstract base (not registered): prune output channels by the scores of `channel_scores`, as the
    options (`StructuredOptions`: compress_rate, threshold, step_rate) say."""

    name = "structured"
    Options = StructuredOptions
    one_shot = True
    iterative = True
    changes_model = True

    def __init__(self, options: StructuredOptions | None = None):
        super().__init__(options)
        self.rates: RateSpec | None = self.options.rate_spec  # None: "paper", resolved when the model arrives
        self.threshold = self.keep_threshold(self.options.threshold)
        self.step_rate = float(self.options.step_rate)
        self._original_channels: dict[str, int] = {}  # group name -> channels before any pruning
        # Budget target: the option's name, the fraction of the baseline to keep, the cost it counts.
        opts = self.options
        self.budget = allocation.Target.of(opts)
        self.target_key = None if self.budget is None else self.budget.key
        self.target = None if self.budget is None else self.budget.fraction
        self.metric = None if self.budget is None else self.budget.metric
        if self.target is not None and self.rates is None:
            self.rates = RateSpec(uniform=1.0, text="1.0")  # with a target, "paper" means: every group, no cap
        # Checked here, not in the options: method=torch_pruning shares the options and ranks globally at a rate.
        require(self.target is not None or opts.allocation == "uniform", "method.allocation",
                "uniform unless method.target_macs or method.target_params is set (global ranks channels "
                "against a budget)", opts.allocation)
        self._baseline: dict[str, int] = {}  # "macs" / "params" of the model before any pruning (targets)

    def keep_threshold(self, threshold: float | None) -> float | None:
        """`threshold` on the engine's scale (prune below it, higher = keep); a criterion whose option is
        on another scale converts it here."""
        return None if threshold is None else float(threshold)

    # -- what a criterion implements -------------------------------------------------------------------
    def channel_scores(self, model: nn.Module, ctx: Context, layers: dict[str, nn.Conv2d]) -> dict[str, torch.Tensor]:
        """Score every output channel of every layer in `layers` (name -> conv, names as in
        `model.named_modules()`). Return name -> float tensor (out_channels,), higher = keep.
        The model is the current (possibly already pruned) model on `ctx.device`."""
        raise NotImplementedError(f"{type(self).__name__} must implement channel_scores")

    # -- one-shot ---------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.target is not None:
            return self._compress_to_target(model, ctx)
        plan = self._plan(model, ctx)
        targets = plan.target_keep()
        group_scores = self._group_scores(model, ctx, plan, targets)
        keep = self._rounded(plan, plan.keep_counts(targets, group_scores, self.threshold))
        engine.prune_groups(model, plan, group_scores, keep)
        ctx.log.info("%s: %s", self.name, engine.describe(model, plan, self._original_channels))
        return model

    # -- iterative schedule -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        plan = self._plan(model, ctx)
        if self.target is not None:  # record the baseline, and refuse an unreachable target before any round
            baseline = self._baseline_cost(model, ctx)
            cost = allocation.CostModel.build(plan, ctx.input_shape, self.metric, baseline)
            self._check_reachable(cost, self._floors(plan), baseline)
        return model

    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        if self.target is not None:
            return self._step_to_target(model, ctx, round_index, step_scale)
        plan = self._plan(model, ctx)
        final = plan.target_keep(self._original_channels)
        group_scores = self._group_scores(model, ctx, plan, final)
        final = self._rounded(plan, plan.keep_counts(final, group_scores, self.threshold))
        units = self._units(plan)
        keep: dict[str, int] = {}
        for group, target in final.items():
            current = plan.channels[group]
            remove = max(1, math.floor(current * self.step_rate * step_scale))
            # with round_to, at least one block goes: the width rounded down, never under the final width
            keep[group] = max(target, round_down(current - remove, units[group]))
        if all(keep[g] >= plan.channels[g] for g in keep):
            return None
        engine.prune_groups(model, plan, group_scores, keep)
        ctx.log.info("%s round %d: %s", self.name, round_index, engine.describe(model, plan, self._original_channels))
        return model

    def _units(self, plan: "engine.PruningPlan") -> dict[str, int]:
        """Group -> the block its width moves by: method.round_to, and a multiple of the slices of a grouped
        conv the group is tied to (engine.PruningPlan.units)."""
        return {g: math.lcm(self.options.round_to, plan.units.get(g, 1)) for g in plan.members}

    def _rounded(self, plan: "engine.PruningPlan", keep: dict[str, int]) -> dict[str, int]:
        """`keep` with every count rounded up to a multiple of method.round_to (at most the group's width),
        and of a grouped conv's slices, keeping two channels per slice (engine.PruningPlan.min_channels)."""
        units = self._units(plan)
        return {g: round_up(max(k, plan.min_channels(g)), plan.channels[g], units[g]) for g, k in keep.items()}

    def state_dict(self) -> dict:
        return {"original_channels": dict(self._original_channels), "baseline": dict(self._baseline)}

    def load_state_dict(self, state: dict) -> None:
        self._original_channels = dict(state.get("original_channels", {}))
        self._baseline = {k: int(v) for k, v in (state.get("baseline") or {}).items()}

    # -- budget targets (method.target_macs / method.target_params) --------------------------------------
    def _compress_to_target(self, model: nn.Module, ctx: Context) -> nn.Module:
        plan = self._plan(model, ctx)
        recorded = self.metric in self._baseline
        baseline = self._baseline_cost(model, ctx)
        goal = self.target * baseline
        current = self._cost(model, ctx) if recorded else baseline
        for attempt in range(TARGET_PASSES):
            if current <= goal * (1 + allocation.TOLERANCE):
                break
            if attempt:
                plan = self._plan(model, ctx)
            if not self._prune_towards(model, ctx, plan, goal, current, goal):
                break
            current = self._cost(model, ctx)
        self._log_target(model, ctx, plan, current, goal, self.name)
        return model

    def _step_to_target(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        """One round: lower the cost by `step_rate * step_scale` of the way from the baseline to the target
        (all the way once what is left is within the tolerance); None once the target is met."""
        plan = self._plan(model, ctx)
        baseline = self._baseline_cost(model, ctx)
        final = self.target * baseline
        current = self._cost(model, ctx)
        if current <= final * (1 + allocation.TOLERANCE):
            return None
        goal = max(final, current - self.step_rate * step_scale * (baseline - final))
        if goal <= final * (1 + allocation.TOLERANCE):
            goal = final
        if not self._prune_towards(model, ctx, plan, goal, current, final, at_least_one=True):
            return None
        self._log_target(model, ctx, plan, self._cost(model, ctx), final, f"{self.name} round {round_index}",
                         goal=goal)
        return model

    def _prune_towards(self, model: nn.Module, ctx: Context, plan: "engine.PruningPlan", goal: float,
                       current: float, final: float, at_least_one: bool = False) -> bool:
        """Remove the channels that bring the cost (now `current`, measured) to `goal`; `final` is the
        run's target (never overshot by more than the aim). False when nothing was removed."""
        cost = allocation.CostModel.build(plan, ctx.input_shape, self.metric, current)
        floors = self._floors(plan)
        self._check_reachable(cost, floors, self._baseline_cost(model, ctx))
        scores = None
        if self.options.allocation == "global":
            scores = self._group_scores(model, ctx, plan, floors)
            events = allocation.global_order(cost, scores, floors, self._units(plan))
        else:
            events = allocation.uniform_order(cost, self._original_channels, floors, self._units(plan))
        removed = allocation.allocate(cost, events, goal)
        if at_least_one and not removed.any():  # a round too small for one event still takes one
            removed = allocation.fill(cost, events, 0, final * (1 - allocation.AIM), current - 0.5, max_steps=1)
        keep = {g: plan.channels[g] - int(r) for g, r in zip(cost.groups, removed.tolist()) if r > 0}
        if not keep:
            return False
        if scores is None:  # uniform: only the groups that lose channels are scored
            scores = self._group_scores(model, ctx, plan, keep)
        engine.prune_groups(model, plan, scores, keep)
        return True

    def _floors(self, plan: "engine.PruningPlan") -> dict[str, int]:
        """Groups that may still lose channels under a target -> the fewest channels each may keep."""
        floors = {}
        units = self._units(plan)
        for group, rate in plan.rates.items():
            current = plan.channels[group]
            floor = allocation.floor_channels(self._original_channels.get(group, current), current, rate,
                                              float(self.options.min_keep), units[group], plan.min_channels(group))
            if floor < current:
                floors[group] = floor
        return floors

    def _check_reachable(self, cost: "allocation.CostModel", floors: dict[str, int], baseline: int) -> None:
        lowest = float(cost.cost(cost.widths_of(floors)))
        if lowest > self.target * baseline * (1 + allocation.TOLERANCE):
            capped = "" if self.options.compress_rate == "paper" else ", within method.compress_rate's caps"
            raise self.budget.out_of_reach(lowest / baseline, self.options.min_keep, capped)

    def _baseline_cost(self, model: nn.Module, ctx: Context) -> int:
        """The target's cost of the model before any pruning: recorded (state_dict) the first time."""
        if self.metric not in self._baseline:
            self._baseline = {"macs": count_macs(model, ctx.input_shape), "params": count_params(model)}
        return self._baseline[self.metric]

    def _cost(self, model: nn.Module, ctx: Context) -> int:
        """The target's cost of the model now, by the project's counters (compress.deploy.measure)."""
        return count_macs(model, ctx.input_shape) if self.metric == "macs" else count_params(model)

    def _log_target(self, model: nn.Module, ctx: Context, plan: "engine.PruningPlan", achieved: float, final: float,
                    label: str, goal: float | None = None) -> None:
        baseline = self._baseline_cost(model, ctx)

        def amount(value: float) -> str:
            return f"{value / 1e6:.2f}M"

        met = allocation.within(achieved, final)
        round_goal = "" if goal is None else f"round goal {goal / baseline:.4f}, "
        line = (f"{label}: {self.metric} {amount(achieved)} = {achieved / baseline:.4f} of the baseline's "
                f"{amount(baseline)} ({round_goal}target {self.target:g} = {amount(final)}, "
                f"{100 * (achieved / final - 1):+.2f} % vs the target; allocation {self.options.allocation}); "
                f"{engine.describe(model, plan, self._original_channels)}")
        if goal is None and not met:
            ctx.log.warning("%s [outside the %g %% tolerance]", line, 100 * allocation.TOLERANCE)
        else:
            ctx.log.info("%s", line)

    # -- persistence ------------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        return engine.structure_meta(model)

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        return engine.restore_structure(model, meta, state_dict)

    # -- internals --------------------------------------------------------------------------------------
    def _plan(self, model: nn.Module, ctx: Context) -> "engine.PruningPlan":
        if self.rates is None:
            self.rates = RateSpec.parse(paper_rate(ctx.arch))
        plan = engine.PruningPlan.build(model, ctx.input_shape, self.rates)
        for group, channels in plan.channels.items():
            self._original_channels.setdefault(group, channels)
        return plan

    def group_scores(self, model: nn.Module, ctx: Context, plan: "engine.PruningPlan", groups: list[str],
                     layers: dict[str, nn.Conv2d]) -> dict[str, torch.Tensor]:
        """Scores per channel group (name -> (channels,), higher = keep) of `groups`, whose convs are
        `layers`. Default: the criterion's `channel_scores`, averaged over each group's convs. A criterion
        whose terms must be combined per group overrides this hook (SCAP re-normalises each term over the
        group before fusing them)."""
        return plan.group_scores(self.channel_scores(model, ctx, layers), groups)

    def _group_scores(self, model, ctx, plan, targets: dict[str, int]) -> dict[str, torch.Tensor]:
        """Scores of the groups that will lose channels (one criterion call for all their convs)."""
        groups = [g for g, keep in targets.items() if keep < plan.channels[g]]
        layers = {name: plan.convs[name] for g in groups for name in plan.members[g]}
        if not layers:
            return {}
        return self.group_scores(model, ctx, plan, groups, layers)


@dataclass
class L1Options(StructuredOptions):
    """`method=l1`: L1-norm filter pruning (Li et al. 2017). Needs no data."""

    name: str = "l1"


class L1Pruning(StructuredPruning):
    """Keep the filters with the largest L1 norm (Li et al. 2017). Needs no data."""

    name = "l1"
    Options = L1Options

    def channel_scores(self, model, ctx, layers):
        return l1_scores(layers)


@dataclass
class RandomOptions(StructuredOptions):
    """`method=random`: random channel pruning, the baseline a criterion has to beat (a `threshold`
    compares with scores uniform in [0, 1))."""

    name: str = "random"
    seed: Optional[int] = None  # seed of the random scores; null: the run's seed

    def __post_init__(self) -> None:
        super().__post_init__()
        self.count("seed", -(2**63), 2**64 - 1, allow_none=True)  # what torch.Generator takes


class RandomPruning(StructuredPruning):
    """Keep random channels: the baseline any criterion must beat. `seed` null = the run's seed."""

    name = "random"
    Options = RandomOptions

    def channel_scores(self, model, ctx, layers):
        seed = ctx.seed if self.options.seed is None else self.options.seed
        return random_scores(layers, seed)


@dataclass
class HRankOptions(StructuredOptions):
    """`method=hrank`: HRank (Lin et al. 2020), the average matrix rank of each channel's feature maps (a
    `threshold` compares with the average rank)."""

    name: str = "hrank"
    feature: str = "relu"  # relu: rank of relu(BN(conv)), as HRank's hooks | conv: rank of the conv's own output
    batches: int = 5  # calibration batches (HRank: 5) ...
    batch_size: int = 128  # ... of this many training images, no augmentation (HRank: 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.choice("feature", FEATURES)
        self.count("batches")
        self.count("batch_size")


class HRankPruning(StructuredPruning):
    """HRank (Lin et al. 2020): keep the channels whose feature maps have the highest average rank,
    over `batches` calibration batches of `batch_size` training images, one forward pass per batch."""

    name = "hrank"
    Options = HRankOptions

    def channel_scores(self, model, ctx, layers):
        opts = self.options
        batches = ctx.calibration_batches(opts.batches, opts.batch_size)
        return feature_scores(model, layers, batches, hrank_map_score, opts.feature)
