"""Fractional Gaussian Filters (FGF): convolution kernels generated from a few numbers per output channel
(FGFP's layer type).

An FGF layer is an ordinary `nn.Conv2d` whose `weight` is generated, through
`torch.nn.utils.parametrize`, from 7 or 8 numbers per output channel:

    W[o, ch, y, x] = A_o * D^a_x G(x - x0) * D^b_y G(y - y0) * D^c_ch G(ch - ch0)

with G(u) = exp(-u^2 / (2 sigma^2)) and D^alpha the Grunwald-Letnikov (GL) fractional derivative
truncated to `terms` terms with step `step`. Per output channel: orders a, b, c in [0, 2], centres x0, y0,
ch0, width sigma (7 parameters) and, when `amplitude=True`, a gain A_o (8 parameters).

Ranges hold by construction: order = 2 * sigmoid(raw), sigma = softplus(raw) + SIGMA_MIN, centres and
gain unconstrained. The stored tensor is `<conv>.parametrizations.weight.original` of shape (Cout, 7|8).
`fgf_meta` / `restore_fgf` describe and rebuild a model's FGF layers for model.pt. Baking
(`compress.layers.deployable`): the generated kernel becomes a plain weight.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from compress import CompressError

# Smallest Gaussian width: keeps 1/sigma finite (and gradients usable) however far raw sigma goes.
SIGMA_MIN = 1e-3
GRIDS = ("unit", "pixel")


# -- Grunwald-Letnikov ----------------------------------------------------------------------------------
def gl_weights(order: torch.Tensor, terms: int) -> torch.Tensor:
    """(-1)^k binom(order, k) for k < terms, shape (*order.shape, terms).

    Built by the recurrence w_k = w_{k-1} (1 - (order + 1) / k) instead of Gamma functions: the Gamma form
    has poles at integer orders (order 0, 1, 2 are exactly the cases we need), the recurrence has none and
    ends the series by itself there (w_k = 0 for k > order).
    """
    k = torch.arange(1, terms, dtype=order.dtype, device=order.device)
    factors = 1.0 - (order[..., None] + 1.0) / k
    return torch.cat([torch.ones_like(order)[..., None], torch.cumprod(factors, dim=-1)], dim=-1)


def grunwald_letnikov(f: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, order: Any,
                      terms: int, step: float) -> torch.Tensor:
    """D^order f at `points`: step^-order * sum_{k<terms} (-1)^k binom(order, k) f(points - k step).

    `order` broadcasts against `points`; `f` is evaluated once on a (*points.shape, terms) tensor.
    """
    order = torch.as_tensor(order, dtype=points.dtype, device=points.device)
    offsets = step * torch.arange(terms, dtype=points.dtype, device=points.device)
    samples = f(points[..., None] - offsets)
    weights = gl_weights(order, terms)
    return torch.pow(torch.as_tensor(step, dtype=points.dtype), -order) * (weights * samples).sum(-1)


def gaussian(u: torch.Tensor, centre: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # Scale before squaring: (u - centre) / sigma stays finite for any reachable centre and sigma.
    z = (u - centre) / sigma
    return torch.exp(-0.5 * z * z)


# -- the FGF kernel ----------------------------------------------------------------------------------------
def decode(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw (N, 7|8), columns a, b, c, x0, y0, ch0, sigma[, amplitude] -> the parameters within their ranges."""
    params = {
        "a": 2.0 * torch.sigmoid(raw[:, 0]), "b": 2.0 * torch.sigmoid(raw[:, 1]), "c": 2.0 * torch.sigmoid(raw[:, 2]),
        "x0": raw[:, 3], "y0": raw[:, 4], "ch0": raw[:, 5], "sigma": F.softplus(raw[:, 6]) + SIGMA_MIN,
    }
    params["amplitude"] = raw[:, 7] if raw.shape[1] == 8 else torch.ones_like(raw[:, 0])
    return params


def encode(a, b, c, x0, y0, ch0, sigma, amplitude=None) -> torch.Tensor:
    """Inverse of `decode` for values strictly inside the ranges (used to build initial guesses)."""
    def order_raw(o):
        return torch.logit(torch.as_tensor(o) / 2.0)
    sigma_raw = torch.log(torch.expm1(torch.as_tensor(sigma) - SIGMA_MIN))
    cols = [order_raw(a), order_raw(b), order_raw(c), x0, y0, ch0, sigma_raw]
    if amplitude is not None:
        cols.append(amplitude)
    cols = torch.broadcast_tensors(*[torch.as_tensor(v, dtype=torch.float32) for v in cols])
    return torch.stack(cols, dim=-1)


