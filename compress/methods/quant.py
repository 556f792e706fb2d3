"""Quantisation (`method=quant`): every conv and linear layer's weights and inputs fake-quantised to
`bits` (compress.layers.quant), activation ranges calibrated on a few training batches, then the
pipeline's fine-tune is quantisation-aware training. Generated kernels are quantised where they are
stored (a series kernel's coefficients), so it composes after ApproxConv in `method=chain`.

`size_bytes` counts the quantised tensors at `bits` (+ one fp32 scale per output channel). The deployable
model still computes in float (quantise-dequantise): latency measures the simulation, not integer kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress import CompressError
from compress.checks import is_count, is_number
from compress.layers.quant import (
    ActivationFakeQuant,
    calibrate_input_ranges,
    quantise_layers,
    quantised_layers,
    quantised_storage_bytes,
)
from compress.methods.base import Context, Method, MethodOptions
from compress.models.introspect import globs, matches


@dataclass
class QuantOptions(MethodOptions):
    """`method=quant`: fake-quantise weights and layer inputs to `bits` for quantisation-aware fine-tuning."""

    name: str = "quant"
    bits: int = 8
    # glob pattern(s) over module names of the conv / linear layers to quantise
    layers: Any = "*"
    # EMA momentum of the activation ranges during fine-tuning
    momentum: float = 0.1
    # batches of training images that initialise the activation ranges
    calibration_batches: int = 8
    calibration_batch_size: int = 64

    def __post_init__(self) -> None:
        self.check(is_count(self.bits, 2, 16), "bits", "an integer in [2, 16]")
        self.check(isinstance(self.layers, str) or isinstance(self.layers, (list, tuple))
                   and all(isinstance(v, str) for v in self.layers), "layers", "a glob pattern or a list of them")
        self.check(is_number(self.momentum) and 0 < self.momentum <= 1, "momentum", "a number in (0, 1]")
        self.check(is_count(self.calibration_batches, 0, 100_000), "calibration_batches", "an integer in [0, 100000]")
        self.check(is_count(self.calibration_batch_size, 1, 65_536), "calibration_batch_size",
                   "an integer in [1, 65536]")


class Quantise(Method):
    """Fake quantisation of conv / linear weights and inputs (quantisation-aware fine-tuning)."""

    name = "quant"
    Options = QuantOptions
    one_shot = True
    changes_model = True

    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        o = self.options
        if any(isinstance(m, ActivationFakeQuant) for m in model.modules()):
            raise CompressError("arch.checkpoint: this model is already quantised; start from an unquantised model")
        patterns = globs(o.layers)
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and matches(n, patterns)]
        if not layers:
            raise CompressError(f"method.layers: {patterns} matches no conv or linear layer")
        quantise_layers(model, layers, int(o.bits), float(o.momentum))
        ctx.log.info("quant: %d layers fake-quantised to %d bits", len(layers), o.bits)
        if o.calibration_batches > 0 and ctx.calibration is not None:
            used = calibrate_input_ranges(model, ctx.calibration_batches(o.calibration_batches, o.calibration_batch_size))
            ctx.log.info("quant: activation ranges calibrated on %d batches", used)
        return model

    def meta(self, model: nn.Module) -> dict:
        layers = quantised_layers(model)
        first = dict(model.named_modules())[layers[0]].input_quant if layers else None
        return {"bits": first.bits if first else None, "momentum": first.momentum if first else None,
                "quantised": layers}

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        modules = dict(model.named_modules())
        missing = [n for n in meta.get("quantised", []) if n not in modules]
        if missing:
            raise CompressError(f"arch.checkpoint: quantised layer '{missing[0]}' is not in this model")
        if meta.get("bits"):
            quantise_layers(model, meta["quantised"], int(meta["bits"]), float(meta.get("momentum") or 0.1))
        return model

    def storage_bytes(self, model: nn.Module) -> int | None:
        return quantised_storage_bytes(model)
