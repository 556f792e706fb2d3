"""Budget targets: how many channels each group keeps so that the model's MACs or parameters reach a target.

Three parts, used by `StructuredPruning` when `method.target_macs` / `method.target_params` is set:

- `CostModel`: the model's MACs or parameters as an exact function of the widths of its channel groups.
  Every Conv2d / Linear costs `quad * out * in + lin * out` (MACs: `quad` = kernel area x output positions,
  as torch.utils.flop_counter counts a convolution; parameters: `quad` = kernel area, `lin` = bias), every
  BatchNorm `lin * channels`; `out` and `in` are affine in the group widths, with the multiplicities
  Torch-Pruning's dependency graph gives (a channel of a group is one input channel of the next conv, one
  slice of a concatenation, `H*W` inputs of a Linear after a flatten...). What the model does not depend
  on (other layers, ops the counter sees but no group touches) is a constant `offset`, calibrated against
  the real counter (`compress.deploy.measure`) at the current widths. For conv/linear/BN networks (the CIFAR
  ResNets, VGG, GoogLeNet, torchvision ResNets) the prediction equals `count_macs` / `count_params` of the
  pruned model exactly (tests/test_prune_targets.py).
- Removal orders (`Events`): every channel a group may lose is one event; `uniform_order` sorts the
  events by the fraction of its original width the group has lost after it (so every prefix of the order
  leaves all groups within one channel of one common rate), `global_order` by the channel's score divided
  by the largest |score| of its group (`normalise`), lowest first. With `unit > 1` (`method.round_to`)
  an event removes a block of channels so that every width left is a multiple of `unit` (the first block
  of a group whose width is not takes the remainder), ranked by the block's mean normalised score.
- `allocate`: the prefix of the order whose cost is closest to the target, evaluated for every prefix at
  once (one cumulative sum and two matrix products, no loop over channels); when one event jumps across
  the target band (a residual stream's channel takes a few % of ResNet-56's MACs at once), the next
  events in order that fit the band are taken instead (`fill`, a loop over single removals that ends
  after a few steps: the distance left is less than one event's cost).

The tolerance: a target is met when `|cost / target - 1| <= TOLERANCE` (1 %, relative to the target: at
`target_macs=0.47` the measured MACs are within 0.4653 .. 0.4747 of the baseline's); the search aims at
`AIM` (half that), leaving the rest for anything the cost model does not see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compress import CompressError
from compress.models.introspect import evaluating, model_device
from compress.prune.rates import keep_count, round_up

TOLERANCE = 0.01  # a target is met when the measured cost is within 1 % of it (relative to the target)
AIM = 0.005  # what the search aims at
METRICS = ("macs", "params")
_F64 = torch.float64


TARGET_KEYS = {"target_macs": "macs", "target_params": "params"}  # method option -> the cost it counts


def within(cost: float, target: float, tolerance: float = TOLERANCE) -> bool:
    return abs(cost - target) <= tolerance * target


@dataclass(frozen=True)
class Target:
    """A budget target as the method options give it: `key` (target_macs / target_params), the fraction of
    the baseline to keep, and the `metric` it counts. Shared by the structured methods and the
    Torch-Pruning peer, so both read, meet and refuse a target the same way."""

    key: str
    fraction: float
    metric: str

    @classmethod
    def of(cls, options) -> "Target | None":
        """The options' target (the first of TARGET_KEYS that is set), or None without one."""
        key = next((k for k in TARGET_KEYS if getattr(options, k, None) is not None), None)
        return None if key is None else cls(key, float(getattr(options, key)), TARGET_KEYS[key])

    def met(self, kept_fraction: float, tolerance: float = TOLERANCE) -> bool:
        """Whether a model keeping `kept_fraction` of the baseline's cost meets the target."""
        return within(kept_fraction, self.fraction, tolerance)

    def out_of_reach(self, lowest_fraction: float, min_keep: float, capped: str = "") -> CompressError:
        """The one-line refusal when even every group at its floor keeps more than the target."""
        return CompressError(
            f"method.{self.key}: {self.fraction:g} of the baseline's {self.metric} is out of reach: with every "
            f"prunable group at its floor (method.min_keep={min_keep:g} of its channels, at least one{capped}) "
            f"they are {lowest_fraction:.4f} of it")


