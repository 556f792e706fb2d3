"""Per-channel scores of the basic criteria (higher = keep).

`l1_scores` and `random_scores` need no data; `hrank_map_score` is a `score_fn` for
`compress.prune.features.feature_scores` (HRank: average rank of a channel's feature maps).
"""
from __future__ import annotations

import torch
from torch import nn


def filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each output filter of a conv weight (C, ...): sum over |W[o, ...]|, (C,) float on the CPU."""
    return weight.detach().abs().flatten(1).sum(1).float().cpu()


def l1_scores(layers: dict[str, nn.Conv2d]) -> dict[str, torch.Tensor]:
    """L1 norm of each output filter (Li et al. 2017)."""
    return {name: filter_l1(conv.weight) for name, conv in layers.items()}


def random_scores(layers: dict[str, nn.Conv2d], seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores from one generator seeded with `seed`, drawn in sorted layer-name order (so
    the same seed gives the same scores whatever order `layers` comes in)."""
    generator = torch.Generator().manual_seed(int(seed))
    return {name: torch.rand(layers[name].out_channels, generator=generator) for name in sorted(layers)}


def hrank_map_score(maps: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the matrix rank of each channel's H x W feature map: (N, C, H, W) -> (C,).

    One batched SVD for all N * C maps; the tolerance is torch.linalg.matrix_rank's default
    (largest singular value * max(H, W) * float eps), the same rule as HRank's torch.matrix_rank.
    """
    return torch.linalg.matrix_rank(maps.float()).float().mean(0)
