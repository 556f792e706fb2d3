"""CFDP: Common Frequency Domain Pruning (Khaki & Luo, 2023) -- a channel saliency from feature maps.

Each channel's feature map F (H x W) is taken to a frequency representation F~ of the same size by
block-wise orthonormal 2-D DCTs with a Gaussian filter, then scored

    L = Dist(F~) * ||F~||_F + lam * ||F||_F,    Dist = fraction of the H*W coefficients above their mean,

and the scores are averaged over the calibration images; the highest-scoring channels of each layer are
kept. Two variants of F~ (see docs/cfdp.md for why they differ):

- "reference", what the public code (github.com/Skhaki18/CFDP, `CFDP_Metric.py`) computes: 2 x 2 blocks,
  each block's orthonormal DCT coefficients smoothed by a Gaussian of sigma 10 (scipy.ndimage
  `gaussian_filter`: reflect boundary, truncate 4.0); rows/columns not covered by whole blocks (odd sizes)
  stay 0; a map smaller than one block is one block; Dist counts coefficients strictly above the mean.
- "paper", sections 3.2-3.5 of the paper: the feature map is Gaussian-filtered (sigma 1 by default,
  reflect boundary, truncate 4.0), then cut into 4 x 4 blocks, each block DCT-transformed (a map smaller
  than a block is one block; a remainder narrower than a block is a smaller block of its own); Dist
  counts coefficients >= the mean.

Both are separable linear maps of F: F~ = T_H F T_W^T with a precomputed per-axis matrix T (Gaussian and
block-diagonal DCT folded together), so all images, channels and blocks of a layer are scored with two
matrix products and a few reductions.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from compress import CompressError
from compress.checks import int_in, number_in, require_choice
from compress.methods.base import Context
from compress.methods.structured import StructuredOptions, StructuredPruning
from compress.prune.features import FEATURES, feature_scores

VARIANTS = ("reference", "paper")
# Per-variant defaults of the block size and the Gaussian's sigma (the public code's 2 and 10; the paper's
# B_s = 4 and our choice of sigma for its unspecified filter).
DEFAULT_BLOCK = {"reference": 2, "paper": 4}
DEFAULT_SIGMA = {"reference": 10.0, "paper": 1.0}
DEFAULT_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
# The Gaussian operator is built from a support of 2 * truncate * sigma taps per sample, so these bound its
# memory; a sigma far above the map's size (224 at most here) filters to a nearly flat map anyway.
MAX_SIGMA = 1000.0
MAX_TRUNCATE = 100.0


# -- per-axis operators (float64 numpy, built once per size) -----------------------------------------------
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D (n x n): D @ x == scipy.fft.dct(x, norm="ortho")."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def gaussian_matrix(n: int, sigma: float, truncate: float = DEFAULT_TRUNCATE) -> np.ndarray:
    """G (n x n) with G @ x == scipy.ndimage.gaussian_filter1d(x, sigma, mode="reflect", truncate=truncate).

    The kernel is scipy's: exp(-k^2 / (2 sigma^2)) for |k| <= int(truncate * sigma + 0.5), normalised to
    sum 1. "reflect" extends the signal symmetrically about the edge between samples (d c b a | a b c d |
    d c b a), i.e. periodically with period 2n, so a kernel wider than the signal folds back many times.
    sigma = 0 is the identity.
    """
    if sigma == 0:
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    source = (np.arange(n)[:, None] + offsets[None, :]) % (2 * n)
    source = np.where(source >= n, 2 * n - 1 - source, source)  # mirror the second half of each period
    g = np.zeros((n, n))
    np.add.at(g, (np.repeat(np.arange(n), offsets.size), source.ravel()), np.tile(weights, n))
    return g


def _block_diagonal(blocks: list[np.ndarray], n: int) -> np.ndarray:
    """Square n x n matrix with `blocks` along the diagonal from the top left; rows/cols beyond stay 0."""
    out = np.zeros((n, n))
    start = 0
    for b in blocks:
        size = b.shape[0]
        out[start : start + size, start : start + size] = b
        start += size
    return out


def reference_axis_operator(n: int, block: int, sigma: float, truncate: float = DEFAULT_TRUNCATE) -> np.ndarray:
    """Per-axis matrix of the public code: Gaussian applied to each block's DCT coefficients (G_b D_b per
    block); the n % block trailing rows are left 0; a map smaller than one block is one block."""
    if n < block:
        return gaussian_matrix(n, sigma, truncate) @ dct_matrix(n)
    per_block = gaussian_matrix(block, sigma, truncate) @ dct_matrix(block)
    return _block_diagonal([per_block] * (n // block), n)


def paper_axis_operator(n: int, block: int, sigma: float, truncate: float = DEFAULT_TRUNCATE) -> np.ndarray:
    """Per-axis matrix of the paper: Gaussian filter over the whole axis, then a DCT per block of `block`
    samples; the remainder (n % block samples) is a smaller block of its own, so every sample counts."""
    sizes = [block] * (n // block) + ([n % block] if n % block else [])
    return _block_diagonal([dct_matrix(s) for s in sizes], n) @ gaussian_matrix(n, sigma, truncate)


@lru_cache(maxsize=256)
def axis_operator(variant: str, n: int, block: int, sigma: float, truncate: float) -> torch.Tensor:
    """The per-axis matrix T (float64, CPU) of `variant` for an axis of n samples (cached)."""
    build = reference_axis_operator if variant == "reference" else paper_axis_operator
    return torch.from_numpy(build(n, block, sigma, truncate))


# -- scoring ------------------------------------------------------------------------------------------------
def check_scoring(variant: str, lam: float, block: int | None, sigma: float | None, truncate: float) -> None:
    """The scorer's arguments, checked in one place for `method=cfdp`'s options and for direct callers of
    `channel_scores` / `frequency_maps` (block and sigma None: the variant's)."""
    require_choice(variant, "method.variant", VARIANTS)
    number_in("method.lam", lam, 0, 1e6)
    int_in("method.block", block, 1, allow_none=True)
    number_in("method.sigma", sigma, 0, MAX_SIGMA, allow_none=True)
    number_in("method.truncate", truncate, 0, MAX_TRUNCATE, low_open=True)


def _resolve(variant: str, lam: float, block: int | None, sigma: float | None, truncate: float) -> tuple[int, float]:
    """The variant's block and sigma where not given, after checking every argument (one-line errors)."""
    check_scoring(variant, lam, block, sigma, truncate)
    block = DEFAULT_BLOCK[variant] if block is None else block
    sigma = DEFAULT_SIGMA[variant] if sigma is None else sigma
    return block, float(sigma)


def frequency_maps(
    feature_maps: torch.Tensor, variant: str = "reference", *, block: int | None = None,
    sigma: float | None = None, truncate: float = DEFAULT_TRUNCATE,
) -> torch.Tensor:
    """F~ = T_H F T_W^T for every map of `feature_maps` (..., H, W), in the input's dtype and device."""
    block, sigma = _resolve(variant, 0.0, block, sigma, truncate)
    return _transform(feature_maps, variant, block, sigma, float(truncate))


def _transform(feature_maps: torch.Tensor, variant: str, block: int, sigma: float, truncate: float) -> torch.Tensor:
    h, w = feature_maps.shape[-2:]
    like = {"dtype": feature_maps.dtype, "device": feature_maps.device}
    t_h = axis_operator(variant, h, block, sigma, truncate).to(**like)
    t_w = axis_operator(variant, w, block, sigma, truncate).to(**like)
    # Right product first as one (N*C*H, W) x (W, W) GEMM, then the left one batched over the maps (the
    # fastest of the orders and einsum/block-reshape forms measured on CPU).
    with _full_precision_matmul():
        return torch.matmul(t_h, torch.matmul(feature_maps, t_w.T))


@contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """Keep float32 products in full precision even when the caller enabled TF32 for training: the
    reference variant's sigma-10 Gaussian leaves differences of ~1e-5 (relative) inside each block, which
    TF32's 10-bit mantissa would erase."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def channel_scores(
    feature_maps: torch.Tensor, variant: str = "reference", lam: float = 0.03, *, block: int | None = None,
    sigma: float | None = None, truncate: float = DEFAULT_TRUNCATE,
) -> torch.Tensor:
    """CFDP score of each channel, averaged over the images: float (N, C, H, W) -> (C,).

    `block` and `sigma` default to the variant's (reference: 2 and 10; paper: 4 and 1).
    Higher = more information = keep.
    """
    if feature_maps.dim() != 4 or not feature_maps.is_floating_point():
        raise CompressError(f"CFDP scores need float feature maps (N, C, H, W), got {tuple(feature_maps.shape)}")
    block, sigma = _resolve(variant, lam, block, sigma, truncate)
    # Maps from channels_last activations are strided over W: one copy here serves both uses below.
    feature_maps = feature_maps.contiguous()
    freq = _transform(feature_maps, variant, block, sigma, float(truncate)).flatten(-2)
    mean = freq.mean(-1, keepdim=True)  # over all H*W coefficients, uncovered zeros included
    spectral = torch.linalg.vector_norm(freq, dim=-1)
    # Dist: the comparison is written over `freq` itself as 0./1. floats and summed. A bool mask would be
    # counted through an int64 copy (count_nonzero / bool.sum): 6x slower here, and the largest temporary.
    compare = torch.gt if variant == "reference" else torch.ge
    dist = compare(freq, mean, out=freq).sum(-1) / freq.shape[-1]
    spatial = torch.linalg.vector_norm(feature_maps, dim=(-2, -1))
    return (dist * spectral + lam * spatial).mean(0)


# -- the method ---------------------------------------------------------------------------------------------
@dataclass
class CFDPOptions(StructuredOptions):
    """`method=cfdp`: the CFDP score's options, besides the structured ones (compress_rate, threshold,
    step_rate: `StructuredOptions`)."""

    name: str = "cfdp"
    variant: str = "reference"  # reference (the public code's metric) | paper (the paper's formulas)
    lam: float = 0.03  # weight of the spatial norm ||F||_F (the paper's lambda)
    batches: int = 5  # calibration batches ...
    batch_size: int = 128  # ... of this many training images (the public code: 5 x 128)
    feature: str = "relu"  # relu: relu(BN(conv)) as the public code's hooks | conv: the conv's own output
    augment: bool = False  # score augmented calibration images (the public code's loader augments)
    block: Optional[int] = None  # block size; null: the variant's (reference 2, paper 4)
    # Gaussian sigma; null: the variant's (reference 10 on DCT coefficients, paper 1 on the map)
    sigma: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scoring(self.variant, self.lam, self.block, self.sigma, DEFAULT_TRUNCATE)
        self.count("batches")
        self.count("batch_size")
        self.choice("feature", FEATURES)
        self.flag("augment")


class CFDP(StructuredPruning):
    """method=cfdp: keep the channels with the highest CFDP score (see `channel_scores` above)."""

    name = "cfdp"
    Options = CFDPOptions

    def __init__(self, options: CFDPOptions | None = None):
        super().__init__(options)
        opts = self.options
        self.block, self.sigma = _resolve(opts.variant, opts.lam, opts.block, opts.sigma, DEFAULT_TRUNCATE)

    def channel_scores(self, model: nn.Module, ctx: Context, layers: dict[str, nn.Conv2d]) -> dict[str, torch.Tensor]:
        opts = self.options
        # `channel_scores` here is the module-level scorer (a method's own name is not in scope in its body).
        score_maps = partial(channel_scores, variant=opts.variant, lam=float(opts.lam), block=self.block, sigma=self.sigma)
        batches = ctx.calibration_batches(opts.batches, opts.batch_size, augment=opts.augment)
        # Every layer is scored in the same forward passes (one per calibration batch).
        return feature_scores(model, layers, batches, score_maps, opts.feature)
