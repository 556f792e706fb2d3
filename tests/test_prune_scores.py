"""Scores against plain per-channel computations; feature hooks; hrank/random methods end to end."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.methods import get
from tests.contexts import cpu_context
from compress.models import build
from compress.prune.features import feature_scores
from compress.prune.scorers import hrank_map_score, l1_scores, random_scores

torch.set_num_threads(1)


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


def test_hrank_scores_match_per_map_ranks():
    model, data = tiny(), batches()
    layers = {"conv1": model.conv1, "conv2": model.conv2}
    scores = feature_scores(model, layers, data, hrank_map_score, feature="relu")
    images = torch.cat(data)
    maps = {"conv1": F.relu(model.bn1(model.conv1(images))), "conv2": F.relu(model.conv2(F.relu(model.bn1(model.conv1(images)))))}
    for name, m in maps.items():
        ranks = torch.tensor([[float(torch.linalg.matrix_rank(m[i, c])) for c in range(m.shape[1])] for i in range(m.shape[0])])
        torch.testing.assert_close(scores[name], ranks.mean(0))
    # ReLU of low-rank maps: the relu feature must differ from the conv feature somewhere
    assert scores["conv1"].max() <= 6


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
    method = get("hrank")(compress_rate={"layer3.1.conv1": 0.125}, batches=2, batch_size=3)
    before = model.layer3[1].conv2.weight[:, 8:].clone()
    pruned = method.compress(model, ctx)
    assert calls == [(2, 3)]
    assert pruned.layer3[1].conv1.out_channels == 56
    torch.testing.assert_close(pruned.layer3[1].conv2.weight, before)  # exactly the 8 dead channels went