def min_keep_floor(channels: int, min_keep: float, least: int = 1) -> int:
    """`min_keep` of a group's `channels`, rounded up, at least `least`, at most `channels`."""
    share = math.ceil(min_keep * channels - 1e-9)  # 0.1 * 30 is 3.0000000000000004 in floats
    return min(channels, max(least, share))


def floor_channels(original: int, current: int, rate: float, min_keep: float, unit: int = 1, least: int = 1) -> int:
    """The fewest channels a group may keep under a target: `min_keep` of its original width (rounded up),
    what its rate allows (`compress_rate` caps the fraction removed; rate 0: not pruned), at least `least`
    (one; two per slice of a grouped conv), rounded up to a multiple of `unit`, and never more than it has now."""
    share = max(least, math.ceil(min_keep * original - 1e-9))
    return round_up(max(share, keep_count(original, rate)), current, unit)


Units = int | dict  # one block size for every group, or group name -> its own (grouped convs: engine.PruningPlan.units)


def unit_of(unit: Units, group: str) -> int:
    return int(unit.get(group, 1)) if isinstance(unit, dict) else int(unit)


def block_sizes(current: int, floor: int, unit: int = 1) -> torch.Tensor:
    """Channels each successive removal takes from a group of `current` channels on its way down to
    `floor` (a multiple of `unit`, or `current`), so that every width left is a multiple of `unit`: the
    remainder `current % unit` first when there is one, then `unit` at a time. (n,) float64."""
    if floor >= current:
        return torch.zeros(0, dtype=_F64)
    first = current % unit or unit
    count = 1 + (current - first - floor) // unit
    sizes = torch.full((count,), float(unit), dtype=_F64)
    sizes[0] = first
    return sizes


@dataclass
class Events:
    """Removals in the order they are taken: event k removes `size[k]` channels of group `owner[k]`."""

    owner: torch.Tensor  # (N,) long: group index
    size: torch.Tensor  # (N,) float64: channels

    def __len__(self) -> int:
        return self.owner.numel()

    def removed(self, groups: int) -> torch.Tensor:
        """(N+1, G): channels removed from each group after each prefix of the events (row 0: none)."""
        steps = F.one_hot(self.owner, groups).to(_F64) * self.size[:, None]
        return torch.cat([torch.zeros(1, groups, dtype=_F64), steps.cumsum(0)])


