"""ApproxConv (Costain & Prisacariu): convolution kernels as truncated cosine / Chebyshev series.

Each K x K filter of a chosen conv is replaced by an N x N block of series coefficients (the layer type
is `compress.layers.series.SeriesKernel`: the conv's `weight` becomes a parametrization of the
coefficients). Fitting to a pretrained kernel minimises the paper's eq. 5 (MSE) in closed form,
A = pinv(B) W pinv(B)^T, or with the public code's iterative Adam fit (`fit=adam`). With `quant_bits`
the coefficients, the remaining conv / linear weights and the layers' inputs are fake-quantised
(`compress.layers.quant`) for quantisation-aware fine-tuning.

Harmonics follow the paper's tables: `[stem, stage1, stage2, stage3(, stage4)]` for ResNets (every
K >= 3 conv of a stage shares the stage's order; 1x1 downsample convs stay ordinary), one order per
depthwise conv for ConvNeXt-like models, written with repetitions (`"7x3,7x3,5x9,4x3"`).
"""
from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import nn

from compress import CompressError
from compress.checks import is_count
from compress.layers import bake_parametrized
from compress.layers.quant import (
    ActivationFakeQuant,
    calibrate_input_ranges,
    quantise_layers,
    quantised_storage_bytes,
)
from compress.layers.series import (
    SERIES,
    approximate_conv,
    fit_adam,
    initial_coefficients,
    series_kernel_of,
)
from compress.methods.base import Context, Method, MethodOptions
from compress.models.introspect import matches

FITS = ("lstsq", "adam")
QUANT_SCOPES = ("all", "approx")


# -- harmonics notation and layer plan ---------------------------------------------------------------------
# At most 9 digits per number (int() of a longer digit string is slow, and past 4300 digits an error).
_TERM = re.compile(r"^\s*(\d{1,9})\s*(?:[x×*]\s*(\d{1,9}))?\s*$")
# The most orders a harmonics spec may expand to: far more groups than any model has (ConvNeXt-T: 18),
# checked before a repetition is expanded so that "2x999999999" cannot exhaust memory.
MAX_ORDERS = 10_000


def parse_harmonics(spec: Any) -> list[int] | None:
    """The paper's notation -> one order per group. Accepts an int, a list of ints or "NxR" strings, or
    a string like "3,3,3,2", "[3,3,3,2]" or "7x3, 7x3, 5x9, 4x3" (NxR = order N repeated R times; a
    trailing comma as in the paper's Table 3 is ignored). None means: approximate nothing."""
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise CompressError(f"method.harmonics: expected orders like [3,3,3,2], got {spec!r}")
    if isinstance(spec, int):
        terms: list[Any] = [spec]
    elif isinstance(spec, str):
        text = spec.strip()
        if text.lower() in ("none", "null"):
            return None
        terms = [t for t in text.strip("[]()").split(",") if t.strip()]
    elif isinstance(spec, (list, tuple)):
        terms = list(spec)
    else:
        raise CompressError(f"method.harmonics: expected a list or string of orders, got {type(spec).__name__}")
    orders: list[int] = []
    for term in terms:
        if isinstance(term, bool) or not isinstance(term, (int, str)):
            raise CompressError(f"method.harmonics: cannot read {reprlib.repr(term)} as an order")
        if isinstance(term, int):
            order, repeat = term, 1
        else:
            match = _TERM.match(term)
            if not match:
                raise CompressError(f"method.harmonics: cannot read {reprlib.repr(term.strip())} (expected N or NxR)")
            order, repeat = int(match.group(1)), int(match.group(2) or 1)
        if order < 1 or repeat < 1:
            raise CompressError(f"method.harmonics: orders and repeat counts must be >= 1, got {term!r}")
        if len(orders) + repeat > MAX_ORDERS:
            raise CompressError(f"method.harmonics: more than {MAX_ORDERS} orders")
        orders.extend([order] * repeat)
    if not orders:
        raise CompressError("method.harmonics: no orders given")
    return orders


def ineligibility(conv: nn.Conv2d) -> str | None:
    """Why the method cannot approximate this conv (None if it can). 1x1 has nothing to compress and
    2x2 patchify/downsampling kernels leave no room for N < K that keeps structure."""
    kh, kw = conv.kernel_size
    if kh != kw:
        return f"non-square {kh}x{kw} kernel"
    if kh < 3:
        return f"{kh}x{kw} kernel"
    return None


@dataclass
class LayerGroup:
    label: str
    layers: list[str]


