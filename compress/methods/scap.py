"""SCAP: Spectral Complex Autoencoder Pruning (structured channel pruning by spectral reconstruction fidelity).

For every conv layer and output channel j, the complex interaction field of one image is
`Z[j, c] = X[c] + i * Y_j` over space: X (Cin, H, W) is the layer's input activation (real part), Y_j its
output channel j (by default relu(BatchNorm(conv output)), resized to X's spatial size, broadcast over the
Cin input channels, imaginary part). Each of the Cin planes of Z is taken to the frequency domain (2-D FFT), turned into a
normalised real spectrum, and fed to a small per-layer autoencoder trained on the spectra of all channels
of that layer. The fidelity of channel j is the cosine similarity between a spectrum and its
reconstruction, averaged over the input channels and the calibration images. High fidelity = the channel's
interaction with its input lies on the low-dimensional manifold the autoencoder captured = compressible.

Importance (higher = keep), by one of issue 26's readings (compress/prune/importance.py, docs/scap.md):
the default `normalise: raw` is `(1 - l1_weight) * (1 - fidelity) + l1_weight * minmax(l1)` on the
centred fidelity (`ae_center`), one scale in every layer and network (l1: filter L1 norms, min-maxed per
layer); `minmax_layer` (the rule before issue 26) min-maxes `1 - fidelity` per layer as well, and a
coupled group's terms (convs tied by residual additions) are averaged and min-maxed again over the group
(`SCAP.group_scores`); the other readings average the fused importance over the group. Channels whose
importance is >= `threshold` are kept (0 keeps all), each group keeping at least `1 - compress_rate` of
its channels (the default 0.9: 10 %). A layer whose min-maxed values are all equal gives every channel 1.
A silent channel (maps next to zero on every calibration image, e.g. ReLU-dead) gets no fidelity (NaN):
its fidelity term is 0 and it stays out of its layer's range. In rounds, every round renormalises the
remaining channels, so a threshold prunes again each round: bound the total with `compress_rate`.
See docs/scap.md for every choice.

Memory: nothing is stored per image. Pass 1 over the calibration batches draws a random subset of
spectra per layer (the autoencoder's training set); pass 2 scores every spectrum inside the forward
hooks, `chunk_size` output channels at a time, so peak memory is one batch's activations plus one chunk
of `batch * chunk_size * Cin * H * W` spectra. FFT linearity avoids building the field itself:
`fft2(X + i*Y_j) = fft2(X) + i*fft2(Y_j)`.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from compress import CompressError
from compress.checks import is_count, is_number, require
from compress.methods.structured import StructuredOptions, StructuredPruning
from compress.prune.autoencoder import (  # noqa: F401 (re-exported)
    AE_LOSSES,
    Autoencoder,
    bottleneck_width,
    cosine_fidelity,
    init_autoencoder,
    train_autoencoder,
    train_autoencoders,
    unit_norm,
)
from compress.prune.features import FEATURES, run_hooked
from compress.prune.importance import (  # noqa: F401 (the importance helpers, re-exported)
    DEGENERATE,
    L1_NORMS,
    NORMALISE,
    fidelity_term,
    fidelity_terms,
    fuse,
    importance,
    l1_term,
    minmax,
)
from compress.prune.scorers import filter_l1

SPECTRA = ("log", "magnitude", "power")
RESIZE_MODES = ("nearest", "bilinear", "bicubic", "area")
OUTPUTS = FEATURES  # which maps stand for a channel: the conv output, or relu(BN(conv))
BALANCES = ("layer", "channel", "none")
_EPS = 1e-12


# -- the interaction field and its spectra ------------------------------------------------------------------
def align_output(y: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize output maps (N, C, Ho, Wo) to the input's spatial `size` (a no-op when they already match).

    Nearest upsampling of a stride-s output repeats each output pixel over the s x s input cell it was
    computed at, so position (p, q) of the field pairs input pixel (p, q) with the output that saw it.
    """
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    smooth = mode in ("bilinear", "bicubic")
    return F.interpolate(y, size=tuple(size), mode=mode, align_corners=False if smooth else None)


