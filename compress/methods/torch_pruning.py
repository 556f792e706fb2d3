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
                           measured with compress.measure) until the kept fraction lands within 1 % of the target
    method.compress_rate (a number; used without a target) -> TP's pruning_ratio as it is

The classifier (the model's last nn.Linear) is in `ignored_layers`. One-shot only (see `TorchPruning`).
The pruned model is an ordinary nn.Module; `meta` / `restore` are the structured methods' (the shapes are
read back from the state dict, the ShortcutA routes from the meta).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compress import CompressError
from compress.checks import is_count, require_choice
from compress.measure import count_macs, count_params
from compress.methods.base import Context, Method
from compress.methods.structured import StructuredOptions
from compress.models.cifar_resnet import ShortcutA
from compress.prune import allocation, engine
from compress.prune.allocation import TOLERANCE
from compress.prune.rates import round_up

IMPORTANCES = ("group_l1", "group_taylor", "lamp", "bn_scale")
# Global allocation: how many expensive channels at the crossing of the target may be kept (see _Search).
SPARES = 4
# Uniform allocation: how many times the choice of groups narrowed by one channel is corrected (see _Search).
NARROW_ROUNDS = 3


def make_importance(name: str) -> tp.importance.Importance:
    """The Torch-Pruning importance estimator behind `method.importance` (TP's defaults otherwise)."""
    if name == "group_l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "group_taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise CompressError(f"method.importance: must be one of {', '.join(IMPORTANCES)}, got {name!r}")


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
        require_choice(self.importance, "method.importance", IMPORTANCES)
        self.check(self.round_to == 1 or self.allocation == "uniform", "round_to",
                   "1 with allocation=global (TP's global ranking removes single channels; "
                   "round_to applies to allocation=uniform, or use method=l1 with allocation=global)")
        self.check(is_count(self.batches), "batches", "an integer >= 1")
        self.check(is_count(self.batch_size), "batch_size", "an integer >= 1")


@dataclass
class _Group:
    """One prunable channel group of TP's dependency graph, by module names (valid on deep copies)."""

    root: str  # the conv/linear whose output channels TP starts the group from
    members: list[str]  # every module whose output channels belong to the group
    channels: int  # current width
    floor: int  # fewest channels it may keep (min_keep, at least one)


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
            search = _Search(self, model, ctx)
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
                     self.result["seconds"], _describe(model, search.groups))
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
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        batches = 0
        try:
            with torch.enable_grad():
                for images in ctx.calibration_batches(opts.batches, opts.batch_size):
                    logits = model(images.to(ctx.device))
                    loss = nn.functional.cross_entropy(logits, logits.detach().argmax(1))
                    loss.backward()
                    batches += 1
        finally:
            model.train(was_training)
        if batches == 0:
            raise CompressError("method.batches: group_taylor got no calibration batches")

    def build_pruner(self, model: nn.Module, ctx: Context, plan: "_Plan", groups: list[_Group]) -> tp.pruner.BasePruner:
        """TP's pruner for `model` (a deep copy or the real one) set up to do what `plan` says."""
        opts = self.options
        importance = _RankingScores(self.importance, opts.min_keep, plan.spare)
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
        example = torch.zeros(1, *ctx.input_shape, device=_device(model))
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                return tp.pruner.BasePruner(
                    model, example, importance=importance, ignored_layers=[_classifier(model)],
                    customized_pruners={ShortcutA: engine.ShortcutAPruner()}, **kwargs,
                )
        finally:
            model.train(was_training)

    def _prune(self, model: nn.Module, ctx: Context, plan: "_Plan") -> None:
        if plan.empty:
            return
        was_training = model.training
        pruner = self.build_pruner(model, ctx, plan, plan.groups)
        model.eval()
        try:
            pruner.step()
        finally:
            model.train(was_training)


@dataclass
class _Plan:
    """What TP is told: uniform -> channels kept per group (by root name); global -> one pruning ratio."""

    allocation: str
    groups: list[_Group]
    keep: dict[str, int]  # uniform
    ratio: float = 0.0  # global
    removed: int = 0  # global: channels removed (TP's n_pruned)
    spare: tuple[int, ...] = ()  # global: channels kept whatever their rank (positions in TP's ranking order)

    @property
    def empty(self) -> bool:
        if self.allocation == "global":
            return self.removed <= 0
        return all(self.keep[g.root] >= g.channels for g in self.groups)


