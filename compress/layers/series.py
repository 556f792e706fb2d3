"""Convolution kernels generated from truncated cosine / Chebyshev series (ApproxConv's layer type).

Each K x K filter is an N x N block of series coefficients A (N <= K):

    w[o, c] = B A[o, c] B^T,     B[p, i] = cos(i * x_p)   (cos:  x_p equispaced on [0.2pi, 0.8pi])
                                 B[p, i] = T_i(x_p)       (cheb: x_p equispaced on [-1, 1])

The layer stays an `nn.Conv2d`: `SeriesKernel` is a `torch.nn.utils.parametrize` parametrization of its
`weight` by the coefficients (`<layer>.parametrizations.weight.original`, shape [Cout, Cin/groups, N, N]),
which are what an optimiser trains, what `model.parameters()` counts and what `model.pt` stores.
Baking (`compress.layers.deployable`): the generated kernel becomes a plain weight.

Fitting to a given kernel: `fit_lstsq` is the closed-form minimiser of the mean squared error,
A = pinv(B) W pinv(B)^T; `fit_adam` is the iterative fit of ApproxConv's public code.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from compress import CompressError
from compress.layers.quant import fake_quant_per_channel

SERIES = ("cos", "cheb")
# Cosine sample interval [a*pi, b*pi]: the public code pulls the points in from 0 and pi so the even
# periodic extension has no kink at the boundary.
COS_INTERVAL = (0.2 * math.pi, 0.8 * math.pi)


# -- series basis and fitting: pure tensor functions -------------------------------------------------------
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


# -- the parametrization ---------------------------------------------------------------------------------
class SeriesKernel(nn.Module):
    """`weight = B A B^T` per filter from coefficients A; registered on a conv's `weight`.

    `right_inverse` is the least-squares fit, so registering it on a trained conv fits the coefficients
    (and `conv.weight = W` refits). With `quant_bits` the coefficients are fake-quantised (per output
    channel) before the kernel is generated. In eval mode without autograd the kernel is cached and reused
    until the coefficients change (tracked by the tensor's version counter, bumped by every in-place
    update: optimiser steps, load_state_dict) or the module goes back to train().
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
    """The module's SeriesKernel, if its weight is generated by one."""
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, SeriesKernel):
                return p
    return None