def balance(t: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Scale each image's maps (N, C, H, W) to unit RMS: over all its channels and pixels together, or
    (`per_channel`) each channel on its own. An all-zero map stays zero.

    Whole-tensor scaling keeps the relative strength of the channels while letting the input and the
    (pre-BatchNorm, arbitrarily scaled) conv output meet on an equal footing in the complex field;
    per-channel scaling removes strength altogether, so that only the shape of a channel's maps counts.
    """
    dims = (2, 3) if per_channel else (1, 2, 3)
    rms = t.pow(2).mean(dim=dims, keepdim=True).sqrt()
    return t / rms.clamp_min(_EPS)


def interaction_field(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The complex field Z[n, j, c] = x[n, c] + i * y[n, j]: (N, Cin, H, W), (N, C, H, W) -> (N, C, Cin, H, W).

    `y` must already be aligned to x's spatial size. Reference form: scoring uses `field_spectra` instead.
    """
    return torch.complex(x[:, None].expand(-1, y.shape[1], -1, -1, -1), y[:, :, None].expand(-1, -1, x.shape[1], -1, -1))


def plane_fft(t: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D FFT over the last two axes (magnitudes independent of the map size)."""
    return torch.fft.fft2(t, norm="ortho")


def field_spectra(fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """fft2 of the interaction field from the planes' own FFTs (linearity): (N, Cin, H, W), (N, C, H, W)
    complex -> (N, C, Cin, H, W) complex, equal to `plane_fft(interaction_field(x, y))`."""
    return fx[:, None] + 1j * fy[:, :, None]


def normalise_spectra(spectra: torch.Tensor, kind: str = "log") -> torch.Tensor:
    """Complex spectra (..., H, W) -> unit-L2-norm real vectors (..., H*W).

    "log": log(1 + |F|) (compresses the dominant low frequencies so the rest still counts);
    "magnitude": |F|; "power": |F|^2. An all-zero spectrum stays zero.
    """
    magnitude = spectra.abs().flatten(-2)  # a new tensor: the in-place ops below touch nothing else
    if kind == "log":
        values = magnitude.log1p_()
    elif kind == "magnitude":
        values = magnitude
    elif kind == "power":
        values = magnitude.pow(2)
    else:
        raise CompressError(f"method.spectrum: must be one of {', '.join(SPECTRA)}, got '{kind}'")
    return values.div_(values.norm(dim=-1, keepdim=True).clamp_min(_EPS))


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own for each layer, from the run's seed and the layer's name, so that a layer's
    training sample and autoencoder do not depend on the other layers scored with it."""
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


# -- per-layer sampling and scoring (called inside forward hooks) ---------------------------------------------
@dataclass
class SpectrumOptions:
    """How a layer's field becomes spectra: `method.spectrum`, `resize`, `balance`, `output` (SCAPOptions
    holds their defaults)."""

    spectrum: str
    resize: str
    balance: str
    output: str


def layer_planes(x: torch.Tensor, y: torch.Tensor, opts: SpectrumOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's input (N, Cin, H, W) and output (N, C, Ho, Wo) -> their plane FFTs on the input's grid."""
    x, y = x.float(), y.float()
    if opts.balance != "none":
        x, y = balance(x), balance(y, per_channel=opts.balance == "channel")
    return plane_fft(x), plane_fft(align_output(y, x.shape[-2:], opts.resize))


def sample_spectra(
    fx: torch.Tensor, fy: torch.Tensor, count: int, opts: SpectrumOptions, generator: torch.Generator
) -> torch.Tensor:
    """`count` normalised spectra of random (image, output channel, input channel) triples: (count, H*W)."""
    n, cin = fx.shape[:2]
    cout = fy.shape[1]
    images = torch.randint(n, (count,), generator=generator).to(fx.device)
    outputs = torch.randint(cout, (count,), generator=generator).to(fx.device)
    inputs = torch.randint(cin, (count,), generator=generator).to(fx.device)
    return normalise_spectra(fx[images, inputs] + 1j * fy[images, outputs], opts.spectrum)


def fidelity_sums(
    fx: torch.Tensor, fy: torch.Tensor, ae: Autoencoder, opts: SpectrumOptions, chunk_size: int | None
) -> torch.Tensor:
    """Per output channel, the sum over images of the fidelity averaged over input channels: (C,).

    Vectorised over images, input channels and the `chunk_size` output channels of a chunk (all at once
    when None); the loop runs over chunks only, to bound the (N, chunk, Cin, H, W) spectra in memory.
    """
    cout = fy.shape[1]
    step = cout if not chunk_size else chunk_size
    sums = [
        ae.fidelity(normalise_spectra(field_spectra(fx, fy[:, start : start + step]), opts.spectrum))
        .mean(2)
        .sum(0)
        for start in range(0, cout, step)
    ]
    return torch.cat(sums)


# A channel whose maps' RMS over the calibration images is at most this fraction of its layer's loudest is
# silent (a ReLU-dead channel is exactly 0).
SILENT = 1e-6


def silent_channels(mean_power: torch.Tensor) -> torch.Tensor:
    """(C,) mean squared activation per channel -> bool (C,): channels that carry (next to) nothing.

    `balance: channel` would blow such a channel's maps up to unit RMS (or leave them zero), and its field
    is then the input alone, unlike every live channel's: the autoencoder reconstructs it worst, and SCAP
    would keep it first and stretch its layer's importance range around it. It passes nothing on (a
    ReLU-dead channel read by the next conv only: its removal changes no output), so it gets no fidelity
    (NaN) and the lowest importance instead.
    """
    rms = mean_power.clamp_min(0).sqrt()
    return rms <= SILENT * rms.max()


# -- two passes over the calibration data ---------------------------------------------------------------------
@dataclass
class AutoencoderOptions:
    """The autoencoders' training: `method.ae_<key>` (SCAPOptions holds their defaults); `ratio` caps the
    bottleneck at that fraction of the spectrum length."""

    hidden: int
    ratio: float
    epochs: int
    lr: float
    batch_size: int
    samples: int
    loss: str
    center: bool


def layer_fidelities(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches,
    num_batches: int,
    spectrum: SpectrumOptions,
    ae_opts: AutoencoderOptions,
    chunk_size: int | None,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Fidelity (C,) of every output channel of every layer in `layers`, averaged over the calibration images;
    NaN for a silent channel (see `silent_channels`): it has nothing to reconstruct and is the least important.

    `batches()` must yield the same images each time it is called (pass 1 draws the autoencoders' training
    spectra, pass 2 scores every spectrum).
    """
    generators = {name: layer_generator(seed, name) for name in layers}
    per_batch = math.ceil(ae_opts.samples / max(num_batches, 1))
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def collect(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        fx, fy = layer_planes(x, y, spectrum)
        samples[name].append(sample_spectra(fx, fy, per_batch, spectrum, generators[name]))

    run_hooked(model, layers, batches(), collect, spectrum.output, key="method.output")
    missing = [name for name, s in samples.items() if not s]
    if missing:
        raise CompressError(f"method: layers never ran in the forward pass: {', '.join(missing[:5])}")

    # Layers whose spectra have the same length train together (one optimiser loop per length).
    by_dim: dict[int, list[str]] = {}
    for name in layers:
        by_dim.setdefault(samples[name][0].shape[-1], []).append(name)
    autoencoders: dict[str, Autoencoder] = {}
    for dim, names in by_dim.items():
        count = min(ae_opts.samples, sum(len(part) for part in samples[names[0]]))
        spectra = torch.empty(len(names), count, dim, device=samples[names[0]][0].device)
        for row, name in enumerate(names):  # fill in place, freeing each layer's parts as we go
            spectra[row] = torch.cat(samples.pop(name))[:count]
        trained = train_autoencoders(
            spectra,
            bottleneck_width(dim, ae_opts.hidden, ae_opts.ratio),
            ae_opts.epochs,
            ae_opts.lr,
            ae_opts.batch_size,
            [generators[name] for name in names],
            ae_opts.loss,
            ae_opts.center,
        )
        autoencoders.update(zip(names, trained))
        del spectra

    sums: dict[str, torch.Tensor] = {}
    power: dict[str, torch.Tensor] = {}
    counts = {name: 0 for name in layers}

    def score(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        fx, fy = layer_planes(x, y, spectrum)
        total = fidelity_sums(fx, fy, autoencoders[name], spectrum, chunk_size).cpu()
        sums[name] = sums[name] + total if name in sums else total
        energy = y.detach().float().pow(2).mean((2, 3)).sum(0).cpu()  # per channel, summed over images
        power[name] = power[name] + energy if name in power else energy
        counts[name] += x.shape[0]

    run_hooked(model, layers, batches(), score, spectrum.output, key="method.output")
    return {name: (sums[name] / counts[name]).masked_fill(silent_channels(power[name] / counts[name]), float("nan"))
            for name in layers}


# -- the method ------------------------------------------------------------------------------------------------
# ae_samples sizes every layer's training set (ae_samples x H*W floats per layer, all held at once): bounded
# so that a mistyped count fails at once instead of exhausting memory (16x the default).
MAX_AE_SAMPLES = 65536
# Smoke runs (ctx.quick) train each autoencoder for a token budget: one epoch over this many spectra.
QUICK_AE_SAMPLES = 256


@dataclass
class SCAPOptions(StructuredOptions):
    """`method=scap`. Its own defaults of the structured options: an importance `threshold` of 0.6 (the
    paper's number, on the normalised [0, 1] importance scale), with `compress_rate` 1.0 as the cap (no cap:
    a layer still keeps one channel)."""

    name: str = "scap"
    # with a threshold: the most a group may lose (0.9: every layer keeps at least 10 % of its channels, issue 26's
    # reading; 1.0: no cap, one channel always stays); without: the rate spec
    compress_rate: Any = 0.9
    # in [0, 1]: keep the channels whose normalised importance is >= threshold (0: keep all; 1: each group's
    # best only; the paper: 0.6); null: rate spec only
    threshold: Optional[float] = 0.6
    # how the fidelity becomes the importance's [0, 1] term (compress/prune/importance.py): raw (1 - fidelity) |
    # minmax_layer (min-max of 1 - fidelity per layer: the rule before issue 26) | minmax_global | rank_global
    normalise: str = "raw"
    # in [0, 1]: importance = (1 - l1_weight) * fidelity term + l1_weight * L1 term
    l1_weight: float = 0.25
    l1_norm: str = "minmax"  # the layer-normalised filter L1 norm: minmax (per layer) | max (over the layer's largest)
    spectrum: str = "log"  # log: log(1+|F|) | magnitude: |F| | power: |F|^2 ; each spectrum then scaled to unit L2 norm
    output: str = "relu"  # relu: Y = relu(BN(conv output)) | conv: the conv's raw output
    # per image, scale to unit RMS: channel (X as a whole, each Y_j alone) | layer (Y as a whole) | none
    balance: str = "channel"
    resize: str = "nearest"  # how a strided output is resized to the input's size: nearest | bilinear | bicubic | area
    ae_hidden: int = 8  # autoencoder bottleneck width (one hidden ReLU layer, D -> hidden -> D) ...
    ae_ratio: float = 0.25  # ... never wider than this fraction of the spectrum length D = H*W (at least 1)
    ae_epochs: int = 10  # autoencoder training: epochs over its training spectra ...
    ae_lr: float = 1e-2  # ... Adam learning rate ...
    ae_batch_size: int = 256  # ... minibatch size ...
    ae_samples: int = 4096  # ... and number of training spectra per layer, random (image, out, in) planes
    ae_loss: str = "mse"  # mse | cosine (1 - cosine similarity)
    ae_center: bool = True  # subtract the layer's mean training spectrum before the autoencoder (and the cosine)
    batches: int = 4  # calibration batches ...
    batch_size: int = 64  # ... of this many training images (256 images)
    chunk_size: Optional[int] = 8  # output channels whose spectra are built at once (memory vs. speed); null: whole layer

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.threshold is None or 0 <= self.threshold <= 1, "method.threshold", "a number in [0, 1] or null",
                self.threshold)
        require(is_number(self.l1_weight) and 0 <= self.l1_weight <= 1, "method.l1_weight", "a number in [0, 1]",
                self.l1_weight)
        for key, choices in (("normalise", NORMALISE), ("l1_norm", L1_NORMS), ("spectrum", SPECTRA),
                             ("output", OUTPUTS), ("balance", BALANCES), ("resize", RESIZE_MODES), ("ae_loss", AE_LOSSES)):
            self.check(getattr(self, key) in choices, key, f"one of {', '.join(choices)}")
        for key in ("ae_hidden", "ae_batch_size", "batches", "batch_size"):
            self.check(is_count(getattr(self, key)), key, "an integer >= 1")
        require(is_count(self.ae_epochs, minimum=0), "method.ae_epochs", "an integer >= 0", self.ae_epochs)
        require(is_count(self.ae_samples) and self.ae_samples <= MAX_AE_SAMPLES, "method.ae_samples",
                f"an integer in [1, {MAX_AE_SAMPLES}]", self.ae_samples)
        # A bottleneck as wide as the spectrum would reconstruct everything (and ae_ratio caps ae_hidden's memory).
        require(is_number(self.ae_ratio) and 0 < self.ae_ratio <= 1, "method.ae_ratio", "a number in (0, 1]", self.ae_ratio)
        require(is_number(self.ae_lr) and self.ae_lr > 0, "method.ae_lr", "a positive number", self.ae_lr)
        require(isinstance(self.ae_center, bool), "method.ae_center", "true or false", self.ae_center)
        require(self.chunk_size is None or is_count(self.chunk_size), "method.chunk_size", "an integer >= 1 or null",
                self.chunk_size)


class SCAP(StructuredPruning):
    """SCAP: prune the output channels whose spectral interaction field an autoencoder reconstructs well.

    Importance, per channel group on [0, 1] (see the module docstring): `(1 - l1_weight) * minmax(1 -
    fidelity) + l1_weight * minmax(l1)`. With `threshold`, the channels whose importance is >= it stay
    (the engine's own keep rule, so `threshold` is passed on unchanged) and `compress_rate` caps the
    fraction removed per group (1.0: no cap, the engine still keeps one channel); with `threshold: null`
    the rate spec alone sets how many channels go, lowest importance first.
    """

    name = "scap"
    Options = SCAPOptions

    def __init__(self, options: SCAPOptions | None = None):
        super().__init__(options)
        opts = self.options
        self.l1_weight = float(opts.l1_weight)
        self.spectrum_opts = SpectrumOptions(spectrum=opts.spectrum, resize=opts.resize, balance=opts.balance,
                                             output=opts.output)
        self.ae_opts = AutoencoderOptions(hidden=opts.ae_hidden, ratio=float(opts.ae_ratio), epochs=opts.ae_epochs,
                                          lr=float(opts.ae_lr), batch_size=opts.ae_batch_size, samples=opts.ae_samples,
                                          loss=opts.ae_loss, center=opts.ae_center)

    def autoencoder_budget(self, quick: bool) -> AutoencoderOptions:
        """The autoencoders' training options; for a smoke run (`ctx.quick`) one epoch over a few spectra."""
        if not quick:
            return self.ae_opts
        return dataclasses.replace(self.ae_opts, epochs=min(self.ae_opts.epochs, 1),
                                   samples=min(self.ae_opts.samples, QUICK_AE_SAMPLES))

    def fidelities(self, model: nn.Module, ctx, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Fidelity (C,) per layer, averaged over `batches` x `batch_size` calibration images (seeded by ctx.seed)."""
        opts = self.options
        return layer_fidelities(
            model,
            layers,
            lambda: ctx.calibration_batches(opts.batches, opts.batch_size),
            opts.batches,
            self.spectrum_opts,
            self.autoencoder_budget(ctx.quick),
            opts.chunk_size,
            ctx.seed,
        )

    def layer_terms(self, model, ctx, layers) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per layer, the two [0, 1] terms of the importance: the fidelity term (`method.normalise`) and the
        L1 term (`method.l1_norm`). The fidelity pass runs only when its weight is not 0 (l1_weight 1 is
        plain L1 on this scale)."""
        opts = self.options
        if self.l1_weight < 1:
            fidelity = fidelity_terms(self.fidelities(model, ctx, layers), opts.normalise)
        else:
            fidelity = {name: torch.zeros(conv.out_channels) for name, conv in layers.items()}
        l1 = {name: l1_term(filter_l1(conv.weight), opts.l1_norm) for name, conv in layers.items()}
        return fidelity, l1

    def channel_scores(self, model, ctx, layers):
        """Per layer importance (C,) in [0, 1], higher = keep."""
        fidelity, l1 = self.layer_terms(model, ctx, layers)
        return {name: fuse(fidelity[name], l1[name], self.l1_weight) for name in layers}

    def group_scores(self, model, ctx, plan, groups, layers) -> dict[str, torch.Tensor]:
        """Importance per channel group on [0, 1]: each term averaged over the group's convs (the engine's
        `group_scores`), then fused. Under `normalise: minmax_layer` each averaged term is min-maxed again
        over the group first, so a coupled group (residual additions) spans [0, 1] like a single layer
        (a one-conv group gets exactly its layer's `channel_scores`); the other readings keep their
        network-wide scale, which a re-normalisation would undo."""
        fidelity, l1 = self.layer_terms(model, ctx, layers)
        fidelity_g, l1_g = plan.group_scores(fidelity, groups), plan.group_scores(l1, groups)
        rescale = minmax if self.options.normalise == "minmax_layer" else (lambda t: t)
        return {g: fuse(rescale(fidelity_g[g]), rescale(l1_g[g]), self.l1_weight) for g in groups}
