"""CIFAR VGG-16-BN and GoogLeNet sizes (HRank layouts); ResNet checkpoints still load with ShortcutA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.deploy.measure import count_macs, count_params
from compress.models import build
from compress.models.cifar_resnet import ShortcutA
from compress.prune.engine import route_shortcuts
from tests.conftest import RESNET20_CHECKPOINT, needs_shared

pytestmark = pytest.mark.usefixtures("threads")


def params_without_batchnorm(model: nn.Module) -> int:
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters())
    return count_params(model) - bn


def test_vgg16_bn_size():
    model = build("vgg16_bn", 10)
    # The papers' 14.98M leaves out BatchNorm's affine parameters; with them: 14.99M.
    assert params_without_batchnorm(model) == pytest.approx(14.98e6, abs=0.005e6)
    assert count_params(model) == 14_991_946
    assert count_macs(model, (3, 32, 32)) == pytest.approx(313.5e6, rel=0.001)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == ["classifier.linear1", "classifier.linear2"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_googlenet_size():
    model = build("googlenet", 10)
    assert params_without_batchnorm(model) == pytest.approx(6.15e6, abs=0.005e6)
    assert count_macs(model, (3, 32, 32)) == pytest.approx(1.52e9, rel=0.002)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes():
    assert build("vgg16_bn", 100).classifier.linear2.out_features == 100
    assert build("googlenet", 100).linear.out_features == 100


@needs_shared
def test_pretrained_resnet_loads_with_routing_shortcut():
    state = torch.load(RESNET20_CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    model = build("resnet20", 10).eval()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})  # strict: no shortcut keys
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    route_shortcuts(model, (3, 32, 32))  # explicit routes compute exactly what the padding did
    assert [m.in_channels for m in model.modules() if isinstance(m, ShortcutA)] == [16, 32]
    assert torch.equal(model(x), before)
