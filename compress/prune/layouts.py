"""Where the HRank/CFDP per-architecture rate lists go (the `"[0.]+[0.18]*29"` notation).

The papers' code (HRankPlus, reused by CFDP) builds the pruned network from the list directly; these
functions give the same widths by assigning each rate to convolutions of our models:

- CIFAR ResNet-(6n+2) (`3 + 3n` rates): rate[0] the stem conv; rate[1] / rate[2] the residual stream
  (block outputs, conv2) of stages 1 / 2; the stream of stage 3 is not pruned; rate[3 + i] the inner
  channels (conv1) of block i (27 blocks for ResNet-56). The stem and the stage-1 stream have separate
  widths there, so `decouple_for_list` gives block layer1.0 a channel-routing shortcut instead of the
  identity (the HRank code crops / pads there in the same way).
- VGG-16-BN (12 or 13 rates): one rate per convolution in order; the 13th conv is not pruned when only
  12 rates are given (HRank appends 0).
- GoogLeNet (10 rates): rate[0] belongs to the stem and is NOT applied (HRank's code builds the stem at
  full width whatever the rate says); rate[1 + k] prunes Inception module k (a3 .. b5): the 3x3 branch's
  3x3 conv and both 3x3 convs of the "5x5" branch; in the last module (b5) only the first 3x3 conv of the
  "5x5" branch, so the classifier input keeps its width.
- torchvision ResNet-50 (`1 + 3 + 16` rates): rate[0] the stem, rate[1..3] the stream (conv3 and the
  downsample conv) of stages 1..3 (stage 4 is not pruned), rate[4 + i] both inner convs (conv1, conv2)
  of bottleneck block i.
"""
from __future__ import annotations

from torch import nn

from compress import CompressError
from compress.prune.rates import KEY


def listed_rates(model: nn.Module, rates: list[float]) -> dict[str, float]:
    """Conv name -> rate for the HRank list notation on `model`'s architecture."""
    from compress.models.cifar_googlenet import CifarGoogLeNet
    from compress.models.cifar_resnet import CifarResNet
    from compress.models.cifar_vgg import CifarVGG

    if isinstance(model, CifarResNet):
        return _cifar_resnet(model, rates)
    if isinstance(model, CifarVGG):
        return _vgg(model, rates)
    if isinstance(model, CifarGoogLeNet):
        return _googlenet(model, rates)
    if _is_torchvision_bottleneck_resnet(model):
        return _resnet50(model, rates)
    raise CompressError(
        f"{KEY}: the list notation is defined for CIFAR ResNets, VGG-16-BN, GoogLeNet and ResNet-50 only "
        f"(got {type(model).__name__}); use a float or a dict of layer-name patterns"
    )


def decouple_for_list(model: nn.Module) -> None:
    """Give CIFAR ResNets a routing shortcut in layer1.0 so that the stem and the stage-1 stream can have
    different widths (as in HRank's layout). Functionally identical to the identity it replaces."""
    from compress.models.cifar_resnet import CifarResNet, ShortcutA

    if isinstance(model, CifarResNet):
        block = model.layer1[0]
        if isinstance(block.shortcut, nn.Identity):
            channels = block.conv1.in_channels
            shortcut = ShortcutA(0, 0, stride=1)
            shortcut.set_padding_routes(channels)
            block.shortcut = shortcut.to(block.conv1.weight.device)


def _expect(rates: list[float], count: int | tuple[int, ...], what: str) -> None:
    counts = (count,) if isinstance(count, int) else count
    if len(rates) not in counts:
        raise CompressError(f"{KEY}: {what} takes {' or '.join(map(str, counts))} rates, got {len(rates)}")


def _cifar_resnet(model: nn.Module, rates: list[float]) -> dict[str, float]:
    stages = [model.layer1, model.layer2, model.layer3]
    blocks = [f"layer{s + 1}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))]
    _expect(rates, 3 + len(blocks), f"a CIFAR ResNet with {len(blocks)} blocks")
    out = {"conv1": rates[0]}
    for s in (0, 1):  # stage 3's stream stays at full width
        for i in range(len(stages[s])):
            out[f"layer{s + 1}.{i}.conv2"] = rates[1 + s]
    for i, block in enumerate(blocks):
        out[f"{block}.conv1"] = rates[3 + i]
    return out


def _vgg(model: nn.Module, rates: list[float]) -> dict[str, float]:
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    _expect(rates, (len(convs) - 1, len(convs)), f"VGG with {len(convs)} convolutions")
    return dict(zip(convs, list(rates) + [0.0]))


def _googlenet(model: nn.Module, rates: list[float]) -> dict[str, float]:
    from compress.models.cifar_googlenet import INCEPTIONS

    _expect(rates, 1 + len(INCEPTIONS), "GoogLeNet")
    out: dict[str, float] = {}
    for k, (name, _) in enumerate(INCEPTIONS):
        rate, prefix = rates[1 + k], f"inception_{name}"
        last = k == len(INCEPTIONS) - 1
        out[f"{prefix}.branch5x5.3"] = rate
        if not last:
            out[f"{prefix}.branch3x3.3"] = rate
            out[f"{prefix}.branch5x5.6"] = rate
    return out


def _is_torchvision_bottleneck_resnet(model: nn.Module) -> bool:
    try:
        from torchvision.models.resnet import Bottleneck, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(model, ResNet) and isinstance(model.layer1[0], Bottleneck)


def _resnet50(model: nn.Module, rates: list[float]) -> dict[str, float]:
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    blocks = [f"layer{s + 1}.{i}" for s, stage in enumerate(stages) for i in range(len(stage))]
    _expect(rates, len(stages) + len(blocks), f"a bottleneck ResNet with {len(blocks)} blocks")
    out = {"conv1": rates[0]}
    for s in range(len(stages) - 1):
        for i in range(len(stages[s])):
            out[f"layer{s + 1}.{i}.conv3"] = rates[1 + s]
    for i, block in enumerate(blocks):
        out[f"{block}.conv1"] = out[f"{block}.conv2"] = rates[len(stages) + i]
    return out
