"""A small generated data set: each class is an oriented colour grating, plus noise. Learnable in a
few batches, so smoke runs and tests exercise real training."""
from __future__ import annotations

import math

import torch


def make_synthetic(n: int, num_classes: int, image_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    angle = labels.float() * (math.pi / num_classes)
    freq = 2.0 + (labels % 3).float()
    coords = torch.linspace(0, 2 * math.pi, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    phase = torch.rand(n, generator=g) * 2 * math.pi
    wave = torch.sin(freq[:, None, None] * (xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None])
                     + phase[:, None, None])
    colour = torch.stack([torch.cos(angle), torch.sin(angle), torch.cos(2 * angle)], 1)  # (n, 3)
    img = 0.5 + 0.3 * wave[:, None] * colour[:, :, None, None] + 0.1 * torch.randn(n, 3, image_size, image_size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64)
