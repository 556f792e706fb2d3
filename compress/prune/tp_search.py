"""Torch-Pruning's pruner driven to a budget target (`method=torch_pruning`, compress/methods/torch_pruning.py).

TP prunes by a ratio; a MACs or parameter target needs the ratio (or, with allocation=uniform, the widths)
that lands within `allocation.TOLERANCE` of it. `Search` finds it by pruning deep copies and measuring them
with the project's counters: bisection on the channels TP's global ranking removes, or one uniform ratio
then a few groups narrowed by one channel. `Plan` is what TP is told, `RankingScores` what its ranking sees.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch_pruning as tp
from torch import nn

from compress import CompressError
from compress.deploy.measure import count_macs, count_params
from compress.prune import allocation
from compress.prune.allocation import TOLERANCE
from compress.prune.rates import round_up


class Pruning(Protocol):
    """What the search needs of the method that drives it (compress.methods.torch_pruning.TorchPruning): its
    options, name and importance, and a TP pruner built for a model and a plan. The search calls it back; it
    imports nothing of it."""

    name: str
    options: Any
    importance: Any

    def build_pruner(self, model: nn.Module, ctx: Any, plan: "Plan", groups: "list[Group]") -> Any: ...

# Global allocation: how many expensive channels at the crossing of the target may be kept (see Search).
SPARES = 4
# Uniform allocation: how many times the choice of groups narrowed by one channel is corrected (see Search).
NARROW_ROUNDS = 3


@dataclass
class Group:
    """One prunable channel group of TP's dependency graph, by module names (valid on deep copies)."""

    root: str  # the conv/linear whose output channels TP starts the group from
    members: list[str]  # every module whose output channels belong to the group
    channels: int  # current width
    floor: int  # fewest channels it may keep (min_keep, at least one)


@dataclass
class Plan:
    """What TP is told: uniform -> channels kept per group (by root name); global -> one pruning ratio."""

    allocation: str
    groups: list[Group]
    keep: dict[str, int]  # uniform
    ratio: float = 0.0  # global
    removed: int = 0  # global: channels removed (TP's n_pruned)
    spare: tuple[int, ...] = ()  # global: channels kept whatever their rank (positions in TP's ranking order)

    @property
    def empty(self) -> bool:
        if self.allocation == "global":
            return self.removed <= 0
        return all(self.keep[g.root] >= g.channels for g in self.groups)


class RankingScores(tp.importance.Importance):
    """What TP's ranking sees (both allocations; it matters for global), in float64:

    - the ceil(min_keep * C) most important channels of every group score +inf, so TP's global threshold
      never reaches them (every group keeps at least that many);
    - exact ties are broken by group order, then channel index (earlier pruned first): TP removes every
      channel scoring <= its threshold, so with ties (BatchNorm scales all 1 at initialisation, vanishing
      gradients) it could not remove a given number of channels. The nudge is below float32 resolution
      (relative 2^-25 at most, for up to 2^20 channels), so it never reorders distinct float32 scores;
    - NaN (TP's mean normaliser on an all-zero group) counts as 0, the lowest score;
    - the `spare` channels (by position in call order) score +inf too (see Search._global_to_target).

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


def describe(model: nn.Module, groups: list[Group]) -> str:
    changed = []
    for g in groups:
        module = model.get_submodule(g.root)
        now = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
        if now is not None and now != g.channels:
            changed.append(f"{g.root} {g.channels}->{now}")
    return f"{count_params(model) / 1e6:.3f}M params left; channels " + (", ".join(changed) or "unchanged")


class Search:
    """Finds the plan that meets the target, by pruning deep copies and measuring them."""

    def __init__(self, method: Pruning, model: nn.Module, ctx: Any):
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
        probe = method.build_pruner(model, ctx, Plan(opts.allocation, [], {}), [])
        self.groups = self._groups(probe, opts.min_keep)
        if opts.allocation == "global":
            # TP ranks every channel of the groups that have an importance (len(concat_imp))
            scored = [g for g in self.groups if self._has_importance(probe, g)]
            self.total = sum(g.channels for g in scored)
            self.max_removed = sum(g.channels - g.floor for g in scored)
        del probe

    # -- the groups -------------------------------------------------------------------------------------
    def _groups(self, pruner: tp.pruner.BasePruner, min_keep: float) -> list[Group]:
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
            groups.append(Group(names[id(root)], members, int(channels), allocation.min_keep_floor(int(channels), min_keep)))
        order = {name: i for i, name in enumerate(names.values())}
        return sorted(groups, key=lambda g: order[g.root])  # module order (TP's own starts from the output end)

    def _has_importance(self, pruner: tp.pruner.BasePruner, group: Group) -> bool:
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

    def evaluate(self, plan: Plan) -> float:
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

    def uniform(self, keep: dict[str, int]) -> Plan:
        return Plan("uniform", self.groups, dict(keep))

    def global_plan(self, removed: int, spare: list[int] | tuple[int, ...] = ()) -> Plan:
        removed = max(0, min(removed, self.max_removed - len(spare)))
        # TP removes len(concat_imp) - int(total * (1 - ratio)) channels: exactly `removed` with this ratio
        ratio = (removed - 0.5) / self.total if removed > 0 else 0.0
        return Plan("global", self.groups, {}, ratio=ratio, removed=removed, spare=tuple(spare))

    def at_ratio(self, ratio: float) -> Plan:
        """compress_rate without a target: TP's pruning_ratio as it is (min_keep still applies)."""
        if self.allocation == "global":
            return self.global_plan(self.total - int(self.total * (1.0 - ratio)))
        return self.uniform(self.uniform_keep(ratio))

    def to_target(self) -> Plan:
        if self.allocation == "global":
            return self._global_to_target()
        return self._uniform_to_target()

    def _unreachable(self, best: float) -> CompressError:
        return self.budget.out_of_reach(best, self.method.options.min_keep)

    def _record(self, label: str, fraction: float) -> float:
        self.history.append((label, fraction))
        return fraction

    def _global_to_target(self) -> Plan:
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
        candidates: list[tuple[float, Plan]] = []
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

    def _uniform_to_target(self) -> Plan:
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

    def summary(self, plan: Plan) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "target": self.target, "evaluations": self.evaluations,
                               "allocation": plan.allocation}
        if plan.allocation == "global":
            out.update(ratio=plan.ratio, removed=plan.removed, spared=len(plan.spare))
        else:
            out.update(keep={g.root: plan.keep[g.root] for g in self.groups}, narrowed=self.narrowed)
        return out
