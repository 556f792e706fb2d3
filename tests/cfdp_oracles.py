"""Plain per-map CFDP implementations written from each variant's formula: loops over images, channels
and blocks, scipy doing the transforms. The tests check the vectorised scorer against them; the
benchmark times the scorer against them."""
from __future__ import annotations

import numpy as np
import torch
from scipy.fft import dctn
from scipy.ndimage import gaussian_filter


def reference_map_score(fmap: np.ndarray, lam: float, block: int = 2, sigma: float = 10.0) -> float:
    """The public code's formula: per block, Gaussian(sigma) of the block's orthonormal DCT; uncovered
    trailing rows/columns stay 0; a map smaller than a block is one block; Dist = #(> mean) / H^2."""
    h = fmap.shape[0]
    blocks = h // block
    freq = np.zeros_like(fmap)
    if blocks == 0:
        freq = gaussian_filter(dctn(fmap, norm="ortho"), sigma=sigma)
    for bx in range(blocks):
        for by in range(blocks):
            rows, cols = slice(bx * block, (bx + 1) * block), slice(by * block, (by + 1) * block)
            freq[rows, cols] = gaussian_filter(dctn(fmap[rows, cols], norm="ortho"), sigma=sigma)
    dist = (freq > freq.mean()).sum() / h**2
    return float(np.linalg.norm(freq) * dist + lam * np.linalg.norm(fmap))


def paper_map_score(fmap: np.ndarray, lam: float, block: int = 4, sigma: float = 1.0) -> float:
    """The paper's formula (with this project's choices): Gaussian-filter the map (reflect, truncate 4),
    DCT per block (a remainder is a smaller block; a small map is one block), Dist = mean(>= mean)."""
    smooth = gaussian_filter(fmap, sigma=sigma, mode="reflect", truncate=4.0)
    freq = np.zeros_like(fmap)
    h, w = fmap.shape
    for x0 in range(0, h, block):
        for y0 in range(0, w, block):
            rows, cols = slice(x0, min(x0 + block, h)), slice(y0, min(y0 + block, w))
            freq[rows, cols] = dctn(smooth[rows, cols], norm="ortho")
    dist = (freq >= freq.mean()).mean()
    return float(np.linalg.norm(freq) * dist + lam * np.linalg.norm(fmap))


def loop_scores(maps: torch.Tensor, map_score, **kwargs) -> np.ndarray:
    x = maps.double().numpy()
    per_map = np.array([[map_score(x[i, c], **kwargs) for c in range(x.shape[1])] for i in range(x.shape[0])])
    return per_map.mean(0)