def axis_factor(coords: torch.Tensor, centre: torch.Tensor, sigma: torch.Tensor, order: torch.Tensor,
                terms: int, step: float, stride: int | None = None) -> torch.Tensor:
    """D^order G(u - centre) sampled at `coords` (n,), for N channels at once: (N, n).

    With `stride` (the sample spacing is exactly `stride` GL steps, e.g. the pixel grid with h = 1/4) every
    point u_i - k h lies on one lattice of spacing h, so G is evaluated once per lattice point, (N, (n-1)
    stride + terms) values instead of (N, n, terms), and the GL sum is a strided grouped 1-D correlation.
    Same numbers as `grunwald_letnikov` (tested); about 8x faster on a 512-channel axis.
    """
    if stride is None:
        def g(u: torch.Tensor) -> torch.Tensor:
            return gaussian(u, centre[:, None, None], sigma[:, None, None])
        return grunwald_letnikov(g, coords.expand(centre.shape[0], -1), order[:, None], terms, step)
    n = coords.shape[0]
    lattice = coords[:1] + step * (torch.arange((n - 1) * stride + terms, dtype=coords.dtype,
                                                device=coords.device) - (terms - 1))
    samples = gaussian(lattice, centre[:, None], sigma[:, None])  # (N, M)
    weights = gl_weights(order, terms) * torch.pow(torch.as_tensor(step, dtype=order.dtype), -order)[:, None]
    # conv1d correlates: out[i] = sum_m weights[L-1-m] * samples[i*stride + m] = sum_k w_k G(u_i - k h).
    return F.conv1d(samples[None], weights.flip(-1)[:, None, :], stride=stride, groups=samples.shape[0])[0]


def lattice_stride(size: int, kind: str, step: float) -> int | None:
    """How many GL steps one sample spacing of `grid(size, kind)` is, when that is a whole number."""
    if size == 1:
        return 1
    ratio = (1.0 if kind == "pixel" else 2.0 / (size - 1)) / step
    return round(ratio) if round(ratio) >= 1 and abs(ratio - round(ratio)) < 1e-6 * ratio else None


