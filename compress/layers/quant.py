"""Fake quantisation (quantise-dequantise in float) for quantisation-aware fine-tuning.

Generic pieces any method can put on top of its layers:

- `fake_quant_per_channel(x, bits)`: symmetric, one scale per output channel (dim 0), for weights or
  weight-generating coefficients. The rounding is bypassed in the backward pass (straight-through
  estimator), so the float tensor keeps training while the forward pass sees the quantised values.
- `FakeQuantWeight`: the same as a `torch.nn.utils.parametrize` parametrization of a layer's weight.
- `ActivationFakeQuant` + `attach_input_quant`: per-tensor asymmetric quantisation of a layer's input,
  with a running (EMA) range observed in training mode and frozen in eval mode.
- `fake_quantise`: both on one layer (the weight's only if it is not generated: a generator such as
  `SeriesKernel` quantises its own coefficients).
- `calibrate_input_ranges`: initialise those ranges from a few batches without touching BatchNorm.
- `packed_state_bytes`: bytes to store a state_dict when some tensors are kept at `bits` per value.

Baking (`compress.layers.deployable`): `FakeQuantWeight` is a parametrization, so it bakes like every
other one, into its current value: the quantised weight. `ActivationFakeQuant` is kept: a deployable
model still quantises each layer's input, so its outputs equal the trained model's (its latency times the
simulation, float kernels + quantise-dequantise, not integer kernels).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize


def symmetric_qmax(bits: int) -> int:
    """Largest integer level of a symmetric signed grid (-qmax .. qmax, the -2^(b-1) level unused so
    that the grid is symmetric around an exact zero)."""
    return 2 ** (bits - 1) - 1


def per_channel_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Step size per output channel (dim 0), shaped to broadcast against `x`: max|x| / qmax.

    An all-zero channel gets step 1 (any step reproduces zeros) instead of a division by zero."""
    amax = x.detach().abs().reshape(x.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / symmetric_qmax(bits), torch.ones_like(amax))
    return scale.reshape(-1, *([1] * (x.dim() - 1)))


def fake_quant_per_channel(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `x` onto its symmetric per-output-channel grid of `bits` bits; identity gradient (STE)."""
    scale = per_channel_scale(x, bits)
    qmax = symmetric_qmax(bits)
    quantised = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
    # Straight-through: forward value = quantised, gradient wrt x = identity.
    return x + (quantised - x).detach()


def fake_quant_range(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-tensor quantisation of `x` onto 2^bits levels spanning [low, high] (which must
    contain 0 so that zero, e.g. padding and ReLU's output, stays exact); identity gradient (STE)."""
    levels = 2**bits - 1
    scale = torch.clamp((high - low) / levels, min=torch.finfo(x.dtype).tiny)
    zero_point = torch.round(-low / scale)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, levels)
    quantised = (q - zero_point) * scale
    return x + (quantised - x).detach()