def harmonic_groups(model: nn.Module) -> list[LayerGroup]:
    """The units the paper's harmonics lists count, in order.

    - ResNets (children `layer1`, `layer2`, ...): the stem (eligible convs outside the stages), then one
      group per stage holding all its eligible convs.
    - Models with depthwise K x K convs (ConvNeXt): one group per depthwise conv (= per block); other
      convs (the 4x4 patchify stem, 2x2 downsampling) are not in the tables and stay ordinary.
    - Anything else: one group per eligible conv.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and ineligibility(m) is None]
    stages = sorted((n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)), key=lambda s: int(s[5:]))
    if stages:
        def stage_of(name: str) -> str | None:
            head = name.split(".", 1)[0]
            return head if head in stages else None

        groups = [LayerGroup("stem", [n for n, _ in convs if stage_of(n) is None])]
        groups += [LayerGroup(s, [n for n, _ in convs if stage_of(n) == s]) for s in stages]
        return [g for g in groups if g.layers]
    depthwise = [n for n, m in convs if m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    if depthwise:
        return [LayerGroup(n, [n]) for n in depthwise]
    return [LayerGroup(n, [n]) for n, _ in convs]


def plan_orders(model: nn.Module, harmonics: list[int] | None, overrides: dict[str, int | None]
                ) -> tuple[dict[str, int], dict[str, str]]:
    """Which conv gets which order, and why every other conv stays ordinary.

    Returns ({layer: N}, {layer: reason}). Raises CompressError for a harmonics list whose length does
    not match the model's groups, an override glob that matches no eligible conv, or N > K.
    """
    modules = dict(model.named_modules())
    convs = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d)}
    orders: dict[str, int] = {}
    source: dict[str, str] = {}
    groups = harmonic_groups(model)
    if harmonics is not None:
        if len(harmonics) == 1:
            harmonics = harmonics * len(groups)
        if len(harmonics) != len(groups):
            labels = ", ".join(g.label for g in groups)
            if len(labels) > 300:
                labels = labels[:300] + "..."
            raise CompressError(f"method.harmonics: {len(harmonics)} orders given, but this model has "
                                f"{len(groups)} groups ({labels})")
        for group, order in zip(groups, harmonics):
            for name in group.layers:
                orders[name], source[name] = order, "method.harmonics"
    for pattern, order in (overrides or {}).items():
        matched = [n for n, m in convs.items() if matches(n, (pattern,)) and ineligibility(m) is None]
        if not matched:
            raise CompressError(f"method.overrides: '{pattern}' matches no conv with a square kernel >= 3x3")
        for name in matched:
            if order is None or order == 0:
                orders.pop(name, None)
            else:
                orders[name], source[name] = int(order), "method.overrides"
    for name, order in orders.items():
        k = convs[name].kernel_size[0]
        if order > k:
            raise CompressError(f"{source[name]}: order {order} for layer '{name}' exceeds its kernel size {k}")
    skipped = {}
    for name, conv in convs.items():
        if name not in orders:
            skipped[name] = ineligibility(conv) or "not in method.harmonics / overrides"
    return orders, skipped


def _layer_names(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


# -- the method ------------------------------------------------------------------------------------------
@dataclass
class ApproxConvOptions(MethodOptions):
    """ApproxConv (CosConv / ChebConv): every K x K kernel generated from an N x N block of cosine or
    Chebyshev series coefficients per filter (docs/approxconv.md)."""

    name: str = "approxconv"
    # cos (CosConv: cos(i x), x equispaced on [0.2pi, 0.8pi]) | cheb (ChebConv: T_i(x), x on [-1, 1])
    series: str = "cos"
    # Orders N as the paper's tables write them: CIFAR ResNets [stem, stage1, stage2, stage3];
    # ImageNet ResNet-18 [stem7x7, s1, s2, s3, s4]; ConvNeXt one order per depthwise 7x7 conv, with
    # repetitions "7x3,7x3,5x9,4x3". A single number applies to every group; null approximates nothing.
    harmonics: Any = field(default_factory=lambda: [3, 3, 3, 2])
    # {layer-name glob: N or null}, applied after harmonics, e.g. {"layer3.*.conv2": 2}
    overrides: Dict[str, Optional[int]] = field(default_factory=dict)
    # lstsq (closed-form minimiser of eq. 5) | adam (the public code's iterative fit)
    fit: str = "lstsq"
    # fit=adam: steps, in three equal stages at adam_lr, /10, /100
    adam_steps: int = 600
    adam_lr: float = 0.1
    # null | 8 | 4 (any 2..16): fake-quantise weights/coefficients and layer inputs
    quant_bits: Optional[int] = None
    # all (every conv and linear layer) | approx (only the approximated convs)
    quant_scope: str = "all"
    # EMA momentum of the activation ranges
    quant_momentum: float = 0.1
    # batches used to initialise activation ranges when quant_bits is set
    calibration_batches: int = 8
    calibration_batch_size: int = 64

    def __post_init__(self) -> None:

        self.choice("series", SERIES)
        parse_harmonics(self.harmonics)  # raises CompressError("method.harmonics: ...")
        self.check(isinstance(self.overrides, dict) and all(isinstance(k, str) and (v is None or is_count(v, 0))
                                                       for k, v in self.overrides.items()),
              "overrides", "a map of layer globs to an order >= 1 (or null / 0: the layer stays ordinary)")
        self.choice("fit", FITS)
        self.count("adam_steps")
        self.number("adam_lr", 0, 1e3, low_open=True)
        self.count("quant_bits", 2, 16, allow_none=True)
        self.choice("quant_scope", QUANT_SCOPES)
        self.number("quant_momentum", 0, 1, low_open=True)
        self.count("calibration_batches", 0, 100_000)
        self.count("calibration_batch_size", 1, 65_536)


class ApproxConv(Method):
    """CosConv / ChebConv: K x K kernels generated from N x N series coefficients per filter."""

    name = "approxconv"
    Options = ApproxConvOptions
    one_shot = True
    # With rounds, everything happens in `prepare` and `step` reports nothing left (fine-tuning is the schedule's).
    iterative = True
    changes_model = True

    def __init__(self, options: ApproxConvOptions | None = None):
        super().__init__(options)
        self.harmonics = parse_harmonics(self.options.harmonics)

    # -- compression --------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        o = self.options
        if any(isinstance(m, ActivationFakeQuant) for m in model.modules()):
            raise CompressError("arch.checkpoint: this model is already quantised (model.pt of a quantised "
                                "approxconv run); start from the pretrained or an unquantised approxconv model")
        if sum(bake_parametrized(m) for m in list(model.modules())):
            # A model.pt of an earlier approxconv run (e.g. the unquantised fine-tuned model as the start of
            # a quantised run): refit from its current kernels; for an unchanged order the fit is exact.
            ctx.log.info("approxconv: the model already had generated kernels; refitting them")
        orders, skipped = plan_orders(model, self.harmonics, dict(o.overrides))
        modules = dict(model.named_modules())
        for name, reason in skipped.items():
            ctx.log.info("approxconv: %s stays an ordinary convolution (%s)", name, reason)
        generator = torch.Generator().manual_seed(ctx.seed)
        errors = []
        for name, order in orders.items():
            conv = modules[name]
            weight = conv.weight.detach().clone()
            kernel = approximate_conv(conv, o.series, order, o.quant_bits)
            if o.fit == "adam":
                start = initial_coefficients(o.series, weight, order, generator)
                steps = min(o.adam_steps, 3) if ctx.quick else o.adam_steps  # smoke runs: a token fit
                coefficients = fit_adam(weight, kernel.basis, start, steps, float(o.adam_lr))
                with torch.no_grad():
                    conv.parametrizations.weight.original.copy_(coefficients)
            with torch.no_grad():
                errors.append((name, order, float(torch.mean((conv.weight - weight) ** 2))))
        for name, order, mse in errors:
            ctx.log.info("approxconv: %s %s N=%d fit MSE %.3g", name, o.series, order, mse)
        if o.quant_bits is not None:
            layers = sorted(orders) if o.quant_scope == "approx" else _layer_names(model, (nn.Conv2d, nn.Linear))
            quantise_layers(model, layers, o.quant_bits, float(o.quant_momentum))
            if o.calibration_batches > 0 and ctx.calibration is not None:
                used = calibrate_input_ranges(model, ctx.calibration_batches(o.calibration_batches,
                                                                             o.calibration_batch_size))
                ctx.log.info("approxconv: activation ranges calibrated on %d batches", used)
        return model

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return self.compress(model, ctx)

    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        return None  # one-shot: everything happens in prepare; fine-tuning is the schedule's

    # -- persistence ---------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        layers = {n: {"series": k.series, "order": k.order}
                  for n, m in model.named_modules() if (k := series_kernel_of(m)) is not None}
        quantisers = {n: m.input_quant for n, m in model.named_modules()
                      if isinstance(getattr(m, "input_quant", None), ActivationFakeQuant)}
        first = next(iter(quantisers.values()), None)
        return {"layers": layers, "quant_bits": first.bits if first else None,
                "quant_momentum": first.momentum if first else self.options.quant_momentum,
                "quantised": list(quantisers)}

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        modules = dict(model.named_modules())
        bits = meta.get("quant_bits")
        for name, spec in meta.get("layers", {}).items():
            if name not in modules:
                raise CompressError(f"model.pt: layer '{name}' of the saved ApproxConv model is not in this model")
            approximate_conv(modules[name], spec["series"], int(spec["order"]), bits)
        if bits is not None:
            quantise_layers(model, meta.get("quantised", []), bits, meta.get("quant_momentum", 0.1))
        return model

    # -- measurement ---------------------------------------------------------------------------------
    def storage_bytes(self, model: nn.Module) -> int | None:
        """For a quantised model: its quantised tensors (series coefficients, and with scope 'all' the
        plain conv/linear weights) packed at their bit width + one fp32 scale per output channel; biases,
        BatchNorm affine and running statistics and activation ranges at fp32; num_batches_tracked and the
        basis (a function of series, K, N) not counted. None for an unquantised model (the baseline row,
        or quant_bits null): the pipeline's serialised size, coefficients in fp32."""
        return quantised_storage_bytes(model)


