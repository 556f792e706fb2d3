"""Channel-pruning surgery through Torch-Pruning's dependency graph.

`PruningPlan.build` traces the model once and lists its channel groups: the output channels of a conv
plus everything tied to them (its BatchNorm, the next layers' input channels, the other convs added to it
by residual connections, concatenation offsets). A group is named after its first conv in module order;
`members` are the convs whose output channels belong to it. `prune_groups` removes, in every group, the
channels with the lowest scores, and the model stays an ordinary nn.Module with smaller layers.

The CIFAR ResNets' parameter-free option-A shortcut (`ShortcutA`) gets its own Torch-Pruning pruner: its
input channels (the stream of one stage) and output channels (the stream of the next) prune
independently, and it keeps an explicit routing of the surviving channel pairs.

Grouped convolutions (RegNet, ResNeXt: `groups` > 1 but fewer groups than channels) are pruned as
Torch-Pruning's own pruner does (its `in_channel_groups` / `out_channel_groups`): Torch-Pruning's conv
pruner keeps the number of groups and expects the same positions removed from every group, so a channel
group tied to a conv of `g` groups (`PruningPlan.units[group] = g`) loses whole "positions": one channel
at the same offset in each of the `g` slices, its scores averaged over the slices (`tied_scores`). Its
widths are therefore multiples of `g`, and it keeps at least two channels per slice
(`min_channels`): at one, Torch-Pruning would take the conv for a depthwise one (groups == out_channels)
and couple its input and output channels. Depthwise convs (groups == channels) need nothing: Torch-Pruning
removes their groups together with their channels.

`structure_meta` / `restore_structure` save and rebuild the pruned shapes for `model.pt`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn

from compress import CompressError
from compress.models.cifar_resnet import ShortcutA
from compress.models.introspect import evaluating, model_device
from compress.prune import layouts
from compress.prune.rates import KEY, RateSpec, keep_count, round_up

META_FORMAT = "structured-pruning/1"


# -- ShortcutA under Torch-Pruning ------------------------------------------------------------------------
def _remove_positions(index: torch.Tensor, removed: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For routes reading positions `index`: which routes survive the removal of positions `removed`
    (bool mask), and their positions renumbered after the removal."""
    removed_t = torch.as_tensor(sorted(set(int(i) for i in removed)), dtype=torch.long, device=index.device)
    alive = ~torch.isin(index, removed_t)
    shifted = index[alive] - torch.searchsorted(removed_t, index[alive])
    return alive, shifted


class ShortcutAPruner(tp.pruner.BasePruningFunc):
    """Input and output channels of a ShortcutA prune independently (no intra-layer coupling)."""

    def prune_out_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        alive, out_index = _remove_positions(layer.out_index, idxs)
        layer.set_routes(layer.in_channels, layer.out_channels - len(set(idxs)), layer.in_index[alive], out_index)
        return layer

    def prune_in_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        alive, in_index = _remove_positions(layer.in_index, idxs)
        layer.set_routes(layer.in_channels - len(set(idxs)), layer.out_channels, in_index, layer.out_index[alive])
        return layer

    def get_out_channels(self, layer: ShortcutA) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ShortcutA) -> int:
        return layer.in_channels


