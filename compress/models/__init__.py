"""Architectures by name. Each entry builds an untrained nn.Module; weights are the pipeline's business."""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from compress import CompressError

# name -> (module, function, fixed kwargs). Imported lazily so that a missing optional dependency of one
# architecture never breaks the others.
_ARCHS: dict[str, tuple[str, str, dict]] = {
    **{f"resnet{d}": ("compress.models.cifar_resnet", "resnet", {"depth": d}) for d in (20, 32, 44, 56, 110)},
    "vgg16_bn": ("compress.models.cifar_vgg", "vgg16_bn", {}),
    "googlenet": ("compress.models.cifar_googlenet", "googlenet", {}),
    # ImageNet models come from torchvision unchanged.
    "resnet18_imagenet": ("torchvision.models", "resnet18", {}),
    "resnet50_imagenet": ("torchvision.models", "resnet50", {}),
    "vgg16_bn_imagenet": ("torchvision.models", "vgg16_bn", {}),
    "convnext_tiny_imagenet": ("torchvision.models", "convnext_tiny", {}),
}


def names() -> list[str]:
    return sorted(_ARCHS)


def build(name: str, num_classes: int) -> nn.Module:
    """An untrained model of architecture `name` with `num_classes` outputs."""
    if name not in _ARCHS:
        raise CompressError(f"arch.name: unknown architecture '{name}' (known: {', '.join(names())})")
    module, fn, kwargs = _ARCHS[name]
    builder: Callable[..., nn.Module] = getattr(importlib.import_module(module), fn)
    return builder(num_classes=num_classes, **kwargs)