class FakeQuantWeight(nn.Module):
    """Parametrization: the layer's weight as the optimiser sees it is float; the forward pass uses its
    per-output-channel fake-quantised copy. (No right_inverse: the float weight is stored unchanged.)"""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quant_per_channel(weight, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric fake quantisation with a running range.

    Training mode: the range [min(0, running_min), max(0, running_max)] follows an exponential moving
    average (`momentum`) of each batch's min and max (the first batch sets it). Eval mode: the range is
    frozen; if it was never observed, the batch's own range is used (dynamic quantisation) rather than
    passing the input through unquantised.
    """

    def __init__(self, bits: int, momentum: float = 0.1):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        low, high = x.min().float(), x.max().float()
        if bool(self.observed):
            self.running_min.lerp_(low, self.momentum)
            self.running_max.lerp_(high, self.momentum)
        else:
            self.running_min.copy_(low)
            self.running_max.copy_(high)
            self.observed.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.observe(x)
        if bool(self.observed):
            low, high = self.running_min, self.running_max
        else:
            low, high = x.detach().min().float(), x.detach().max().float()
        zero = torch.zeros((), device=x.device)
        low, high = torch.minimum(low, zero).to(x.dtype), torch.maximum(high, zero).to(x.dtype)
        return fake_quant_range(x, low, high, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


INPUT_QUANT = "input_quant"


def _quantise_input(module: nn.Module, args: tuple) -> tuple:
    # A module-level function (not a closure) so that deep copies of the model keep a working hook.
    return (getattr(module, INPUT_QUANT)(args[0]), *args[1:])


def attach_input_quant(module: nn.Module, bits: int, momentum: float = 0.1) -> ActivationFakeQuant:
    """Fake-quantise `module`'s first input. The quantiser is a child named `input_quant`, so its range
    is saved in the state_dict (`<layer>.input_quant.running_min/max`) and moves with `.to()`."""
    quantiser = ActivationFakeQuant(bits, momentum)
    p = next(module.parameters(), None)
    if p is not None:
        quantiser.to(p.device)
    module.add_module(INPUT_QUANT, quantiser)
    module.register_forward_pre_hook(_quantise_input)
    return quantiser


def fake_quantise(module: nn.Module, bits: int, momentum: float = 0.1, weight: bool = True) -> None:
    """Fake-quantise `module`'s input and (with `weight`) its weight, following the layer's train/eval mode."""
    if weight:
        parametrize.register_parametrization(module, "weight", FakeQuantWeight(bits).train(module.training))
    attach_input_quant(module, bits, momentum).train(module.training)


@torch.no_grad()
def calibrate_input_ranges(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Run `batches` through `model` with only the activation quantisers observing (BatchNorm and
    everything else in eval mode, so running statistics are untouched). Returns the batches used."""
    quantisers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    was_training = model.training
    model.eval()
    for q in quantisers:
        q.train()
    used = 0
    try:
        for x in batches:
            model(x)
            used += 1
    finally:
        model.train(was_training)
    return used


def packed_state_bytes(state: dict[str, torch.Tensor], bits: int, quantised: Iterable[str],
                       skip: Iterable[str] = ()) -> int:
    """Bytes to store `state` with the tensors named in `quantised` packed at `bits` per value plus one
    fp32 scale per output channel (dim 0); every other tensor at its own dtype's size. Names in `skip`
    (e.g. BatchNorm's num_batches_tracked, not needed for inference) are not counted."""
    quantised, skip = set(quantised), set(skip)
    missing = quantised - set(state)
    if missing:
        raise KeyError(f"not in the state_dict: {sorted(missing)}")
    total = 0
    for key, tensor in state.items():
        if key in skip:
            continue
        if key in quantised:
            total += math.ceil(tensor.numel() * bits / 8) + 4 * tensor.shape[0]
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def _generated_by(module: nn.Module):
    """The parametrizations generating `module.weight` (empty when it is a plain parameter)."""
    return list(module.parametrizations.weight) if parametrize.is_parametrized(module, "weight") else []


def quantised_widths(model: nn.Module) -> dict[str, int]:
    """state_dict key -> bit width of every weight tensor the model fake-quantises (a FakeQuantWeight, or a
    kernel generator with its own `quant_bits`, e.g. a series kernel's coefficients)."""
    widths = {}
    for name, module in model.named_modules():
        for p in _generated_by(module):
            bits = getattr(p, "quant_bits", None) if not isinstance(p, FakeQuantWeight) else p.bits
            if bits is not None:
                widths[f"{name}.parametrizations.weight.original".lstrip(".")] = bits
    return widths


def quantise_layers(model: nn.Module, layers: Iterable[str], bits: int, momentum: float) -> None:
    """Fake-quantise the named layers' inputs and weights. A generated weight is quantised where it is
    stored: a generator with a `quant_bits` attribute (a series kernel) quantises its own coefficients."""
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        generators = [p for p in _generated_by(module) if hasattr(p, "quant_bits")]
        for g in generators:
            g.quant_bits = bits
            g.train(g.training)  # drops a cached kernel computed without quantisation
        fake_quantise(module, bits, momentum, weight=not generators)


def quantised_storage_bytes(model: nn.Module) -> int | None:
    """Bytes to store a fake-quantised model: its quantised tensors packed at their bit width + one fp32
    scale per output channel; every other tensor (biases, BatchNorm, activation ranges) at its dtype's size;
    num_batches_tracked and the observers' flags not counted. None when nothing is quantised."""
    widths = quantised_widths(model)
    if not widths:
        return None
    state = model.state_dict()
    rest = {k: v for k, v in state.items()
            if k not in widths and not k.endswith(("num_batches_tracked", "input_quant.observed"))}
    total = packed_state_bytes(rest, 32, [])
    for key, bits in widths.items():
        total += packed_state_bytes({key: state[key]}, bits, [key])
    return total


def quantised_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose input is fake-quantised (what `quantise_layers` was given)."""
    return [n for n, m in model.named_modules() if isinstance(getattr(m, INPUT_QUANT, None), ActivationFakeQuant)]