def route_shortcuts(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Turn every ShortcutA still in padding form into explicit routes (widths seen in one forward)."""
    pending = [m for m in model.modules() if isinstance(m, ShortcutA) and not m.routed]
    if not pending:
        return
    seen: dict[int, int] = {}
    handles = [m.register_forward_pre_hook(lambda m, inp: seen.__setitem__(id(m), inp[0].shape[1])) for m in pending]
    try:
        with evaluating(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    for module in pending:
        if id(module) in seen:
            module.set_padding_routes(seen[id(module)])
        module.to(model_device(model))


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass
class PruningPlan:
    """Channel groups of one model and the rate the spec gives each (0 = not pruned)."""

    model: nn.Module
    graph: tp.DependencyGraph
    convs: dict[str, nn.Conv2d]  # every conv of the model by name
    members: dict[str, list[str]]  # group name -> convs whose output channels form the group
    channels: dict[str, int]  # group name -> current number of channels
    rates: dict[str, float] = field(default_factory=dict)  # group name -> fraction to remove
    # group name -> slices of a grouped conv the group is tied to (1: none); widths stay multiples of it
    units: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, input_shape: tuple[int, ...], spec: RateSpec) -> "PruningPlan":
        """Trace `model` (one image of `input_shape`) and assign the rates of `spec` to its groups. With
        the list notation the architecture's layout may first reroute a shortcut (see layouts)."""
        if spec.listed is not None:
            layouts.decouple_for_list(model)
        route_shortcuts(model, input_shape)
        example = torch.randn(1, *input_shape, device=model_device(model))
        with evaluating(model), torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners={ShortcutA: ShortcutAPruner()}, verbose=False
            )
        convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        name_of = {id(m): name for name, m in convs.items()}
        members: dict[str, list[str]] = {}
        units: dict[str, int] = {}
        grouped: set[str] = set()
        for name, conv in convs.items():
            if name in grouped or conv not in graph.module2node:
                continue
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, [0])
            tied = {
                name_of[id(dep.target.module)]
                for dep, _ in group
                if id(dep.target.module) in name_of and graph.is_out_channel_pruning_fn(dep.handler)
            }
            ordered = [n for n in convs if n in tied]
            members[ordered[0]] = ordered
            units[ordered[0]] = _channel_groups(graph, group)
            grouped.update(ordered)
        plan = cls(model, graph, convs, members, {g: convs[g].out_channels for g in members}, units=units)
        plan.rates = plan._rates_of(spec)
        return plan

    def _rates_of(self, spec: RateSpec) -> dict[str, float]:
        if spec.uniform is not None:
            return {g: spec.uniform for g in self.members}
        if spec.patterns is not None:
            return {g: spec.pattern_rate(names) or 0.0 for g, names in self.members.items()}
        by_conv = layouts.listed_rates(self.model, list(spec.listed))
        rates: dict[str, float] = {}
        for group, names in self.members.items():
            found = {by_conv[n] for n in names if n in by_conv}
            if len(found) > 1:
                raise CompressError(f"{KEY}: convolutions {', '.join(names)} share channels but get rates {sorted(found)}")
            rates[group] = found.pop() if found else 0.0
        return rates

    def min_channels(self, group: str) -> int:
        """The fewest channels `group` may keep: 1, or two per slice when it is tied to a grouped conv."""
        unit = self.units.get(group, 1)
        return 1 if unit == 1 else min(self.channels[group], 2 * unit)

    def tied_scores(self, group: str, scores: torch.Tensor) -> torch.Tensor:
        """A group's channel scores with every position of a grouped conv's slices given the mean over the
        slices (unchanged without grouping): ranking them removes the same positions from every slice."""
        unit = self.units.get(group, 1)
        if unit == 1:
            return scores
        return scores.view(unit, -1).mean(0).repeat(unit)

    def target_keep(self, original: dict[str, int] | None = None) -> dict[str, int]:
        """Channels each pruned group keeps under the rate spec, relative to its `original` width
        (default: its current width)."""
        original = original or {}
        return {g: keep_count(original.get(g, self.channels[g]), r) for g, r in self.rates.items() if r > 0}

    def group_scores(self, scores: dict[str, torch.Tensor], groups: list[str]) -> dict[str, torch.Tensor]:
        """Average the per-conv scores over each group's convs (NaN counts as the lowest score)."""
        out = {}
        for group in groups:
            stacked = []
            for name in self.members[group]:
                if name not in scores:
                    raise CompressError(f"method: the criterion returned no scores for layer '{name}'")
                score = torch.as_tensor(scores[name]).detach().float().cpu().flatten()
                if score.numel() != self.channels[group]:
                    raise CompressError(
                        f"method: scores of layer '{name}' have {score.numel()} values for {self.channels[group]} channels"
                    )
                stacked.append(score)
            out[group] = self.tied_scores(group, torch.nan_to_num(torch.stack(stacked).mean(0), nan=-torch.inf))
        return out

    def keep_counts(self, targets: dict[str, int], scores: dict[str, torch.Tensor], threshold: float | None) -> dict[str, int]:
        """Channels to keep: the rate targets, or with a threshold the channels scoring >= threshold
        (never fewer than the rate target allows, never fewer than one). Groups without scores keep
        their target."""
        if threshold is None:
            return dict(targets)
        return {g: max(keep, int((scores[g] >= threshold).sum())) if g in scores else keep for g, keep in targets.items()}


