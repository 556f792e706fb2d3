"""GoogLeNet (Inception v1) for 32x32 inputs, in the layout of the HRank / CFDP CIFAR code.

A 3x3 stem (192 channels) and nine Inception modules (a3, b3, max-pool, a4..e4, max-pool, a5, b5), each
with four branches concatenated on the channel axis: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (the "5x5" branch
is two 3x3 convolutions); 3x3 max-pool -> 1x1. Every conv has a bias and is followed by BN and ReLU.
8x8 average pool, Linear(1024, num_classes). Module names follow that code (`pre_layers.0`,
`inception_a3.branch3x3.3` ...). Unpruned: 6.15M parameters, 1.52G MACs.
"""
from __future__ import annotations

import torch
from torch import nn

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
INCEPTIONS: tuple[tuple[str, tuple[int, int, int, int, int, int]], ...] = (
    ("a3", (64, 96, 128, 16, 32, 32)),
    ("b3", (128, 128, 192, 32, 96, 64)),
    ("a4", (192, 96, 208, 16, 48, 64)),
    ("b4", (160, 112, 224, 24, 64, 64)),
    ("c4", (128, 128, 256, 24, 64, 64)),
    ("d4", (112, 144, 288, 32, 64, 64)),
    ("e4", (256, 160, 320, 32, 128, 128)),
    ("a5", (256, 160, 320, 32, 128, 128)),
    ("b5", (384, 192, 384, 48, 128, 128)),
)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class Inception(nn.Module):
    def __init__(self, in_channels: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_proj: int):
        super().__init__()
        self.branch1x1 = nn.Sequential(*conv_bn_relu(in_channels, n1x1, 1))
        self.branch3x3 = nn.Sequential(*conv_bn_relu(in_channels, n3x3red, 1), *conv_bn_relu(n3x3red, n3x3, 3))
        self.branch5x5 = nn.Sequential(
            *conv_bn_relu(in_channels, n5x5red, 1), *conv_bn_relu(n5x5red, n5x5, 3), *conv_bn_relu(n5x5, n5x5, 3)
        )
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *conv_bn_relu(in_channels, pool_proj, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], 1)


class CifarGoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.pre_layers = nn.Sequential(*conv_bn_relu(3, 192, 3))
        in_channels = 192
        for name, widths in INCEPTIONS:
            module = Inception(in_channels, *widths)
            setattr(self, f"inception_{name}", module)
            in_channels = module.out_channels
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre_layers(x)
        out = self.inception_b3(self.inception_a3(out))
        out = self.maxpool1(out)
        for name in ("a4", "b4", "c4", "d4", "e4"):
            out = getattr(self, f"inception_{name}")(out)
        out = self.maxpool2(out)
        out = self.inception_b5(self.inception_a5(out))
        return self.linear(self.avgpool(out).flatten(1))


def googlenet(num_classes: int = 10) -> CifarGoogLeNet:
    return CifarGoogLeNet(num_classes)
