"""ApproxConv (Costain & Prisacariu): convolution kernels as truncated cosine / Chebyshev series.

Each K x K filter of a layer is replaced by an N x N block of series coefficients A (N <= K):

    w[o, c] = B A[o, c] B^T,     B[p, i] = cos(i * x_p)   (CosConv,  x_p equispaced on [0.2pi, 0.8pi])
                                 B[p, i] = T_i(x_p)       (ChebConv, x_p equispaced on [-1, 1])

The layer stays an `nn.Conv2d`: its `weight` becomes a `torch.nn.utils.parametrize` parametrization of
the coefficients (`<layer>.parametrizations.weight.original`, shape [Cout, Cin/groups, N, N]), which are
what the optimiser trains, what `model.parameters()` counts and what `model.pt` stores. `export` bakes
plain kernels. Fitting to a pretrained kernel minimises the paper's eq. 5 (MSE) in closed form,
A = pinv(B) W pinv(B)^T, or with the public code's iterative Adam fit (`fit=adam`).

Harmonics follow the paper's tables: `[stem, stage1, stage2, stage3(, stage4)]` for ResNets (every
K >= 3 conv of a stage shares the stage's order; 1x1 downsample convs stay ordinary), one order per
depthwise conv for ConvNeXt-like models, written with repetitions (`"7x3,7x3,5x9,4x3"`).
"""
from __future__ import annotations

import copy
import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress import CompressError
from compress.measure import own_class
from compress.methods import register
from compress.methods.base import Context, Method
from compress.quant import (
    ActivationFakeQuant,
    FakeQuantWeight,
    attach_input_quant,
    calibrate_input_ranges,
    fake_quant_per_channel,
    packed_state_bytes,
)

SERIES = ("cos", "cheb")
FITS = ("lstsq", "adam")
QUANT_SCOPES = ("all", "approx")
# Cosine sample interval [a*pi, b*pi]: the public code pulls the points in from 0 and pi so the even
# periodic extension has no kink at the boundary.
COS_INTERVAL = (0.2 * math.pi, 0.8 * math.pi)


# ---------------------------------------------------------------------------------------------------
# Series basis and fitting: pure tensor functions.
# ---------------------------------------------------------------------------------------------------
def sample_points(series: str, kernel_size: int) -> torch.Tensor:
    """The K positions (float64) at which the series is sampled to give the kernel's taps."""
    if series == "cos":
        return torch.linspace(*COS_INTERVAL, kernel_size, dtype=torch.float64)
    if series == "cheb":
        return torch.linspace(-1.0, 1.0, kernel_size, dtype=torch.float64)
    raise CompressError(f"method.series: '{series}' is not one of {', '.join(SERIES)}")


def basis_matrix(series: str, kernel_size: int, order: int) -> torch.Tensor:
    """B[p, i] (K x N, float64): the i-th basis function (i < N) at the p-th sample point."""
    x = sample_points(series, kernel_size)
    i = torch.arange(order, dtype=torch.float64)
    if series == "cos":
        return torch.cos(x[:, None] * i[None, :])
    # Chebyshev polynomials of the first kind on [-1, 1]: T_i(x) = cos(i * arccos x) (exact at +-1
    # after clamping; avoids the three-term recurrence loop).
    return torch.cos(i[None, :] * torch.arccos(x.clamp(-1.0, 1.0))[:, None])