def _channel_groups(graph: tp.DependencyGraph, group) -> int:
    """The slices of the grouped layers a pruning group touches (as Torch-Pruning's MetaPruner detects them:
    its layer pruners' in/out channel groups, depthwise convs left out), 1 without any; their least common
    multiple when several differ."""
    unit = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Conv2d) and module.groups == module.out_channels:
            continue  # depthwise: Torch-Pruning prunes its groups with its channels
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        slices = (pruner.get_out_channel_groups(module) if graph.is_out_channel_pruning_fn(dep.handler)
                  else pruner.get_in_channel_groups(module))
        unit = math.lcm(unit, max(1, int(slices)))
    return unit


def prune_groups(model: nn.Module, plan: PruningPlan, scores: dict[str, torch.Tensor], keep: dict[str, int]) -> None:
    """Remove the lowest-scoring channels of each group down to `keep[group]` channels (ties: lower index
    pruned first, so the result is deterministic). A group tied to a grouped conv (`plan.units`) loses whole
    positions, the same ones in every slice (its count rounded up to a multiple of the slices)."""
    for group, count in keep.items():
        current = plan.channels[group]
        unit = plan.units.get(group, 1)
        count = round_up(max(plan.min_channels(group), count), current, unit)
        if count >= current:
            continue
        if unit == 1:
            remove = torch.sort(scores[group], stable=True).indices[: current - count].tolist()
        else:
            per_slice = current // unit
            positions = torch.sort(scores[group].view(unit, per_slice).mean(0), stable=True).indices
            dropped = positions[: (current - count) // unit]
            remove = (dropped[None, :] + per_slice * torch.arange(unit)[:, None]).flatten().tolist()
        plan.graph.get_pruning_group(plan.convs[group], tp.prune_conv_out_channels, remove).prune()
        plan.channels[group] = plan.convs[group].out_channels


def describe(model: nn.Module, plan: PruningPlan, original: dict[str, int]) -> str:
    changed = [f"{g} {original.get(g, c)}->{c}" for g, c in plan.channels.items() if original.get(g, c) != c]
    params = sum(p.numel() for p in model.parameters())
    return f"{params / 1e6:.3f}M params left; channels " + ", ".join(changed)


# -- persistence ------------------------------------------------------------------------------------------
def structure_meta(model: nn.Module) -> dict:
    """Plain data that, with the state dict, rebuilds the pruned structure: the routing of every routed
    ShortcutA and the groups of grouped convs (all other shapes are read from the state dict)."""
    shortcuts = {
        name: {
            "stride": m.stride,
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "in_index": m.in_index.tolist(),
            "out_index": m.out_index.tolist(),
        }
        for name, m in model.named_modules()
        if isinstance(m, ShortcutA) and m.routed
    }
    grouped = {name: m.groups for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups != 1}
    return {"format": META_FORMAT, "shortcuts": shortcuts, "conv_groups": grouped}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _shape(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(state_dict[key].shape) if key in state_dict else None


# Where a layer's weight may be stored when a later compression reparameterised it (method=chain): masks keep
# it as `weight_orig`, a series kernel as (out, in, N, N) coefficients. Both keep the (out, in) dimensions.
_WEIGHT_KEYS = ("weight", "weight_orig", "parametrizations.weight.original")


def _weight_shape(state_dict: dict[str, torch.Tensor], prefix: str) -> tuple[int, ...] | None:
    return next((shape for key in _WEIGHT_KEYS if (shape := _shape(state_dict, prefix + key)) is not None), None)


def restore_structure(model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Resize every Conv2d / BatchNorm / Linear of a freshly built `model` to the shapes in `state_dict`
    and install the ShortcutA routes of `meta`, so that `model.load_state_dict(state_dict)` fits."""
    if meta.get("format") != META_FORMAT:
        raise CompressError(f"arch.checkpoint: not a structured-pruning checkpoint (meta format {meta.get('format')!r})")
    conv_groups = meta.get("conv_groups", {})
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d):
            shape = _weight_shape(state_dict, prefix)
            groups = int(conv_groups.get(name, 1))
            have = (module.out_channels, module.in_channels, module.groups)
            if shape is not None and (shape[0], shape[1] * groups, groups) != have:
                _set_module(model, name, _resized_conv(module, shape[1] * groups, shape[0], groups))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = _shape(state_dict, prefix + "running_mean") or _shape(state_dict, prefix + "weight")
            if shape is not None and shape[0] != module.num_features:
                _set_module(model, name, _resized_batchnorm(module, shape[0]))
        elif isinstance(module, nn.Linear):
            shape = _weight_shape(state_dict, prefix)
            if shape is not None and shape != (module.out_features, module.in_features):
                new = nn.Linear(shape[1], shape[0], bias=module.bias is not None)
                _set_module(model, name, new.to(module.weight.device, module.weight.dtype))
        else:
            _resize_own_tensors(module, prefix, state_dict)
    for name, spec in meta.get("shortcuts", {}).items():
        try:
            current = model.get_submodule(name)
        except AttributeError as exc:
            raise CompressError(f"arch.checkpoint: pruned model has a shortcut '{name}' this architecture lacks") from exc
        shortcut = current if isinstance(current, ShortcutA) else ShortcutA(0, 0, stride=int(spec["stride"]))
        shortcut.set_routes(spec["in_channels"], spec["out_channels"], spec["in_index"], spec["out_index"])
        _set_module(model, name, shortcut.to(model_device(model)))
    return model


def _resize_own_tensors(module: nn.Module, prefix: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Any other module (LayerNorm, GroupNorm, ConvNeXt's layer_scale parameter...): its own parameters and
    buffers take the saved shapes, as Torch-Pruning's pruners left them (values come with load_state_dict),
    and a norm's width attributes follow."""
    for table in (module._parameters, module._buffers):
        for key, tensor in list(table.items()):
            saved = state_dict.get(prefix + key)
            if tensor is None or saved is None or not hasattr(saved, "shape") or saved.shape == tensor.shape:
                continue
            fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
            table[key] = nn.Parameter(fresh, requires_grad=tensor.requires_grad) if table is module._parameters else fresh
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]


def _resized_conv(old: nn.Conv2d, in_channels: int, out_channels: int, groups: int) -> nn.Conv2d:
    new = nn.Conv2d(
        in_channels, out_channels, old.kernel_size, old.stride, old.padding, old.dilation, groups,
        bias=old.bias is not None, padding_mode=old.padding_mode,
    )
    return new.to(old.weight.device, old.weight.dtype)


def _resized_batchnorm(old: nn.modules.batchnorm._BatchNorm, features: int) -> nn.Module:
    new = type(old)(features, eps=old.eps, momentum=old.momentum, affine=old.affine, track_running_stats=old.track_running_stats)
    return new.to(old.weight.device if old.weight is not None else "cpu")
