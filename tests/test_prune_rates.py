"""Rate specs: the list notation's tiny grammar, patterns, errors that name the key."""
from __future__ import annotations

import pytest
from torch import nn

from compress import CompressError
from compress.methods import get
from compress.models import build
from compress.prune import layouts
from compress.prune.rates import RateSpec, keep_count, parse_rate_list


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[0.]+[0.18]*29", [0.0] + [0.18] * 29),
        ("[0.21]*7+[0.75]*5", [0.21] * 7 + [0.75] * 5),
        ("[0.3]+[0.6]*2+[0.7]*5+[0.8]*2", [0.3] + [0.6] * 2 + [0.7] * 5 + [0.8] * 2),
        ("[0.]+[0.1]*3+[0.35]*16", [0.0] + [0.1] * 3 + [0.35] * 16),
        (" [0.1, .2] * 2 + [1] ", [0.1, 0.2, 0.1, 0.2, 1.0]),
        ("[5e-1]", [0.5]),
    ],
)
def test_parse_rate_list(text, expected):
    assert parse_rate_list(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("[0.1]*", "cannot parse"),
        ("[0.1]**2", "cannot parse"),
        ("[0.1]+", "cannot parse"),
        ("0.1*3", "cannot parse"),
        ("[0.1]*2.5", "cannot parse"),
        ("[a]", "comma-separated numbers"),
        ("[]", "comma-separated numbers"),
        ("[__import__('os')]", "comma-separated numbers"),
        ("[0.5]*0", "repeats zero times"),
        ("[1.5]", r"in \[0, 1\]"),
        ("[-0.1]", r"in \[0, 1\]"),
    ],
)
def test_parse_errors_name_the_key(text, message):
    with pytest.raises(CompressError, match=rf"^method\.compress_rate: .*{message}"):
        parse_rate_list(text)


def test_spec_forms():
    assert RateSpec.parse(0.25).uniform == 0.25
    assert RateSpec.parse("0.25").uniform == 0.25
    assert RateSpec.parse("[0.25]*2").listed == (0.25, 0.25)
    assert RateSpec.parse([0.1, 0.2]).listed == (0.1, 0.2)
    spec = RateSpec.parse({"layer3.*.conv1": 0.5, "layer*": 0.1})
    assert spec.pattern_rate(["layer3.4.conv1"]) == 0.5
    assert spec.pattern_rate(["layer1.0.conv2", "conv1"]) == 0.1  # any member of a group may match
    assert spec.pattern_rate(["conv1"]) is None
    for bad, message in [(True, "expected a float"), (2, r"in \[0, 1\]"), ({}, "empty"), ({"x": "a"}, r"method\.compress_rate\.x")]:
        with pytest.raises(CompressError, match=message):
            RateSpec.parse(bad)


def test_keep_count_truncates_like_hrank_and_never_empties():
    assert keep_count(16, 0.18) == 13 and keep_count(32, 0.18) == 26 and keep_count(64, 0.18) == 52
    assert keep_count(320, 0.8) == 63  # 320 * 0.19999999999999996
    assert keep_count(16, 1.0) == 1 and keep_count(1, 0.9) == 1 and keep_count(16, 0.0) == 16


def test_list_length_is_checked_per_architecture():
    with pytest.raises(CompressError, match=r"method\.compress_rate: a CIFAR ResNet with 27 blocks takes 30 rates, got 29"):
        layouts.listed_rates(build("resnet56", 10), [0.1] * 29)
    with pytest.raises(CompressError, match=r"VGG with 13 convolutions takes 12 or 13 rates"):
        layouts.listed_rates(build("vgg16_bn", 10), [0.1] * 5)
    with pytest.raises(CompressError, match="list notation is defined for"):
        layouts.listed_rates(nn.Sequential(nn.Conv2d(3, 4, 3)), [0.1])


def test_resnet50_layout():
    rates = layouts.listed_rates(build("resnet50_imagenet", 1000), [0.0] + [0.1] * 3 + [0.35] * 16)
    assert rates["conv1"] == 0.0 and rates["layer3.5.conv3"] == 0.1 and "layer4.0.conv3" not in rates
    assert rates["layer4.2.conv1"] == rates["layer4.2.conv2"] == 0.35 and len(rates) == 1 + 13 + 32


def test_method_options_are_checked():
    with pytest.raises(CompressError, match=r"method\.step_rate"):
        get("l1")(step_rate=0)
    with pytest.raises(CompressError, match=r"method\.threshold"):
        get("l1")(threshold="high")
    with pytest.raises(CompressError, match=r"method\.batches"):
        get("hrank")(batches=0)
    with pytest.raises(CompressError, match=r"method\.feature"):
        get("hrank")(feature="bn")
    with pytest.raises(CompressError, match=r"method\.colour: not an option of method 'l1'"):
        get("l1")(colour="red")
