"""VGG-16 with BatchNorm for 32x32 inputs, in the layout of the HRank / CFDP CIFAR code.

13 conv3x3(bias)-BN-ReLU blocks with max-pooling after the 2nd, 4th, 7th and 10th convolution (none after
the 13th: the 2x2 map is average-pooled to 1x1), then a classifier Linear(512, 512) - BatchNorm1d - ReLU -
Linear(512, num_classes). Module names follow that code (`features.conv<i>`, `features.norm<i>`,
`classifier.linear1` ...) so its checkpoints load. Unpruned: 14.98M parameters, 313.5M MACs.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# Output widths of the 13 convolutions; "M" = 2x2 max-pool.
VGG16_LAYOUT: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    def __init__(self, layout: tuple = VGG16_LAYOUT, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential()
        in_channels = 3
        for position, width in enumerate(layout):
            if width == "M":
                self.features.add_module(f"pool{position}", nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            self.features.add_module(f"conv{position}", nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
            self.features.add_module(f"norm{position}", nn.BatchNorm2d(width))
            self.features.add_module(f"relu{position}", nn.ReLU(inplace=True))
            in_channels = width
        self.pool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(in_channels, 512),
                norm1=nn.BatchNorm1d(512),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(512, num_classes),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16_bn(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(VGG16_LAYOUT, num_classes)