def fgf_factors(raw: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor], terms: int,
                step: float, strides: tuple[int | None, ...] = (None, None, None)
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The separable factors (amplitude (N,), channel (N, C), row (N, KH), column (N, KW)).

    With a gain column (8 parameters) each factor is scaled to unit L2 norm, so the kernel's Frobenius
    norm is exactly |amplitude|. That spans the same kernels as the unnormalised product (the gain absorbs
    the scale) but keeps the gain meaningful when the Gaussian is narrow and barely touches the sample
    points: the unnormalised product then underflows to ~1e-20 and the gain needed to compensate (and the
    gradients through it) overflow.
    """
    p = decode(raw)
    coords_c, coords_y, coords_x = coords
    fc = axis_factor(coords_c, p["ch0"], p["sigma"], p["c"], terms, step, strides[0])
    fy = axis_factor(coords_y, p["y0"], p["sigma"], p["b"], terms, step, strides[1])
    fx = axis_factor(coords_x, p["x0"], p["sigma"], p["a"], terms, step, strides[2])
    if raw.shape[1] == 8:
        fc, fy, fx = (F.normalize(f, dim=1, eps=1e-30) for f in (fc, fy, fx))
    return p["amplitude"], fc, fy, fx


def fgf_kernel(raw: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor], terms: int,
               step: float, strides: tuple[int | None, ...] = (None, None, None)) -> torch.Tensor:
    """Kernels (N, C, KH, KW) from raw parameters (N, 7|8)."""
    amp, fc, fy, fx = fgf_factors(raw, coords, terms, step, strides)
    return amp[:, None, None, None] * fc[:, :, None, None] * fy[:, None, :, None] * fx[:, None, None, :]


def grid(size: int, kind: str, device=None) -> torch.Tensor:
    """Sample positions along one kernel axis: 'unit' spreads them over [-1, 1] (so one sigma fits a
    3-tap spatial axis and a 64-channel axis alike); 'pixel' uses integer offsets from the centre."""
    if kind == "unit":
        return torch.linspace(-1.0, 1.0, size, device=device) if size > 1 else torch.zeros(1, device=device)
    return torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0


# -- fitting to a pretrained kernel ----------------------------------------------------------------------
def initial_guess(kernel: torch.Tensor, coords, order: float) -> torch.Tensor:
    """Raw (Cout, 7): centred on the input channel with the most energy (the FGF's channel factor is one
    bump, so that channel is where most of the fit comes from), spatially centred, sigma 0.5, all three
    orders `order`."""
    strongest = kernel.detach().pow(2).sum((2, 3)).argmax(dim=1)
    ch0 = coords[0][strongest].cpu()
    zeros = torch.zeros(kernel.shape[0])
    return encode(order, order, order, zeros, zeros, ch0, 0.5).to(kernel.device, kernel.dtype)


def fit_fgf(kernel: torch.Tensor, coords, terms: int, step: float, amplitude: bool, steps: int, lr: float,
            init_orders: list[float], strides: tuple[int | None, ...] = (None, None, None)) -> torch.Tensor:
    """Raw FGF parameters (Cout, 7|8) whose kernels approximate `kernel` (Cout, C, KH, KW) in MSE.

    All output channels and all restarts (one per initial order) are fitted as one batch by Adam; each
    channel keeps its best restart. With `amplitude` the gain is not a free variable of the descent: at
    every step it is the closed-form least-squares gain of the current unit-norm shape, <W, S>
    (variable projection), which makes the fit insensitive to the kernel's scale and sign.
    """
    n, restarts = kernel.shape[0], len(init_orders)
    target = kernel.detach().repeat(restarts, 1, 1, 1)
    target_energy = target.pow(2).sum((1, 2, 3))

    def residual(r: torch.Tensor) -> torch.Tensor:
        # ||W - g S||^2 from the separable factors, without building the (N, C, KH, KW) kernels: the
        # inner product <W, S> is one contraction, and ||S||^2 is the product of the factors' norms.
        gain_col = torch.ones_like(r[:, :1]) if amplitude else None
        _, fc, fy, fx = fgf_factors(r if gain_col is None else torch.cat([r, gain_col], dim=1), coords, terms, step,
                                    strides)
        inner = torch.einsum("ncyx,nc,ny,nx->n", target, fc, fy, fx)
        if amplitude:  # unit-norm shape, optimal gain <W, S>
            return target_energy - inner.pow(2)
        shape_energy = fc.pow(2).sum(1) * fy.pow(2).sum(1) * fx.pow(2).sum(1)
        return target_energy - 2 * inner + shape_energy

    raw = torch.cat([initial_guess(kernel, coords, o) for o in init_orders]).requires_grad_(True)
    with torch.enable_grad():
        optimiser = torch.optim.Adam([raw], lr=lr)
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            residual(raw).sum().backward()
            optimiser.step()
    with torch.no_grad():
        best = residual(raw).view(restarts, n).nan_to_num(math.inf).argmin(dim=0)
        chosen = raw.detach().view(restarts, n, -1)[best, torch.arange(n, device=raw.device)]
        if amplitude:
            _, fc, fy, fx = fgf_factors(torch.cat([chosen, torch.ones_like(chosen[:, :1])], dim=1), coords, terms, step,
                                        strides)
            gain = torch.einsum("ncyx,nc,ny,nx->n", kernel.detach(), fc, fy, fx)
            chosen = torch.cat([chosen, gain[:, None]], dim=1)
    return chosen.to(kernel.dtype)


class FractionalGaussianKernel(nn.Module):
    """Parametrization of a conv `weight` (Cout, C, KH, KW) by raw FGF parameters (Cout, 7|8).

    `right_inverse` (called by `register_parametrization` and by `conv.weight = kernel`) fits the
    parameters to the given kernel; a (Cout, 7|8) tensor is taken as raw parameters as it is.
    """

    def __init__(self, weight_shape: tuple[int, ...], terms: int, step: float, grid_kind: str, amplitude: bool,
                 fit_steps: int, fit_lr: float, fit_init_orders: list[float]):
        super().__init__()
        out_channels, in_channels, kh, kw = weight_shape
        self.out_channels, self.terms, self.step, self.amplitude = out_channels, terms, step, amplitude
        self.grid_kind = grid_kind
        self.n_params = 8 if amplitude else 7
        self.fit_steps, self.fit_lr, self.fit_init_orders = fit_steps, fit_lr, list(fit_init_orders)
        # Non-persistent: derived from the shape, so they stay out of state_dict but follow .to(device).
        self.register_buffer("coords_c", grid(in_channels, grid_kind), persistent=False)
        self.register_buffer("coords_y", grid(kh, grid_kind), persistent=False)
        self.register_buffer("coords_x", grid(kw, grid_kind), persistent=False)
        # The lattice path evaluates (n-1) * stride + terms Gaussians per channel, the direct one n * terms:
        # take the lattice only where it is the cheaper (any stride <= terms), so a tiny `step` cannot make
        # the lattice, and the memory, grow without bound.
        strides = (lattice_stride(size, grid_kind, step) for size in (in_channels, kh, kw))
        self.strides = tuple(s if s is not None and s <= terms else None for s in strides)

    @property
    def coords(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.coords_c, self.coords_y, self.coords_x

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        # Generated in full precision even inside a mixed-precision region; the conv casts it as it needs.
        with torch.autocast(raw.device.type, enabled=False):
            return fgf_kernel(raw.float(), self.coords, self.terms, self.step, self.strides).to(raw.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 2 and value.shape == (self.out_channels, self.n_params):
            return value
        return fit_fgf(value, self.coords, self.terms, self.step, self.amplitude, self.fit_steps, self.fit_lr,
                       self.fit_init_orders, self.strides)

    def spec(self) -> dict:
        """What `restore` needs to rebuild this parametrization (plain data for model.pt's meta)."""
        return {"terms": self.terms, "step": self.step, "grid": self.grid_kind, "amplitude": self.amplitude}

    def extra_repr(self) -> str:
        return f"params_per_channel={self.n_params}, terms={self.terms}, step={self.step}, grid={self.grid_kind}"


def fgf_layer_names(model: nn.Module) -> list[str]:
    """Names of the Conv2d layers whose weight is generated by a FractionalGaussianKernel."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], FractionalGaussianKernel)]


def fgf_meta(model: nn.Module) -> dict[str, dict]:
    """{layer name: spec} of every FGF layer, read from the model itself."""
    return {name: model.get_submodule(name).parametrizations.weight[0].spec() for name in fgf_layer_names(model)}


def restore_fgf(model: nn.Module, meta: dict[str, dict]) -> nn.Module:
    """Rebuild the FGF layers described by `fgf_meta` on a freshly built model (no fitting: the fitted
    numbers come from state_dict right after)."""
    modules = dict(model.named_modules())
    for name, spec in meta.items():
        if not isinstance(modules.get(name), nn.Conv2d):
            raise CompressError(f"model.pt: FGF layer '{name}' is not a Conv2d of this architecture")
        convert(model, [name], spec, 0, 1.0, [1.0])
    return model


def convert(model: nn.Module, names: list[str], spec: dict, fit_steps: int, fit_lr: float,
            fit_init_orders: list[float]) -> dict[str, float]:
    """Turn the named convs into FGF layers in place, each fitted to its current kernel.

    Returns the relative fitting error ||W_fgf - W|| / ||W|| per layer.
    """
    modules = dict(model.named_modules())
    errors = {}
    for name in names:
        conv = modules[name]
        pretrained = conv.weight.detach().clone()
        fgk = FractionalGaussianKernel(tuple(conv.weight.shape), spec["terms"], spec["step"], spec["grid"],
                                       spec["amplitude"], fit_steps, fit_lr, fit_init_orders).to(conv.weight.device)
        parametrize.register_parametrization(conv, "weight", fgk)
        with torch.no_grad():
            errors[name] = float((conv.weight - pretrained).norm() / pretrained.norm().clamp_min(1e-30))
    return errors


# -- refining a converted layer on what it computes ----------------------------------------------------------
def standardised(t: torch.Tensor) -> torch.Tensor:
    """Each channel of (N, C, H, W) to zero mean and unit variance over batch and positions: what the
    BatchNorm after a conv sees, up to its affine (which absorbs a converted layer's scale)."""
    return (t - t.mean((0, 2, 3), keepdim=True)) / (t.std((0, 2, 3), keepdim=True) + 1e-5)


def output_correlation(conv: nn.Conv2d, inputs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-channel correlation of the conv's outputs on `inputs` with the standardised `target`."""
    with torch.no_grad():
        out = F.conv2d(inputs, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return float((standardised(out) * target).mean())


def fit_outputs(conv: nn.Conv2d, inputs: torch.Tensor, outputs: torch.Tensor, steps: int, lr: float,
                batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """Refine an FGF conv's numbers so that its outputs on `inputs` follow `outputs` (the pretrained conv's
    on the same inputs), channel by channel up to scale and shift (MSE of standardised maps, Adam on random
    minibatches). Returns the mean output correlation before and after."""
    raw = conv.parametrizations.weight.original
    target = standardised(outputs)
    before = output_correlation(conv, inputs, target)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([raw], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            batch = torch.randint(0, inputs.shape[0], (min(batch_size, inputs.shape[0]),), generator=generator)
            batch = batch.to(inputs.device)
            out = F.conv2d(inputs[batch], conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                           conv.groups)
            loss = (standardised(out) - target[batch]).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    raw.grad = None
    return before, output_correlation(conv, inputs, target)
