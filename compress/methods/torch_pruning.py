"""`method=torch_pruning`: Torch-Pruning's own pruner and importance criteria, as a peer of the project's
structured methods (same target / allocation keys, same fine-tune and rows; see docs/torch-pruning.md).

Torch-Pruning (TP, Fang et al. 2023, "DepGraph") finds the channel groups, scores them with one of its
importance estimators and removes channels in place (`pruner.step()`). This module only decides how many
channels each group keeps, so that the result meets the budget the options ask for:

    method.importance   group_l1     -> tp.importance.GroupMagnitudeImportance(p=1)
                        group_taylor -> tp.importance.GroupTaylorImportance() (gradients of calibration batches)
                        lamp         -> tp.importance.LAMPImportance()
                        bn_scale     -> tp.importance.BNScaleImportance()
    method.allocation   uniform      -> local pruning: one ratio for every group (TP's pruning_ratio_dict,
                                        one entry per group)
                        global       -> global_pruning=True (channels ranked across groups on TP's
                                        normalised scores)
    method.min_keep     -> max pruning ratio 1 - min_keep per group (enforced here: TP 1.6's
                           max_pruning_ratio does not cap a group within one global step)
    method.target_macs / target_params -> the ratio is searched (bisection over pruned deep copies,
                           measured with compress.deploy.measure) until the kept fraction lands within 1 % of the target
    method.compress_rate (a number; used without a target) -> TP's pruning_ratio as it is

The classifier (the model's last nn.Linear) is in `ignored_layers`. One-shot only (see `TorchPruning`).
The pruned model is an ordinary nn.Module; `meta` / `restore` are the structured methods' (the shapes are
read back from the state dict, the ShortcutA routes from the meta).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compress import CompressError
from compress.checks import require_choice
from compress.methods.base import Context, Method
from compress.methods.structured import StructuredOptions
from compress.models.cifar_resnet import ShortcutA
from compress.models.introspect import classifier, evaluating, model_device
from compress.prune import engine
from compress.prune.allocation import TOLERANCE  # noqa: F401  (the method's tolerance, as tests read it)
from compress.prune.tp_search import Group, Plan, RankingScores, Search, describe

IMPORTANCES = ("group_l1", "group_taylor", "lamp", "bn_scale")


def make_importance(name: str) -> tp.importance.Importance:
    """The Torch-Pruning importance estimator behind `method.importance` (TP's defaults otherwise)."""
    require_choice(name, "method.importance", IMPORTANCES)
    if name == "group_l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "group_taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise AssertionError(name)  # unreachable: IMPORTANCES are all handled above


@dataclass
class TorchPruningOptions(StructuredOptions):
    """`method=torch_pruning`: Torch-Pruning's pruner with one of its importance criteria.

    The target keys (`target_macs`, `target_params`), `allocation` and `min_keep` are the structured
    methods' (StructuredOptions). `compress_rate` is TP's `pruning_ratio` (a number, the fraction of each
    group's channels to remove; with allocation=global, of all channels) and only used when no target is
    set; the "paper", pattern and list forms and `threshold` do not apply to TP's pruner. `step_rate` is
    unused (one-shot only).
    """

    name: str = "torch_pruning"
    # group_l1 | group_taylor | lamp | bn_scale (tp.importance.GroupMagnitudeImportance(p=1) /
    # GroupTaylorImportance / LAMPImportance / BNScaleImportance)
    importance: str = "group_l1"
    # Torch-Pruning's pruning_ratio, used when neither target_macs nor target_params is set
    compress_rate: Any = 0.5
    # group_taylor: gradients of this many calibration batches ...
    batches: int = 4
    # ... of this many training images (loss: cross-entropy against the model's own predictions)
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = self.rate_spec
        self.check(spec is not None and spec.uniform is not None, "compress_rate",
                   "a number in [0, 1], Torch-Pruning's pruning_ratio (not 'paper', a pattern dict or a rate list)")
        self.check(self.threshold is None, "threshold",
                   "null (Torch-Pruning ranks channels by importance; use target_macs / target_params)")
        self.choice("importance", IMPORTANCES)
        self.check(self.round_to == 1 or self.allocation == "uniform", "round_to",
                   "1 with allocation=global (TP's global ranking removes single channels; "
                   "round_to applies to allocation=uniform, or use method=l1 with allocation=global)")
        self.count("batches")
        self.count("batch_size")


class TorchPruning(Method):
    """Torch-Pruning's BasePruner with one of its importance criteria, to a MACs / parameter target.

    One-shot only (iterative = False): TP's iterative_steps would need the number of rounds, which the
    method is not told, and its pruner (dependency graph, importance accumulators) cannot be carried
    through state.pt for a resumed schedule. Use the project's own structured methods for rounds.
    """

    name = "torch_pruning"
    Options = TorchPruningOptions
    one_shot = True
    iterative = False
    changes_model = True

    def __init__(self, options: TorchPruningOptions | None = None):
        super().__init__(options)
        self.importance = make_importance(self.options.importance)
        # What the last `compress` did (for logs and tests): kept fraction, evaluations, seconds, ratio...
        self.result: dict[str, Any] = {}

    # -- one-shot ---------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        started = time.perf_counter()
        opts = self.options
        engine.route_shortcuts(model, ctx.input_shape)  # ShortcutA in explicit-route form (its TP pruner needs it)
        if opts.importance == "group_taylor":
            self._gradients(model, ctx)
        try:
            search = Search(self, model, ctx)
            if opts.target_macs is not None or opts.target_params is not None:
                plan = search.to_target()
            else:
                plan = search.at_ratio(float(opts.rate_spec.uniform))
            self._prune(model, ctx, plan)
        finally:
            if opts.importance == "group_taylor":
                for p in model.parameters():
                    p.grad = None
        kept = search.kept_fraction(model)
        self.result = {**search.summary(plan), "kept": kept, "seconds": time.perf_counter() - started}
        ctx.log.info("%s (%s, %s): %s %.4f of the baseline kept%s, %d evaluations, %.1f s; %s", self.name,
                     opts.importance, opts.allocation, search.metric, kept,
                     f" (target {search.target:.4f})" if search.target is not None else "", search.evaluations,
                     self.result["seconds"], describe(model, search.groups))
        return model

    # -- persistence ------------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        return engine.structure_meta(model)

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        return engine.restore_structure(model, meta, state_dict)

    # -- internals --------------------------------------------------------------------------------------
    def _gradients(self, model: nn.Module, ctx: Context) -> None:
        """group_taylor: accumulate parameter gradients over calibration batches. Calibration images come
        without labels, so the loss is cross-entropy against the model's own top-1 predictions (eval mode:
        BatchNorm statistics are left alone)."""
        opts = self.options
        model.zero_grad(set_to_none=True)
        batches = 0
        with evaluating(model), torch.enable_grad():
            for images in ctx.calibration_batches(opts.batches, opts.batch_size):
                logits = model(images.to(ctx.device))
                loss = nn.functional.cross_entropy(logits, logits.detach().argmax(1))
                loss.backward()
                batches += 1
        if batches == 0:
            raise CompressError("method.batches: group_taylor got no calibration batches")

    def build_pruner(self, model: nn.Module, ctx: Context, plan: Plan, groups: list[Group]) -> tp.pruner.BasePruner:
        """TP's pruner for `model` (a deep copy or the real one) set up to do what `plan` says."""
        opts = self.options
        importance = RankingScores(self.importance, opts.min_keep, plan.spare)
        kwargs: dict[str, Any] = {}
        if plan.allocation == "global":
            kwargs.update(global_pruning=True, pruning_ratio=plan.ratio, max_pruning_ratio=1.0 - opts.min_keep)
        else:
            ratios = {}
            for group in groups:
                keep = plan.keep[group.root]
                if keep < group.channels:
                    # int(C * (1 - r)) = keep in TP's arithmetic, float error included
                    ratios[model.get_submodule(group.root)] = 1.0 - (keep + 0.5) / group.channels
            kwargs.update(global_pruning=False, pruning_ratio=0.0, pruning_ratio_dict=ratios)
        example = torch.zeros(1, *ctx.input_shape, device=model_device(model))
        with evaluating(model), torch.enable_grad():
            return tp.pruner.BasePruner(
                model, example, importance=importance, ignored_layers=[self._classifier(model)],
                customized_pruners={ShortcutA: engine.ShortcutAPruner()}, **kwargs,
            )

    @staticmethod
    def _classifier(model: nn.Module) -> nn.Linear:
        found = classifier(model)
        if found is None:
            raise CompressError("method: torch_pruning keeps the classifier (the last nn.Linear) whole, but the model has none")
        return found[1]

    def _prune(self, model: nn.Module, ctx: Context, plan: Plan) -> None:
        if plan.empty:
            return
        pruner = self.build_pruner(model, ctx, plan, plan.groups)
        with evaluating(model):
            pruner.step()