# -- the cost model ----------------------------------------------------------------------------------------
@dataclass
class CostModel:
    """Cost (MACs or parameters) of a model as a function of its group widths (see the module docstring)."""

    metric: str
    groups: list[str]  # G group names, the plan's order
    widths: torch.Tensor  # (G,) current widths
    out0: torch.Tensor  # (M,) each costed module's output width now (channels for a BatchNorm)
    in0: torch.Tensor  # (M,) its input width now
    a_out: torch.Tensor  # (M, G) output width lost per channel removed from each group
    a_in: torch.Tensor  # (M, G) input width lost per channel removed from each group
    quad: torch.Tensor  # (M,) cost per (output x input) pair
    lin: torch.Tensor  # (M,) cost per output
    offset: float = 0.0  # what the groups do not change (measured minus modelled, at the current widths)

    def cost(self, widths: torch.Tensor) -> torch.Tensor:
        """Cost at `widths` (..., G): (...)."""
        delta = widths.to(_F64) - self.widths
        out = self.out0 + delta @ self.a_out.T
        inp = self.in0 + delta @ self.a_in.T
        return (out * inp) @ self.quad + out @ self.lin + self.offset

    def widths_of(self, keep: dict[str, int]) -> torch.Tensor:
        """(G,) widths with the groups in `keep` at those counts, the others as they are."""
        w = self.widths.clone()
        for j, g in enumerate(self.groups):
            if g in keep:
                w[j] = keep[g]
        return w

    @classmethod
    def build(cls, plan, input_shape: Sequence[int], metric: str, measured: float) -> "CostModel":
        """The cost model of `plan`'s model now; `measured`: its cost by `compress.deploy.measure` (sets `offset`)."""
        if metric not in METRICS:
            raise ValueError(f"unknown cost metric {metric!r}")
        model = plan.model
        rows: list[tuple[nn.Module, float, float, float, float]] = []  # module, out0, in0, quad, lin
        positions = _output_positions(model, input_shape) if metric == "macs" else {}
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                area = math.prod(module.kernel_size)
                per_group = module.in_channels // module.groups
                if metric == "macs":
                    scale, bias = area * positions.get(id(module), 0), 0.0
                else:
                    scale, bias = area, float(module.bias is not None)
                if module.groups > 1 and module.groups == module.out_channels:
                    # depthwise: Torch-Pruning removes a group with each channel, the input width per group stays
                    rows.append((module, module.out_channels, 0.0, 0.0, scale * per_group + bias))
                else:  # dense or grouped: the groups stay (Torch-Pruning narrows every slice alike), out * in / groups
                    rows.append((module, module.out_channels, module.in_channels, scale / module.groups, bias))
            elif isinstance(module, nn.Linear):
                if metric == "macs":
                    scale, bias = positions.get(id(module), 0), 0.0
                else:
                    scale, bias = 1.0, float(module.bias is not None)
                rows.append((module, module.out_features, module.in_features, scale, bias))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and metric == "params":
                per_channel = sum(p.numel() for p in module.parameters(recurse=False)) / module.num_features
                rows.append((module, module.num_features, 0.0, 0.0, per_channel))
        index = {id(row[0]): i for i, row in enumerate(rows)}
        groups = list(plan.members)
        a_out = torch.zeros(len(rows), len(groups), dtype=_F64)
        a_in = torch.zeros(len(rows), len(groups), dtype=_F64)
        for j, group in enumerate(groups):
            channels = plan.channels[group]
            for dep, idxs in plan.graph.get_pruning_group(plan.convs[group], tp.prune_conv_out_channels,
                                                          list(range(channels))):
                i = index.get(id(dep.target.module))
                if i is None:
                    continue
                norm = isinstance(rows[i][0], nn.modules.batchnorm._BatchNorm)  # one width: its channels
                table = a_out if norm or plan.graph.is_out_channel_pruning_fn(dep.handler) else a_in
                table[i, j] = max(float(table[i, j]), len(idxs) / channels)
        column = lambda k: torch.tensor([float(row[k]) for row in rows], dtype=_F64)  # noqa: E731
        model_ = cls(metric, groups, torch.tensor([float(plan.channels[g]) for g in groups], dtype=_F64),
                     column(1), column(2), a_out, a_in, column(3), column(4))
        model_.offset = float(measured) - float(model_.cost(model_.widths))
        return model_


@torch.no_grad()
def _output_positions(model: nn.Module, input_shape: Sequence[int]) -> dict[int, int]:
    """Per Conv2d / Linear (by id): output positions of one image's forward pass, summed over calls
    (a conv's H_out * W_out, a Linear's rows per image)."""
    counts: dict[int, int] = {}

    def hook(module, _inputs, output):
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        counts[id(module)] = counts.get(id(module), 0) + output.numel() // width

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with evaluating(model):
            model(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    return counts


# -- removal orders ----------------------------------------------------------------------------------------
def uniform_order(cost: CostModel, original: dict[str, int], floors: dict[str, int], unit: Units = 1) -> Events:
    """Removal events ordered by the fraction of its original width the group has lost after each (ties:
    plan order). Groups absent from `floors` are not pruned; `unit`: see `block_sizes`."""
    keys, owners, sizes = [], [], []
    for j, group in enumerate(cost.groups):
        current = int(cost.widths[j])
        size = block_sizes(current, floors.get(group, current), unit_of(unit, group))
        if size.numel() == 0:
            continue
        orig = original.get(group, current)
        keys.append((orig - current + size.cumsum(0)) / orig)
        owners.append(torch.full((size.numel(),), j, dtype=torch.long))
        sizes.append(size)
    return _sorted_events(keys, owners, sizes)


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """A group's scores divided by their largest |finite value| (unchanged when that is 0); -inf stays."""
    finite = scores[torch.isfinite(scores)]
    top = float(finite.abs().max()) if finite.numel() else 0.0
    return scores / top if top > 0 else scores


def global_order(cost: CostModel, scores: dict[str, torch.Tensor], floors: dict[str, int], unit: Units = 1) -> Events:
    """Removal events ordered by normalised score, lowest first, across all groups in `scores`. Each
    group offers its `current - floor` lowest-scoring channels, in the engine's order (stable: lower index
    first on ties), so a prefix of the order removes exactly the channels `engine.prune_groups` will.
    With `unit > 1` an event is a block of consecutive channels of that order, keyed by its mean."""
    keys, owners, sizes = [], [], []
    for j, group in enumerate(cost.groups):
        if group not in scores:
            continue
        current = int(cost.widths[j])
        size = block_sizes(current, floors.get(group, current), unit_of(unit, group))
        if size.numel() == 0:
            continue
        values = normalise(torch.nan_to_num(scores[group].double(), nan=-math.inf))
        ranked = torch.sort(values, stable=True).values[: int(size.sum())]
        block = torch.repeat_interleave(torch.arange(size.numel()), size.long())
        # a block's key: the mean of its channels' scores (-inf when any is silent: it goes first)
        key = torch.zeros(size.numel(), dtype=_F64).index_add_(0, block, ranked) / size
        keys.append(key)
        owners.append(torch.full((size.numel(),), j, dtype=torch.long))
        sizes.append(size)
    return _sorted_events(keys, owners, sizes)


def _sorted_events(keys: list[torch.Tensor], owners: list[torch.Tensor], sizes: list[torch.Tensor]) -> Events:
    if not keys:
        return Events(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=_F64))
    order = torch.sort(torch.cat(keys), stable=True).indices
    return Events(torch.cat(owners)[order], torch.cat(sizes)[order])