def kernel_from_coefficients(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w[..., p, q] = sum_ij B[p, i] A[..., i, j] B[q, j]  (A: [..., N, N], B: [K, N] -> [..., K, K])."""
    return _separable_map(coefficients, basis)


def _separable_map(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """M x M^T over the last two axes of x, as one GEMM: row-major vec(M X M^T) = (M kron M) vec(X),
    so all filters of a layer go through a single [filters, a^2] x [a^2, r^2] product (r x a = M's shape)
    instead of many tiny batched products."""
    rows, cols = matrix.shape
    flat = x.reshape(*x.shape[:-2], cols * cols)
    return (flat @ torch.kron(matrix, matrix).transpose(0, 1)).reshape(*x.shape[:-2], rows, rows)


def fit_lstsq(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The coefficients minimising ||W - B A B^T||^2 for every filter at once (eq. 5 of the paper).

    For the separable model vec(B A B^T) = (B kron B) vec(A), and pinv(B kron B) = pinv(B) kron pinv(B),
    so the least-squares solution is A = pinv(B) W pinv(B)^T (unique: B has full column rank for N <= K
    distinct points). Solved in float64, returned in the weight's dtype.
    """
    pinv = torch.linalg.pinv(basis.to(device=weight.device, dtype=torch.float64))
    return _separable_map(weight.to(torch.float64), pinv).to(weight.dtype)


def initial_coefficients(series: str, weight: torch.Tensor, order: int, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
    """The paper's starting point for the iterative fit (sec. 3.4): ChebConv puts each filter's mean in
    the DC coefficient and zeros elsewhere; CosConv samples N(0, 1/(Cin K^2)) (a variance)."""
    cout, cin, k, _ = weight.shape
    if series == "cheb":
        a = torch.zeros(cout, cin, order, order, dtype=weight.dtype, device=weight.device)
        a[:, :, 0, 0] = weight.mean(dim=(2, 3))
        return a
    std = 1.0 / math.sqrt(cin * k * k)
    noise = torch.randn(cout, cin, order, order, generator=generator, dtype=weight.dtype)
    return (noise * std).to(weight.device)


def fit_adam(weight: torch.Tensor, basis: torch.Tensor, initial: torch.Tensor, steps: int = 600,
             lr: float = 0.1) -> torch.Tensor:
    """The public code's iterative fit: Adam on the layer's mean squared error, in three equal stages at
    lr, lr/10, lr/100 (its 3 x 200 steps at 0.1, 0.01, 0.001 by default)."""
    target = weight.detach()
    basis = basis.to(device=weight.device, dtype=weight.dtype)
    coefficients = initial.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([coefficients], lr=lr)
    stage_length = max(1, math.ceil(steps / 3))
    with torch.enable_grad():
        for step in range(steps):
            if step and step % stage_length == 0:
                for group in optimiser.param_groups:
                    group["lr"] /= 10
            optimiser.zero_grad(set_to_none=True)
            loss = torch.mean((kernel_from_coefficients(coefficients, basis) - target) ** 2)
            loss.backward()
            optimiser.step()
    return coefficients.detach()


def fit_mse(weight: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per filter: mean over the K x K taps of the squared error, shape [Cout, Cin/groups]."""
    approx = kernel_from_coefficients(coefficients.to(torch.float64), basis.to(weight.device, torch.float64))
    return ((approx - weight.to(torch.float64)) ** 2).mean(dim=(-2, -1))


# ---------------------------------------------------------------------------------------------------
# The parametrization.
# ---------------------------------------------------------------------------------------------------
class SeriesKernel(nn.Module):
    """`weight = B A B^T` per filter from coefficients A; registered on a conv's `weight`.

    `right_inverse` is the least-squares fit, so registering it on a trained conv fits the coefficients
    (and `conv.weight = W` refits). In eval mode without autograd the kernel is cached and reused until
    the coefficients change (tracked by the tensor's version counter, bumped by every in-place update:
    optimiser steps, load_state_dict) or the module goes back to train().
    """

    def __init__(self, series: str, kernel_size: int, order: int, quant_bits: int | None = None):
        super().__init__()
        self.series, self.kernel_size, self.order, self.quant_bits = series, kernel_size, order, quant_bits
        # Not persistent: a function of (series, K, N), rebuilt by restore; keeps model.pt coefficients-only.
        self.register_buffer("basis", basis_matrix(series, kernel_size, order).float(), persistent=False)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        # Inference-mode tensors are not cached: one returned later to a grad-recording op would fail.
        cacheable = (not self.training and not (torch.is_grad_enabled() and coefficients.requires_grad)
                     and not torch.is_inference_mode_enabled())
        if cacheable:
            key = (coefficients._version, coefficients.data_ptr(), coefficients.dtype, coefficients.device,
                   self.basis.data_ptr())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        # The kernel is generated in the coefficients' precision even under autocast (the conv casts it
        # as it needs), so a cached kernel never carries a mixed-precision dtype into a float32 pass.
        with torch.autocast(coefficients.device.type, enabled=False):
            if self.quant_bits is not None:
                coefficients = fake_quant_per_channel(coefficients, self.quant_bits)
            kernel = kernel_from_coefficients(coefficients, self.basis.to(coefficients.dtype))
        self._cache = (key, kernel.detach()) if cacheable else None
        return kernel

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return fit_lstsq(weight, self.basis)

    def train(self, mode: bool = True) -> "SeriesKernel":
        self._cache = None
        return super().train(mode)

    def __deepcopy__(self, memo: dict) -> "SeriesKernel":
        # The cache is derived data: never copied (a copy would key it to the old tensor's storage).
        clone = SeriesKernel.__new__(SeriesKernel)
        memo[id(self)] = clone
        state = {k: v for k, v in self.__dict__.items() if k != "_cache"}
        clone.__dict__.update(copy.deepcopy(state, memo))
        clone._cache = None
        return clone

    def extra_repr(self) -> str:
        quant = f", quant_bits={self.quant_bits}" if self.quant_bits is not None else ""
        return f"series={self.series}, kernel_size={self.kernel_size}, order={self.order}{quant}"


def approximate_conv(conv: nn.Conv2d, series: str, order: int, quant_bits: int | None = None) -> SeriesKernel:
    """Parametrise `conv.weight` by series coefficients fitted (least squares) to its current kernel."""
    kernel = SeriesKernel(series, conv.kernel_size[0], order, quant_bits).to(conv.weight.device)
    kernel.train(conv.training)  # a new submodule starts in train mode; follow the layer's mode
    parametrize.register_parametrization(conv, "weight", kernel)
    return kernel


def series_kernel_of(module: nn.Module) -> SeriesKernel | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, SeriesKernel):
                return p
    return None


# ---------------------------------------------------------------------------------------------------
# Harmonics notation and layer plan.
# ---------------------------------------------------------------------------------------------------
_TERM = re.compile(r"^\s*(\d+)\s*(?:[x×*]\s*(\d+))?\s*$")


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
        if text.lower() in ("", "none", "null"):
            return None
        terms = [t for t in text.strip("[]()").split(",") if t.strip()]
    elif isinstance(spec, (list, tuple)):
        terms = list(spec)
    else:
        raise CompressError(f"method.harmonics: expected a list or string of orders, got {type(spec).__name__}")
    orders: list[int] = []
    for term in terms:
        if isinstance(term, bool) or not isinstance(term, (int, str)):
            raise CompressError(f"method.harmonics: cannot read {term!r} as an order")
        if isinstance(term, int):
            order, repeat = term, 1
        else:
            match = _TERM.match(term)
            if not match:
                raise CompressError(f"method.harmonics: cannot read '{term.strip()}' (expected N or NxR)")
            order, repeat = int(match.group(1)), int(match.group(2) or 1)
        if order < 1 or repeat < 1:
            raise CompressError(f"method.harmonics: orders and repeat counts must be >= 1, got {term!r}")
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
        matched = [n for n, m in convs.items() if fnmatch.fnmatchcase(n, pattern) and ineligibility(m) is None]
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


# ---------------------------------------------------------------------------------------------------
# The method.
# ---------------------------------------------------------------------------------------------------
@register
class ApproxConv(Method):
    """CosConv / ChebConv: K x K kernels generated from N x N series coefficients per filter."""

    name = "approxconv"

    def __init__(self, series: str = "cos", harmonics: Any = (3, 3, 3, 2), overrides: dict | None = None,
                 fit: str = "lstsq", adam_steps: int = 600, adam_lr: float = 0.1,
                 quant_bits: int | None = None, quant_scope: str = "all", quant_momentum: float = 0.1,
                 calibration_batches: int = 8, calibration_batch_size: int = 64):
        if series not in SERIES:
            raise CompressError(f"method.series: '{series}' is not one of {', '.join(SERIES)}")
        if fit not in FITS:
            raise CompressError(f"method.fit: '{fit}' is not one of {', '.join(FITS)}")
        if quant_bits is not None and (isinstance(quant_bits, bool) or not isinstance(quant_bits, int)
                                       or not 2 <= quant_bits <= 16):
            raise CompressError(f"method.quant_bits: expected null or an integer in 2..16, got {quant_bits!r}")
        if quant_scope not in QUANT_SCOPES:
            raise CompressError(f"method.quant_scope: '{quant_scope}' is not one of {', '.join(QUANT_SCOPES)}")
        if not isinstance(adam_steps, int) or adam_steps < 1:
            raise CompressError(f"method.adam_steps: expected a positive integer, got {adam_steps!r}")
        if not adam_lr > 0:
            raise CompressError(f"method.adam_lr: expected > 0, got {adam_lr!r}")
        if not 0 < quant_momentum <= 1:
            raise CompressError(f"method.quant_momentum: expected in (0, 1], got {quant_momentum!r}")
        if not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise CompressError(f"method.calibration_batches: expected an integer >= 0, got {calibration_batches!r}")
        if not isinstance(calibration_batch_size, int) or calibration_batch_size < 1:
            raise CompressError(f"method.calibration_batch_size: expected a positive integer, "
                                f"got {calibration_batch_size!r}")
        overrides = dict(overrides or {})
        for pattern, order in overrides.items():
            if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 0):
                raise CompressError(f"method.overrides: order for '{pattern}' must be an integer >= 1 "
                                    f"(or null to keep the layer ordinary), got {order!r}")
        self.series, self.fit = series, fit
        self.harmonics = parse_harmonics(list(harmonics) if isinstance(harmonics, tuple) else harmonics)
        self.overrides = overrides
        self.adam_steps, self.adam_lr = adam_steps, float(adam_lr)
        self.quant_bits, self.quant_scope, self.quant_momentum = quant_bits, quant_scope, float(quant_momentum)
        self.calibration_batches, self.calibration_batch_size = calibration_batches, calibration_batch_size

    # -- compression --------------------------------------------------------------------------------
    def compress(self, model: nn.Module, ctx: Context) -> nn.Module:
        if any(isinstance(m, ActivationFakeQuant) for m in model.modules()):
            raise CompressError("arch.checkpoint: this model is already quantised (model.pt of a quantised "
                                "approxconv run); start from the pretrained or an unquantised approxconv model")
        if bake_parametrizations(model):
            # A model.pt of an earlier approxconv run (e.g. the unquantised fine-tuned model as the start of
            # a quantised run): refit from its current kernels; for an unchanged order the fit is exact.
            ctx.log.info("approxconv: the model already had generated kernels; refitting them")
        orders, skipped = plan_orders(model, self.harmonics, self.overrides)
        modules = dict(model.named_modules())
        for name, reason in skipped.items():
            ctx.log.info("approxconv: %s stays an ordinary convolution (%s)", name, reason)
        generator = torch.Generator().manual_seed(ctx.seed)
        errors = []
        for name, order in orders.items():
            conv = modules[name]
            weight = conv.weight.detach().clone()
            kernel = approximate_conv(conv, self.series, order, self.quant_bits)
            if self.fit == "adam":
                start = initial_coefficients(self.series, weight, order, generator)
                coefficients = fit_adam(weight, kernel.basis, start, self.adam_steps, self.adam_lr)
                with torch.no_grad():
                    conv.parametrizations.weight.original.copy_(coefficients)
            with torch.no_grad():
                errors.append((name, order, float(torch.mean((conv.weight - weight) ** 2))))
        for name, order, mse in errors:
            ctx.log.info("approxconv: %s %s N=%d fit MSE %.3g", name, self.series, order, mse)
        self._quantise(model, orders)
        if self.quant_bits is not None and self.calibration_batches > 0 and ctx.calibration is not None:
            used = calibrate_input_ranges(model, ctx.calibration_batches(self.calibration_batches,
                                                                         self.calibration_batch_size))
            ctx.log.info("approxconv: activation ranges calibrated on %d batches", used)
        return model

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return self.compress(model, ctx)

    def step(self, model: nn.Module, ctx: Context, round_index: int, step_scale: float) -> nn.Module | None:
        return None  # one-shot: everything happens in prepare; fine-tuning is the schedule's

    def _quantise(self, model: nn.Module, approximated: Iterable[str]) -> None:
        """Weight fake-quant for plain layers (scope 'all') and input fake-quant for every quantised layer.
        Approximated convs quantise their coefficients inside SeriesKernel."""
        if self.quant_bits is None:
            return
        _apply_quantisation(model, self._quant_layers(model, approximated), self.quant_bits, self.quant_momentum,
                            set(approximated))

    def _quant_layers(self, model: nn.Module, approximated: Iterable[str]) -> list[str]:
        if self.quant_scope == "approx":
            return sorted(approximated)
        return _layer_names(model, (nn.Conv2d, nn.Linear))

    # -- persistence ---------------------------------------------------------------------------------
    def meta(self, model: nn.Module) -> dict:
        layers = {n: {"series": k.series, "order": k.order}
                  for n, m in model.named_modules() if (k := series_kernel_of(m)) is not None}
        quantisers = {n: m.input_quant for n, m in model.named_modules() if isinstance(getattr(m, "input_quant", None),
                                                                                    ActivationFakeQuant)}
        first = next(iter(quantisers.values()), None)
        return {"layers": layers, "quant_bits": first.bits if first else None,
                "quant_momentum": first.momentum if first else self.quant_momentum, "quantised": list(quantisers)}

    @classmethod
    def restore(cls, model: nn.Module, meta: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        modules = dict(model.named_modules())
        bits = meta.get("quant_bits")
        for name, spec in meta.get("layers", {}).items():
            if name not in modules:
                raise CompressError(f"model.pt: layer '{name}' of the saved ApproxConv model is not in this model")
            approximate_conv(modules[name], spec["series"], int(spec["order"]), bits)
        if bits is not None:
            _apply_quantisation(model, meta.get("quantised", []), bits, meta.get("quant_momentum", 0.1),
                                set(meta.get("layers", {})))
        return model

    # -- deployment ----------------------------------------------------------------------------------
    def export(self, model: nn.Module) -> nn.Module:
        """A copy with every parametrised weight baked into a plain tensor (quantised values where
        quantisation is on); input fake-quantisers stay, so outputs equal the training-form model's."""
        baked = copy.deepcopy(model)
        bake_parametrizations(baked)
        return baked

    def storage_bytes(self, model: nn.Module) -> int | None:
        """For a quantised model: its quantised tensors (series coefficients, and with scope 'all' the
        plain conv/linear weights) packed at their bit width + one fp32 scale per output channel; biases,
        BatchNorm affine and running statistics and activation ranges at fp32; num_batches_tracked and the
        basis (a function of series, K, N) not counted. None for an unquantised model (the baseline row,
        or quant_bits null): the pipeline's serialised size, coefficients in fp32."""
        widths = quantised_widths(model)
        if not widths:
            return None
        state = model.state_dict()
        rest = {k: v for k, v in state.items()
                if k not in widths and not k.endswith(("num_batches_tracked", "input_quant.observed"))}
        total = packed_state_bytes(rest, 32, [])  # every tensor that is not quantised: its own dtype size
        for key, bits in widths.items():
            total += packed_state_bytes({key: state[key]}, bits, [key])
        return total


def quantised_widths(model: nn.Module) -> dict[str, int]:
    """state_dict key -> bit width of every weight tensor the model fake-quantises."""
    widths = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                bits = p.quant_bits if isinstance(p, SeriesKernel) else getattr(p, "bits", None)
                if bits is not None:
                    widths[f"{name}.parametrizations.weight.original".lstrip(".")] = bits
    return widths


@torch.no_grad()
def bake_parametrizations(model: nn.Module) -> int:
    """Replace every parametrised weight (series kernels, weight fake-quant) by its current value as a
    plain parameter, in place. Returns the number of layers baked."""
    baked = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            own_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            baked += 1
    return baked


def _apply_quantisation(model: nn.Module, layers: Iterable[str], bits: int, momentum: float,
                        approximated: set[str]) -> None:
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        if name not in approximated:
            parametrize.register_parametrization(module, "weight", FakeQuantWeight(bits).train(module.training))
        attach_input_quant(module, bits, momentum).train(module.training)
