"""Pruned shapes of the papers' settings (HRank/CFDP list notation), on random weights with l1 scores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.deploy.measure import count_macs, count_params
from compress.methods.structured import L1Options, L1Pruning
from compress.models import build
from tests.contexts import cpu_context


def pruned(arch: str, rate: str) -> nn.Module:
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    ctx = cpu_context(arch, num_classes=10, size=32)
    return L1Pruning(L1Options(compress_rate=rate)).compress(model, ctx)


def conv_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_resnet56_hrank_layout_matches_papers():
    model = pruned("resnet56", "[0.]+[0.18]*29")
    params, macs = count_params(model), count_macs(model, (3, 32, 32))
    assert params == pytest.approx(0.66e6, abs=0.01e6)
    # HRank/CFDP report 90.35M with their counter; conv+linear MACs of the same shapes are 89.46M.
    assert macs == pytest.approx(90.35e6, rel=0.015)
    assert 1 - macs / 125.49e6 == pytest.approx(0.28, abs=0.01)
    widths = conv_widths(model)
    assert widths["conv1"] == (3, 16)  # stem rate 0
    assert widths["layer1.0.conv1"] == (16, 13) and widths["layer1.0.conv2"] == (13, 13)  # stream 16*0.82 -> 13
    assert widths["layer2.3.conv1"] == (26, 26) and widths["layer2.3.conv2"] == (26, 26)  # 32*0.82 -> 26
    assert widths["layer3.0.conv1"] == (26, 52) and widths["layer3.8.conv2"] == (52, 64)  # stage-3 stream unpruned
    assert model.linear.in_features == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_hrank_layout_matches_papers():
    model = pruned("vgg16_bn", "[0.21]*7+[0.75]*5")
    assert count_params(model) == pytest.approx(2.76e6, abs=0.01e6)
    assert count_macs(model, (3, 32, 32)) == pytest.approx(131e6, rel=0.01)
    widths = [out for _, out in conv_widths(model).values()]
    assert widths == [50, 50, 101, 101, 202, 202, 202, 128, 128, 128, 128, 128, 512]  # 13th conv kept
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_googlenet_hrank_layout_matches_papers():
    model = pruned("googlenet", "[0.3]+[0.6]*2+[0.7]*5+[0.8]*2")
    assert count_params(model) == pytest.approx(2.86e6, abs=0.01e6)
    assert count_macs(model, (3, 32, 32)) == pytest.approx(0.65e9, rel=0.015)
    widths = conv_widths(model)
    assert widths["pre_layers.0"] == (3, 192)  # rate[0] is not applied, as in HRank's code
    assert widths["inception_a3.branch3x3.3"][1] == int(128 * (1 - 0.6))
    assert widths["inception_a5.branch3x3.3"][1] == 63  # int(320 * (1 - 0.8)) truncates float error, as HRank
    assert widths["inception_b5.branch3x3.3"][1] == 384 and widths["inception_b5.branch5x5.6"][1] == 128
    assert model.linear.in_features == 1024
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_paper_rate_is_the_tables_list_for_the_architecture():
    assert count_params(pruned("resnet56", "paper")) == count_params(pruned("resnet56", "[0.]+[0.18]*29"))
    from compress import CompressError

    with pytest.raises(CompressError, match="method.compress_rate: 'paper' .* not resnet20"):
        pruned("resnet20", "paper")