# -- the search --------------------------------------------------------------------------------------------
def allocate(cost: CostModel, events: Events, target: float, aim: float = AIM) -> torch.Tensor:
    """Channels to remove per group (G,), following `events`, so that the cost lands as close to `target`
    as the order allows (within `aim` of it, relative, whenever possible)."""
    groups = len(cost.groups)
    if len(events) == 0:
        return torch.zeros(groups, dtype=_F64)
    removed = events.removed(groups)
    prefix = cost.cost(cost.widths - removed)  # (N+1,), non-increasing: removing a channel never adds cost
    first_below = int((prefix > target).sum())  # the first prefix at or below the target
    options = [n for n in (first_below - 1, first_below) if 0 <= n < len(prefix)]
    best = min(options, key=lambda n: abs(float(prefix[n]) - target))
    lo, hi = target * (1 - aim), target * (1 + aim)
    if lo <= float(prefix[best]) <= hi or first_below == 0:
        return removed[best]
    filled = fill(cost, events, max(first_below - 1, 0), lo, hi)
    miss = abs(float(cost.cost(cost.widths - filled)) - target)
    return filled if miss < abs(float(prefix[best]) - target) else removed[best]


def fill(cost: CostModel, events: Events, taken: int, lo: float, hi: float, max_steps: int | None = None) -> torch.Tensor:
    """From the first `taken` events, take single further events while the cost is above `hi`: each time
    the group whose next event comes first in the order among those whose removal keeps the cost >= `lo`.
    Returns the channels removed per group (G,)."""
    groups = len(cost.groups)
    owner = events.owner
    counts = torch.bincount(owner, minlength=groups)
    # positions[j, k] / sizes[j, k]: where group j's (k+1)-th event stands in the order (inf past its last)
    # and how many channels it removes
    width = int(counts.max()) + 1
    positions = torch.full((groups, width), math.inf, dtype=_F64)
    sizes = torch.zeros((groups, width), dtype=_F64)
    grouped, where = torch.sort(owner, stable=True)  # events grouped by group, each group's in order
    rank = torch.arange(len(owner)) - (counts.cumsum(0) - counts)[grouped]
    positions[grouped, rank] = where.to(_F64)
    sizes[grouped, rank] = events.size[where]
    done = torch.bincount(owner[:taken], minlength=groups)  # events taken per group
    removed = torch.zeros(groups, dtype=_F64).index_add_(0, owner[:taken], events.size[:taken])
    rows = torch.arange(groups)
    steps = len(owner) if max_steps is None else max_steps
    for _ in range(steps):  # a few steps in practice: the distance left is below one event's cost
        widths = cost.widths - removed
        if float(cost.cost(widths)) <= hi:
            break
        step = done.clamp(max=width - 1)
        next_size = sizes[rows, step]
        after = cost.cost(widths - torch.diag(next_size))  # (G,): the cost after each group's next event
        nxt = positions[rows, step]
        nxt = torch.where((done < counts) & (after >= lo), nxt, torch.full_like(nxt, math.inf))
        if not torch.isfinite(nxt).any():
            break
        j = int(torch.argmin(nxt))
        removed[j] += next_size[j]
        done[j] += 1
    return removed
