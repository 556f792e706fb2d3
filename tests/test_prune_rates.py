"""Rate specs: the list notation's tiny grammar, patterns, errors that name the key."""
from __future__ import annotations

import time

import pytest
from torch import nn

from compress import CompressError
from compress.methods.structured import HRankOptions, L1Options, L1Pruning, RandomOptions
from compress.models import build
from compress.prune import layouts
from compress.prune.rates import MAX_PATTERNS, MAX_RATES, MAX_TEXT, RateSpec, keep_count, parse_rate_list


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


@pytest.mark.parametrize(
    "options, key, value",
    [(L1Options, "step_rate", 0), (L1Options, "step_rate", True), (L1Options, "threshold", "high"),
     (L1Options, "threshold", float("inf")), (L1Options, "compress_rate", "[0.1]*"), (L1Options, "compress_rate", 1.5),
     (HRankOptions, "batches", 0), (HRankOptions, "batch_size", True), (HRankOptions, "feature", "bn"),
     (RandomOptions, "seed", 2**64), (RandomOptions, "seed", "1")],
)
def test_method_options_are_checked(options, key, value):
    with pytest.raises(CompressError, match=rf"^method\.{key}: [^\n]*$"):
        options(**{key: value})


def test_structured_defaults_live_in_the_options():
    opts = L1Options()
    assert (opts.name, opts.compress_rate, opts.threshold, opts.step_rate) == ("l1", "paper", None, 0.1)
    method = L1Pruning()
    assert method.options == opts and method.rates is None and method.threshold is None
    assert L1Pruning.one_shot and L1Pruning.iterative and L1Pruning.changes_model
    assert L1Pruning(L1Options(compress_rate="[0.25]*2")).rates.listed == (0.25, 0.25)


# -- hostile rate strings: bounded before anything is built, and fast ------------------------------------------
HOSTILE = [
    "[0.1]*99999999999",  # the list would hold 10^11 floats
    "[0.1]*" + "9" * 5000,  # more digits than Python's int() reads
    "[0.1, 0.2]*6000",  # each bound holds, the product does not
    "+".join(["[0.1]*10000"] * 500),
    "[" + " " * (MAX_TEXT - 2) + "x",  # took minutes in the old grammar's backtracking
    "[" + "1" * (MAX_TEXT - 3) + "x]",
    "[0.1]" * 3000,  # too long
    "[0.1]*0" + "0" * 5000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_rate_string_fails_fast_with_one_line(text):
    start = time.perf_counter()
    with pytest.raises(CompressError) as error:
        RateSpec.parse(text)
    assert time.perf_counter() - start < 0.5
    message = str(error.value)
    assert message.startswith("method.compress_rate: ") and "\n" not in message and len(message) < 300


def test_the_bounds_are_generous():
    assert len(parse_rate_list(f"[0.5]*{MAX_RATES}")) == MAX_RATES
    assert len(RateSpec.parse([0.5] * MAX_RATES).listed) == MAX_RATES
    assert len(RateSpec.parse({f"layer{i}.*": 0.5 for i in range(MAX_PATTERNS)}).patterns) == MAX_PATTERNS
    for too_many in ([0.5] * (MAX_RATES + 1), {f"layer{i}.*": 0.5 for i in range(MAX_PATTERNS + 1)}):
        with pytest.raises(CompressError, match=r"^method\.compress_rate: .*at most"):
            RateSpec.parse(too_many)


def test_omegaconf_containers_parse_like_plain_ones():
    from omegaconf import OmegaConf

    assert RateSpec.parse(OmegaConf.create({"layer3.*": 0.5})).patterns == (("layer3.*", 0.5),)
    assert RateSpec.parse(OmegaConf.create([0.1, 0.2])).listed == (0.1, 0.2)
