"""Structured (channel) pruning: the shared base class of every criterion that removes whole output channels.

A criterion only says how much each output channel is worth; this base class does the rest:
finds the prunable channel groups (Torch-Pruning's dependency graph: channels tied together by residual
additions, concatenations, BatchNorm/Linear neighbours form one group), turns the rate spec into a
number of channels to keep per group, removes the lowest-scoring channels by real surgery (the result is
an ordinary, smaller nn.Module), and saves/restores the pruned shapes.

To add a criterion, subclass `StructuredPruning`, give it a `name`, register it, and implement
`channel_scores`:

    @register
    class MyCriterion(StructuredPruning):
        name = "mine"

        def __init__(self, feature: str = "relu", batches: int = 5, batch_size: int = 128, **common):
            super().__init__(**common)        # compress_rate, threshold, step_rate (and the error for unknown keys)
            self.feature, self.batches, self.batch_size = feature, batches, batch_size

        def channel_scores(self, model, ctx, layers):
            batches = ctx.calibration_batches(self.batches, self.batch_size)
            return feature_scores(model, layers, batches, my_score_fn, self.feature)   # compress.prune.features

Scores: one float per output channel of every layer in `layers`, higher = keep. When several convolutions
share one channel group (e.g. all block outputs of a ResNet stage, tied by the residual additions), their
scores are averaged over the group's convolutions, so scores of one layer should be on a comparable scale
across layers of a group; with `threshold` set they are compared with one number across all groups.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compress import CompressError
from compress.methods.base import Context, Method
from compress.methods import register
from compress.prune import engine
from compress.prune.features import FEATURES, feature_scores
from compress.prune.scorers import hrank_map_score, l1_scores, random_scores
from compress.prune.rates import RateSpec, paper_rate


class StructuredPruning(Method):
    """Abstract base (not registered): prune output channels by the scores of `channel_scores`.

    Options shared by all structured criteria (each is a `method.<key>` in the config):
        compress_rate: fraction of channels to REMOVE: a float for every group; a dict of layer-name glob
            patterns -> float (`{"layer3.*.conv1": 0.5}`; first matching pattern wins, unmatched groups
            are not pruned); or the HRank/CFDP per-architecture list notation as a string
            (`"[0.]+[0.18]*29"`), mapped to layers as in HRank's code. Kept channels: int(C * (1 - rate)),
            never fewer than 1.
        threshold: if not None, prune every channel whose (group-averaged) score is below this number; the
            rate of each group is then the most it may lose (rate 0: untouched, 1.0: no cap; a layer keeps
            at least one channel). For criteria whose scores are comparable across layers.
        step_rate: iterative schedule only: each round removes `step_rate * step_scale` of each group's
            remaining channels (at least one), never going past the target given by the rate spec.
    """

    name = "structured"

    def __init__(
        self,
        compress_rate: Any = 0.5,
        threshold: float | None = None,
        step_rate: float = 0.1,
        **params: Any,
    ):
        super().__init__(**params)
        # "paper" is resolved against the architecture when the model arrives.
        self.rates = None if compress_rate == "paper" else RateSpec.parse(compress_rate)
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise CompressError(f"method.threshold: must be a number or null, got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        if not isinstance(step_rate, (int, float)) or not 0 < step_rate <= 1:
            raise CompressError(f"method.step_rate: must be a number in (0, 1], got {step_rate!r}")
        self.step_rate = float(step_rate)
        self._original_channels: dict[str, int] = {}  # group name -> channels before any pruning

    # -- what a criterion implements -------------------------------------------------------------------
    def channel_scores(self, model: nn.Module, ctx: Context, layers: dict[str, nn.Conv2d]) -> dict[str, torch.Tensor]:
        """Score every output channel of every layer in `layers` (name -> conv, names as in
        `model.named_modules()`). Return name -> float tensor (out_channels,), higher = keep.
        The model is the current (possibly already pruned) model on `ctx.device`."""
        raise NotImplementedError(f"{type(self).__name__} must implement channel_scores")

    # -- one-shot ---------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        plan = self._plan(model, ctx)
        targets = plan.target_keep()
        group_scores = self._group_scores(model, ctx, plan, targets)
        keep = plan.keep_counts(targets, group_scores, self.threshold)
        engine.prune_groups(model, plan, group_scores, keep)
        ctx.log.info("%s: %s", self.name, engine.describe(model, plan, self._original_channels))
        return model

    # -- iterative schedule -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._plan(model, ctx)
        return model

    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        plan = self._plan(model, ctx)
        final = plan.target_keep(self._original_channels)
        group_scores = self._group_scores(model, ctx, plan, final)
        final = plan.keep_counts(final, group_scores, self.threshold)
        keep: dict[str, int] = {}
        for group, target in final.items():
            current = plan.channels[group]
            remove = max(1, math.floor(current * self.step_rate * step_scale))
            keep[group] = max(target, current - remove)
        if all(keep[g] >= plan.channels[g] for g in keep):
            return None
        engine.prune_groups(model, plan, group_scores, keep)
        ctx.log.info("%s round %d: %s", self.name, round_index, engine.describe(model, plan, self._original_channels))
        return model

    def state_dict(self) -> dict:
        return {"original_channels": dict(self._original_channels)}

    def load_state_dict(self, state: dict) -> None:
        self._original_channels = dict(state.get("original_channels", {}))

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

    def _group_scores(self, model, ctx, plan, targets: dict[str, int]) -> dict[str, torch.Tensor]:
        """Scores of the groups that will lose channels (one criterion call for all their convs)."""
        groups = [g for g, keep in targets.items() if keep < plan.channels[g]]
        layers = {name: plan.convs[name] for g in groups for name in plan.members[g]}
        if not layers:
            return {}
        scores = self.channel_scores(model, ctx, layers)
        return plan.group_scores(scores, groups)


@register
class L1Pruning(StructuredPruning):
    """Keep the filters with the largest L1 norm (Li et al. 2017). Needs no data."""

    name = "l1"

    def channel_scores(self, model, ctx, layers):
        return l1_scores(layers)


@register
class RandomPruning(StructuredPruning):
    """Keep random channels: the baseline any criterion must beat. `seed` null = the run's seed."""

    name = "random"

    def __init__(self, seed: int | None = None, **common: Any):
        super().__init__(**common)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise CompressError(f"method.seed: must be an integer or null, got {seed!r}")
        self.seed = seed

    def channel_scores(self, model, ctx, layers):
        return random_scores(layers, ctx.seed if self.seed is None else self.seed)


@register
class HRankPruning(StructuredPruning):
    """HRank (Lin et al. 2020): keep the channels whose feature maps have the highest average rank,
    over `batches` calibration batches of `batch_size` training images, one forward pass per batch."""

    name = "hrank"

    def __init__(self, feature: str = "relu", batches: int = 5, batch_size: int = 128, **common: Any):
        super().__init__(**common)
        if feature not in FEATURES:
            raise CompressError(f"method.feature: must be one of {', '.join(FEATURES)}, got {feature!r}")
        for key, value in (("batches", batches), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompressError(f"method.{key}: must be a positive integer, got {value!r}")
        self.feature, self.batches, self.batch_size = feature, batches, batch_size

    def channel_scores(self, model, ctx, layers):
        batches = ctx.calibration_batches(self.batches, self.batch_size)
        return feature_scores(model, layers, batches, hrank_map_score, self.feature)
