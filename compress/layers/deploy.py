"""From a training-form model to plain modules: `clone` and the one baking walker, `deployable`.

Each layer type bakes one way:

- weight parametrizations (`SeriesKernel`, `FractionalGaussianKernel`, `FakeQuantWeight`): the weight
  they generate now becomes a plain Parameter (`bake_parametrized`): series and FGF kernels as the
  kernels they generate, fake-quantised weights as their quantised values;
- prune masks: `masks.bake_masks`, the zeros made permanent;
- input fake-quantisers (`ActivationFakeQuant` + its pre-hook): kept, so that the deployable model's
  outputs equal the trained model's (its latency times the quantise-dequantise simulation).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress.layers.masks import bake_masks


@torch.no_grad()
def clone(model: nn.Module) -> nn.Module:
    """A deep copy that also works after a training forward pass, without touching `model`.

    torch.nn.utils.prune keeps the masked `weight` as a plain attribute computed by its pre-hook; after a
    forward with autograd it is a non-leaf tensor, which deepcopy refuses. Such derived tensors are
    copied detached (through deepcopy's memo); the next forward recomputes them anyway.
    """
    memo = {id(t): t.detach().clone() for m in model.modules() for t in vars(m).values()
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.grad_fn is not None}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def bake_parametrized(module: nn.Module) -> bool:
    """Replace each parametrized tensor of `module` by a plain Parameter (or buffer) holding its current
    value, in place; the module gets its own class back. Returns whether there was anything to bake.

    Not `parametrize.remove_parametrizations`: a deep copy of a parametrized module shares the injected
    `Parametrized<Layer>` class with its original, and removing a parametrization deletes the property
    from that shared class, which would leave the original without its weight (torch 2.x). Here the
    class object is never touched: the module just stops being an instance of it.
    """
    if not parametrize.is_parametrized(module):
        return False
    # Cloned: a cached kernel (SeriesKernel in eval mode) must not be shared with the generator.
    baked = {name: (getattr(module, name).detach().clone(), getattr(chain, "original", None))
             for name, chain in module.parametrizations.items()}
    module.__class__ = type(module).__bases__[0]
    del module.parametrizations
    for name, (value, original) in baked.items():
        if original is None or isinstance(original, nn.Parameter):
            module.register_parameter(name, nn.Parameter(value, requires_grad=getattr(original, "requires_grad", True)))
        else:
            module.register_buffer(name, value)
    return True


def deployable(model: nn.Module) -> nn.Module:
    """A plain copy of `model` for deployment and timing; `model` itself is left as it is.

    One deep copy (`clone`), then every layer type bakes itself (see the module docstring): no
    parametrizations and no prune hooks are left; input fake-quantisers stay. In eval mode its outputs
    equal `model`'s to float rounding. The copy keeps `model`'s train/eval mode and device.
    """
    plain = clone(model)
    for module in [m for m in plain.modules() if parametrize.is_parametrized(m)]:
        bake_parametrized(module)
    return bake_masks(plain)
