"""Unstructured-pruning masks (AUP's layer type), on `torch.nn.utils.prune`.

A masked module keeps `<param>_orig` (a Parameter) and `<param>_mask` (a buffer), and a forward pre-hook
recomputes `<param> = <param>_orig * <param>_mask`, so pruned weights stay zero through fine-tuning
(their gradient is zero, and whatever weight decay does to `_orig` is multiplied away). Both tensors are
in `state_dict`, which is all `restore_masks` needs to rebuild them on a fresh model.

Baking (`compress.layers.deployable`, or `bake_masks` in place): `prune.remove`, the zeros made
permanent in a plain Parameter and the hook gone.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune

from compress import CompressError


def rounded_count(fraction: float, alive: int) -> int:
    """round(fraction * alive), halves up: how many of `alive` weights a per-layer rate removes."""
    return math.floor(fraction * alive + 0.5)


def magnitude_mask(weight: torch.Tensor, mask: torch.Tensor, fraction: float, remove: int | None = None
                   ) -> torch.Tensor:
    """A new mask that also zeroes the round(fraction * alive) smallest-magnitude weights still alive (or
    exactly `remove` of them when given).

    Exactly that many are removed (ties broken by index), so the per-round rate is what was asked for.
    """
    alive = int(mask.count_nonzero())
    remove = rounded_count(fraction, alive) if remove is None else min(int(remove), alive)
    if remove <= 0:
        return mask.clone()
    # Dead weights get +inf so that they are never chosen again.
    scores = torch.where(mask.bool(), weight.detach().abs(), torch.full_like(weight, math.inf)).flatten()
    smallest = torch.topk(scores, remove, largest=False, sorted=False).indices
    new_mask = mask.detach().clone().flatten()
    new_mask[smallest] = 0
    return new_mask.view_as(mask)


def current_mask(module: nn.Module) -> torch.Tensor:
    """The module's weight mask (all ones if it has none yet)."""
    mask = getattr(module, "weight_mask", None)
    return mask if mask is not None else torch.ones_like(module.weight)


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The trainable tensor behind `weight` (`weight_orig` once the module is pruned)."""
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Install `mask` on `module.weight` (first time: register the prune hook; later: update in place)."""
    if hasattr(module, "weight_mask"):
        module.weight_mask.copy_(mask)
        # The hook refreshes `weight` on the next forward; refresh it now for readers before that.
        module.weight = module.weight_orig * module.weight_mask
    else:
        prune.custom_from_mask(module, "weight", mask)


def restore_masks(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Re-register a prune mask for every `<module>.<param>_mask` key (with its `_orig`) in `state_dict`.

    The masks registered here are all-ones placeholders; `load_state_dict` then fills them in.
    """
    restored = []
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith("_mask") or key[: -len("_mask")] + "_orig" not in state_dict:
            continue
        module_name, _, param = key[: -len("_mask")].rpartition(".")
        module = modules.get(module_name)
        if module is None or not hasattr(module, param):
            raise CompressError(f"model.pt: mask '{key}' names no parameter of this architecture")
        if not hasattr(module, param + "_mask"):
            prune.identity(module, param)
        restored.append(module_name)
    return restored


def pruned_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every parameter carrying a prune mask."""
    out = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            hooks = hook._pruning_methods if isinstance(hook, prune.PruningContainer) else [hook]
            if hooks and isinstance(hooks[0], prune.BasePruningMethod):
                out.append((name, module, hooks[0]._tensor_name))
    return out


def bake_masks(model: nn.Module) -> nn.Module:
    """Make the zeros permanent in place: every masked parameter becomes a plain Parameter, hooks removed."""
    for _, module, param in pruned_modules(model):
        prune.remove(module, param)
    return model


def sparsity_report(model: nn.Module) -> tuple[int, int]:
    """(alive, total) weights over the masked tensors."""
    alive = total = 0
    for _, module, param in pruned_modules(model):
        mask = getattr(module, param + "_mask")
        alive += int(mask.count_nonzero())
        total += mask.numel()
    return alive, total


# -- storage ---------------------------------------------------------------------------------------------
def sparse_tensor_bytes(values: torch.Tensor) -> int:
    """Bytes to store a pruned tensor: its nonzero values plus the cheaper of two position encodings.

    - bitmap: one bit per element;
    - CSR over the (rows = dim 0, cols = the rest) view: a column index per nonzero (1, 2 or 4 bytes, the
      narrowest that addresses every column) and (rows + 1) int32 row pointers.
    Never more than the dense tensor.
    """
    numel = values.numel()
    nonzero = int(values.count_nonzero())
    rows = values.shape[0] if values.dim() > 1 else 1
    cols = numel // max(rows, 1)
    index_bytes = 1 if cols <= 2**8 else 2 if cols <= 2**16 else 4
    bitmap = math.ceil(numel / 8)
    csr = nonzero * index_bytes + (rows + 1) * 4
    return min(nonzero * values.element_size() + min(bitmap, csr), numel * values.element_size())


@torch.no_grad()
def sparse_storage_bytes(model: nn.Module) -> int:
    """Sparse storage of every masked tensor + dense storage of everything else in `state_dict`."""
    state = model.state_dict()
    total = 0
    for key, tensor in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue  # its positions are counted with the values, below
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            total += sparse_tensor_bytes(tensor * state[key[: -len("_orig")] + "_mask"])
        else:
            total += tensor.numel() * tensor.element_size()
    return total
