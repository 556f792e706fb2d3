"""Models as a user writes them, for `arch=module` (tests/test_own_model.py): plain PyTorch, no compress import."""
from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """conv-BN-ReLU x2, a depthwise conv, pooling, a classifier: small enough for a whole run in seconds."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def fixed_ten():
    """A builder that takes no num_classes (called as given)."""
    return TinyNet(10)


def not_a_model(num_classes: int = 10):
    return {"num_classes": num_classes}


def broken(num_classes: int = 10):
    raise RuntimeError("the user's builder fails")


NOT_CALLABLE = 3
