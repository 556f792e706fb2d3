"""Scores against plain per-channel computations; feature hooks; hrank/random methods end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.methods import get
from compress.models import build
from compress.prune.features import feature_scores
from compress.prune.scorers import hrank_map_score, l1_scores, random_scores
from tests.contexts import cpu_context

pytestmark = pytest.mark.usefixtures("threads")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)  # no BatchNorm after it
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.head(y.mean((2, 3)))


def tiny() -> Tiny:
    torch.manual_seed(0)
    model = Tiny().eval()
    model.bn1.running_mean.uniform_(-0.5, 0.5)
    model.bn1.weight.data.uniform_(0.5, 1.5)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    # Unequal batch sizes: the average must weight batches by their images.
    return [torch.randn(3, 3, 6, 6, generator=g), torch.randn(1, 3, 6, 6, generator=g)]


def test_l1_scores_match_a_loop():
    conv = nn.Conv2d(3, 4, 3)
    expected = torch.tensor([sum(abs(float(v)) for v in conv.weight.detach()[o].flatten()) for o in range(4)])
    torch.testing.assert_close(l1_scores({"c": conv})["c"], expected)


def known_rank_map(rank: int, n: int = 6) -> torch.Tensor:
    """An n x n map with non-negative entries and exactly `rank` (A[:, :rank] @ B[:rank] with A, B close to
    the identity: every non-zero singular value is near 1, far above matrix_rank's tolerance)."""
    g = torch.Generator().manual_seed(rank)
    a = torch.eye(n) + 0.05 * torch.rand(n, n, generator=g)
    b = torch.eye(n) + 0.05 * torch.rand(n, n, generator=g)
    return a[:, :rank] @ b[:rank]


# u u^T with u = (1, -1, 1, -1, 1, -1): rank 1, but its ReLU keeps the two "same sign" blocks: rank 2.
CHECKER = torch.outer(torch.tensor([1.0, -1.0] * 3), torch.tensor([1.0, -1.0] * 3))


def test_hrank_map_score_is_the_exact_rank_of_known_maps():
    maps = torch.stack([known_rank_map(r) for r in range(7)])  # ranks 0..6, one channel each
    torch.testing.assert_close(hrank_map_score(maps[None]), torch.arange(7.0))
    # Non-square maps: rank <= min(H, W); a float64 or half input is scored as float32.
    wide = torch.stack([known_rank_map(r)[:4] for r in (1, 3, 6)])  # 4 x 6: the rank-6 map keeps rank 4
    torch.testing.assert_close(hrank_map_score(wide[None].double()), torch.tensor([1.0, 3.0, 4.0]))
    # The batch mean: channel 0 has ranks 2 and 5 in two images, channel 1 ranks 0 and 6.
    two = torch.stack([torch.stack([known_rank_map(2), known_rank_map(0)]), torch.stack([known_rank_map(5), known_rank_map(6)])])
    torch.testing.assert_close(hrank_map_score(two), torch.tensor([3.5, 3.0]))


class Passthrough(nn.Module):
    """A 1x1 identity conv and a BatchNorm at its initial statistics: the conv's feature maps are the
    input's channels, and the relu feature is their ReLU (scaled by 1/sqrt(1 + eps), rank-neutral)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def test_hrank_feature_scores_are_the_known_ranks_of_conv_and_relu_maps():
    # Per image, six channels with known conv-map ranks; ReLU changes the last two: the checkerboard
    # (rank 1 -> 2) and a negative map (rank 1 -> 0).
    def image(r: list[int]) -> torch.Tensor:
        return torch.stack([known_rank_map(k) for k in r] + [CHECKER, -torch.ones(6, 6)])

    first = [image([0, 1, 3, 6])] * 3     # batch of 3 images
    second = [image([6, 2, 3, 0])]        # batch of 1 image, other ranks
    data = [torch.stack(first), torch.stack(second)]
    model = Passthrough(6).eval()
    conv = feature_scores(model, {"conv": model.conv}, data, hrank_map_score, feature="conv")["conv"]
    relu = feature_scores(model, {"conv": model.conv}, data, hrank_map_score, feature="relu")["conv"]
    # Each image counts once: (3 * first + 1 * second) / 4, not the mean of the two batch means.
    expected = torch.tensor([(3 * a + b) / 4 for a, b in zip([0, 1, 3, 6], [6, 2, 3, 0])])
    torch.testing.assert_close(conv, torch.cat([expected, torch.tensor([1.0, 1.0])]))
    torch.testing.assert_close(relu, torch.cat([expected, torch.tensor([2.0, 0.0])]))


def test_feature_scores_weight_batches_by_images_and_pick_the_feature():
    model, data = tiny(), batches()
    mean_act = lambda maps: maps.mean((0, 2, 3))
    conv = feature_scores(model, {"conv1": model.conv1}, data, mean_act, feature="conv")["conv1"]
    relu = feature_scores(model, {"conv1": model.conv1}, data, mean_act, feature="relu")["conv1"]
    images = torch.cat(data)
    with torch.no_grad():
        torch.testing.assert_close(conv, model.conv1(images).mean((0, 2, 3)))
        torch.testing.assert_close(relu, F.relu(model.bn1(model.conv1(images))).mean((0, 2, 3)))
    assert not model.training


def test_relu_maps_reach_the_scorer_as_contiguous_nchw_from_channels_last_models():
    model = tiny().to(memory_format=torch.channels_last)
    data = [b.contiguous(memory_format=torch.channels_last) for b in batches()]
    seen = []

    def record(maps):
        seen.append(maps.is_contiguous())
        return maps.mean((0, 2, 3))

    relu = feature_scores(model, {"conv1": model.conv1, "conv2": model.conv2}, data, record, feature="relu")
    assert seen == [True] * 4  # 2 layers x 2 batches
    images = torch.cat(data)
    with torch.no_grad():
        torch.testing.assert_close(relu["conv1"], F.relu(model.bn1(model.conv1(images))).mean((0, 2, 3)))


def test_random_scores_are_seeded_and_order_free():
    layers = {"b": nn.Conv2d(1, 3, 1), "a": nn.Conv2d(1, 2, 1)}
    first, again = random_scores(layers, 7), random_scores(dict(reversed(list(layers.items()))), 7)
    assert all(torch.equal(first[k], again[k]) for k in layers)
    assert not torch.equal(random_scores(layers, 8)["a"], first["a"])


def test_hrank_method_prunes_low_rank_channels_first():
    torch.manual_seed(0)
    model = build("resnet20", 10).eval()
    with torch.no_grad():  # make 8 inner channels of one block produce rank-0 (all-zero after ReLU) maps
        model.layer3[1].conv1.weight[:8] *= 10  # largest filters: L1 would keep exactly these
        model.layer3[1].bn1.weight[:8] = 0
        model.layer3[1].bn1.bias[:8] = -1.0
    calls = []

    def calibration(batches, batch_size, augment=False):
        calls.append((batches, batch_size))
        g = torch.Generator().manual_seed(0)
        return iter([torch.randn(batch_size, 3, 32, 32, generator=g) for _ in range(batches)])

    ctx = cpu_context("resnet20", num_classes=10, size=32, calibration=calibration)
    hrank = get("hrank")
    method = hrank(hrank.Options(compress_rate={"layer3.1.conv1": 0.125}, batches=2, batch_size=3))
    before = model.layer3[1].conv2.weight[:, 8:].clone()
    pruned = method.compress(model, ctx)
    assert calls == [(2, 3)]
    assert pruned.layer3[1].conv1.out_channels == 56
    torch.testing.assert_close(pruned.layer3[1].conv2.weight, before)  # exactly the 8 dead channels went