class _RankingScores(tp.importance.Importance):
    """What TP's ranking sees (both allocations; it matters for global), in float64:

    - the ceil(min_keep * C) most important channels of every group score +inf, so TP's global threshold
      never reaches them (every group keeps at least that many);
    - exact ties are broken by group order, then channel index (earlier pruned first): TP removes every
      channel scoring <= its threshold, so with ties (BatchNorm scales all 1 at initialisation, vanishing
      gradients) it could not remove a given number of channels. The nudge is below float32 resolution
      (relative 2^-25 at most, for up to 2^20 channels), so it never reorders distinct float32 scores;
    - NaN (TP's mean normaliser on an all-zero group) counts as 0, the lowest score;
    - the `spare` channels (by position in call order) score +inf too (see _Search._global_to_target).

    A fresh instance per pruner: the tie-break counts channels in TP's (deterministic) group order."""

    def __init__(self, inner: tp.importance.Importance, min_keep: float, spare: tuple[int, ...] = ()):
        self.inner, self.min_keep, self.spare = inner, min_keep, spare
        self.position = 0
        self.seen: list[torch.Tensor] = []  # the scores handed to TP, in call order

    def __call__(self, group) -> torch.Tensor | None:
        imp = self.inner(group)
        if imp is None:
            return None
        imp = torch.nan_to_num(imp.detach().double().cpu(), nan=0.0)
        position = self.position + torch.arange(len(imp), dtype=torch.float64)
        self.position += len(imp)
        imp = imp * (1.0 + position * 2.0**-45) + position * 1e-300
        protect = allocation.min_keep_floor(len(imp), self.min_keep)
        imp[torch.topk(imp, protect).indices] = torch.inf
        spared = [p - int(position[0]) for p in self.spare if position[0] <= p <= position[-1]]
        imp[spared] = torch.inf
        self.seen.append(imp)
        return imp


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CompressError("method: torch_pruning keeps the classifier (the last nn.Linear) whole, but the model has none")
    return linears[-1]


def _describe(model: nn.Module, groups: list[_Group]) -> str:
    changed = []
    for g in groups:
        module = model.get_submodule(g.root)
        now = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
        if now is not None and now != g.channels:
            changed.append(f"{g.root} {g.channels}->{now}")
    return f"{count_params(model) / 1e6:.3f}M params left; channels " + (", ".join(changed) or "unchanged")


class _Search:
    """Finds the plan that meets the target, by pruning deep copies and measuring them."""

    def __init__(self, method: TorchPruning, model: nn.Module, ctx: Context):
        self.method, self.model, self.ctx = method, model, ctx
        opts = method.options
        self.allocation = opts.allocation
        self.budget = allocation.Target.of(opts)
        self.metric = "macs" if self.budget is None else self.budget.metric
        self.target = None if self.budget is None else self.budget.fraction
        self.baseline = self._measure(model)
        self.evaluations = 0
        self.scores: torch.Tensor | None = None  # the ranking scores of the last evaluation (global: positions)
        self.narrowed = 0  # uniform: groups given one channel fewer than the one ratio keeps, to meet the target
        self.history: list[tuple[str, float]] = []
        probe = method.build_pruner(model, ctx, _Plan(opts.allocation, [], {}), [])
        self.groups = self._groups(probe, opts.min_keep)
        if opts.allocation == "global":
            # TP ranks every channel of the groups that have an importance (len(concat_imp))
            scored = [g for g in self.groups if self._has_importance(probe, g)]
            self.total = sum(g.channels for g in scored)
            self.max_removed = sum(g.channels - g.floor for g in scored)
        del probe

    # -- the groups -------------------------------------------------------------------------------------
    def _groups(self, pruner: tp.pruner.BasePruner, min_keep: float) -> list[_Group]:
        graph = pruner.DG
        names = {id(m): n for n, m in self.model.named_modules()}
        groups = []
        for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
            root = group[0].dep.target.module
            members = [names[id(dep.target.module)] for dep, _ in group
                       if graph.is_out_channel_pruning_fn(dep.handler) and id(dep.target.module) in names]
            channels = graph.get_out_channels(root)
            if channels is None or channels < 2:
                continue
            groups.append(_Group(names[id(root)], members, int(channels), allocation.min_keep_floor(int(channels), min_keep)))
        order = {name: i for i, name in enumerate(names.values())}
        return sorted(groups, key=lambda g: order[g.root])  # module order (TP's own starts from the output end)

    def _has_importance(self, pruner: tp.pruner.BasePruner, group: _Group) -> bool:
        module = self.model.get_submodule(group.root)
        graph = pruner.DG
        handler = graph.get_pruner_of_module(module).prune_out_channels
        full = graph.get_pruning_group(module, handler, list(range(group.channels)))
        return self.method.importance(full) is not None

    # -- measuring --------------------------------------------------------------------------------------
    def _measure(self, model: nn.Module) -> int:
        return count_params(model) if self.metric == "params" else count_macs(model, self.ctx.input_shape)

    def kept_fraction(self, model: nn.Module) -> float:
        return self._measure(model) / self.baseline

    def evaluate(self, plan: _Plan) -> float:
        """Kept fraction of the metric after pruning a deep copy as `plan` says."""
        self.evaluations += 1
        if plan.empty:
            return 1.0
        trial = copy.deepcopy(self.model)
        if self.method.options.importance == "group_taylor":  # deepcopy drops .grad
            for (_, p), (_, q) in zip(self.model.named_parameters(), trial.named_parameters()):
                q.grad = None if p.grad is None else p.grad.detach().clone()
        pruner = self.method.build_pruner(trial, self.ctx, plan, self.groups)
        trial.eval()
        pruner.step()
        seen = pruner.importance.seen
        self.scores = torch.cat(seen) if seen else None
        return self._measure(trial) / self.baseline

    def within(self, fraction: float) -> bool:
        return self.budget.met(fraction)

    # -- plans ------------------------------------------------------------------------------------------
    def uniform_keep(self, ratio: float) -> dict[str, int]:
        unit = self.method.options.round_to  # each width a multiple of it (at most the group's width)
        return {g.root: round_up(max(g.floor, int(g.channels * (1.0 - ratio) + 1e-9)), g.channels, unit)
                for g in self.groups}

    def uniform(self, keep: dict[str, int]) -> _Plan:
        return _Plan("uniform", self.groups, dict(keep))

    def global_plan(self, removed: int, spare: list[int] | tuple[int, ...] = ()) -> _Plan:
        removed = max(0, min(removed, self.max_removed - len(spare)))
        # TP removes len(concat_imp) - int(total * (1 - ratio)) channels: exactly `removed` with this ratio
        ratio = (removed - 0.5) / self.total if removed > 0 else 0.0
        return _Plan("global", self.groups, {}, ratio=ratio, removed=removed, spare=tuple(spare))

    def at_ratio(self, ratio: float) -> _Plan:
        """compress_rate without a target: TP's pruning_ratio as it is (min_keep still applies)."""
        if self.allocation == "global":
            return self.global_plan(self.total - int(self.total * (1.0 - ratio)))
        return self.uniform(self.uniform_keep(ratio))

    def to_target(self) -> _Plan:
        if self.allocation == "global":
            return self._global_to_target()
        return self._uniform_to_target()

    def _unreachable(self, best: float) -> CompressError:
        return self.budget.out_of_reach(best, self.method.options.min_keep)

    def _record(self, label: str, fraction: float) -> float:
        self.history.append((label, fraction))
        return fraction

    def _global_to_target(self) -> _Plan:
        """Bisection on the number of channels TP's global ranking removes (the kept fraction falls with
        it). When the channel at which the budget crosses the target is an expensive one (a channel of a
        stem-wide residual stream can hold 2 % of the MACs) and neither side lands within half the
        tolerance, that channel is spared (kept) and the ranking goes on past it, at most SPARES times."""
        spare: list[int] = []
        lo, f_lo = 0, 1.0
        hi = self.max_removed
        f_hi = self._record(f"removed={hi}", self.evaluate(self.global_plan(hi)))
        if f_hi >= self.target:
            if self.within(f_hi):
                return self.global_plan(hi)
            raise self._unreachable(f_hi)
        candidates: list[tuple[float, _Plan]] = []
        for attempt in range(SPARES + 1):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                f_mid = self._record(f"removed={mid} spared={len(spare)}", self.evaluate(self.global_plan(mid, spare)))
                if f_mid >= self.target:
                    lo, f_lo = mid, f_mid
                else:
                    hi, f_hi = mid, f_mid
            candidates += [(f_lo, self.global_plan(lo, spare)), (f_hi, self.global_plan(hi, spare))]
            if any(self.budget.met(f, TOLERANCE / 2) for f, _ in candidates) or attempt == SPARES:
                break
            if self.scores is None:  # nothing evaluated under this spare set yet
                self.evaluate(self.global_plan(lo, spare))
            ranking = [int(i) for i in torch.argsort(self.scores, stable=True) if torch.isfinite(self.scores[i])]
            spare = spare + [ranking[lo]]  # the channel removal number lo + 1 would take
            hi = self.max_removed - len(spare)
            f_hi = self._record(f"removed={hi} spared={len(spare)}", self.evaluate(self.global_plan(hi, spare)))
            if f_hi >= self.target:
                break
        f_best, best = min(candidates, key=lambda c: abs(c[0] - self.target))
        self._warn_if_outside(f_best)
        return best

    def _uniform_to_target(self) -> _Plan:
        """Bisection on the one ratio (over the ratios where some group's width changes), then the groups
        that the next ratio would narrow by one channel are narrowed one by one, largest saving first, as
        far as the target allows: every group keeps floor(C * (1 - ratio)) channels or one fewer."""
        levels = sorted({round(1.0 - k / g.channels, 12) for g in self.groups for k in range(g.floor, g.channels + 1)})
        keeps: list[dict[str, int]] = []
        for ratio in levels:  # distinct keep vectors, widest first
            keep = self.uniform_keep(ratio)
            if not keeps or keep != keeps[-1]:
                keeps.append(keep)
        fractions: dict[int, float] = {0: 1.0}

        def fraction(i: int) -> float:
            if i not in fractions:
                fractions[i] = self._record(f"level={i}", self.evaluate(self.uniform(keeps[i])))
            return fractions[i]

        last = len(keeps) - 1
        if fraction(last) >= self.target:
            if self.within(fraction(last)):
                return self.uniform(keeps[last])
            raise self._unreachable(fraction(last))
        lo, hi = 0, last  # fraction(lo) >= target > fraction(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fraction(mid) >= self.target:
                lo = mid
            else:
                hi = mid
        candidates = [(fraction(lo), keeps[lo]), (fraction(hi), keeps[hi])]
        if not any(self.budget.met(f, TOLERANCE / 2) for f, _ in candidates):
            candidates.append(self._narrow_some(keeps[lo], keeps[hi], fraction(lo)))
        f_best, keep_best = min(candidates, key=lambda c: abs(c[0] - self.target))
        if keep_best not in (keeps[lo], keeps[hi]):
            self.narrowed = sum(keep_best[r] < keeps[lo][r] for r in keep_best)
        self._warn_if_outside(f_best)
        return self.uniform(keep_best)

    def _narrow_some(self, wide: dict[str, int], narrow: dict[str, int], f_wide: float) -> tuple[float, dict[str, int]]:
        """From `wide`, narrow a subset of the groups that differ in `narrow` (one channel each): measure
        each one's saving, take them largest first as long as the total stays short of what the target
        needs, then the smallest remaining one if that ends closer. Savings of groups that meet in one
        layer do not quite add up (the layer loses a row and a column: one product fewer than the sum), so
        the choice is measured and, while it misses by more than half the tolerance, made again with
        the measured shortfall added (at most NARROW_ROUNDS choices)."""
        differ = [root for root in wide if narrow[root] < wide[root]]
        savings = {}
        for root in differ:
            keep = dict(wide)
            keep[root] = narrow[root]
            savings[root] = f_wide - self._record(f"narrow {root}", self.evaluate(self.uniform(keep)))
        need = f_wide - self.target
        tried: list[tuple[float, dict[str, int]]] = []
        for _ in range(NARROW_ROUNDS):
            chosen, total = [], 0.0
            for root in sorted(differ, key=lambda r: -savings[r]):  # largest first, never past what is needed
                if total + savings[root] <= need:
                    chosen.append(root)
                    total += savings[root]
            rest = sorted((r for r in differ if r not in chosen), key=lambda r: savings[r])
            if rest and abs(total + savings[rest[0]] - need) < abs(total - need):  # one step past it, if closer
                chosen.append(rest[0])
                total += savings[rest[0]]
            keep = dict(wide)
            for root in chosen:
                keep[root] = narrow[root]
            if any(keep == k for _, k in tried):
                break
            measured = self._record("narrowed", self.evaluate(self.uniform(keep)))
            tried.append((measured, keep))
            if self.budget.met(measured, TOLERANCE / 2):
                break
            need += measured - (f_wide - total)  # measured minus predicted: what the savings did not add up to
        return min(tried, key=lambda c: abs(c[0] - self.target))

    def _warn_if_outside(self, fraction: float) -> None:
        if not self.within(fraction):
            self.ctx.log.warning("%s: the nearest %s fraction the channel granularity allows is %.4f (target %.4f, "
                                 "tolerance %.0f %%)", self.method.name, self.metric, fraction, self.target, 100 * TOLERANCE)

    def summary(self, plan: _Plan) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "target": self.target, "evaluations": self.evaluations,
                               "allocation": plan.allocation}
        if plan.allocation == "global":
            out.update(ratio=plan.ratio, removed=plan.removed, spared=len(plan.spare))
        else:
            out.update(keep={g.root: plan.keep[g.root] for g in self.groups}, narrowed=self.narrowed)
        return out
