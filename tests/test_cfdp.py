"""CFDP: the vectorised scorer against plain per-map implementations written from each variant's formula,
and method=cfdp pruning a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dct
from scipy.ndimage import gaussian_filter1d
from torch import nn

from compress import CompressError
from compress.methods import cfdp
from compress.methods.base import Context
from compress.methods.cfdp import CFDP, CFDPOptions
from compress.models import build
from tests.cfdp_oracles import loop_scores, paper_map_score, reference_map_score
from tests.contexts import cpu_context


def random_maps(n: int, c: int, size: int, seed: int, relu: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g, dtype=torch.float64) * 2 + 0.5
    return x.clamp_min(0) if relu else x


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# -- operators --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("sigma", [0.6, 1.0, 10.0])
def test_gaussian_matrix_is_scipy_reflect_filter(n, sigma):
    x = np.random.default_rng(n).normal(size=n)
    expected = gaussian_filter1d(x, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(cfdp.gaussian_matrix(n, sigma) @ x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_dct_matrix_is_orthonormal_dct2(n):
    x = np.random.default_rng(n).normal(size=n)
    np.testing.assert_allclose(cfdp.dct_matrix(n) @ x, dct(x, norm="ortho"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cfdp.dct_matrix(n) @ cfdp.dct_matrix(n).T, np.eye(n), atol=1e-12)


# -- scores against the oracles ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 7, 2, 1])  # square, odd (last row/col left 0), one block, below a block
@pytest.mark.parametrize("relu", [False, True])
def test_reference_variant_matches_per_map_formula(size, relu):
    maps = random_maps(3, 5, size, seed=size, relu=relu)
    got = cfdp.channel_scores(maps, "reference", lam=0.03)
    assert got.shape == (5,) and got.dtype == torch.float64
    assert rel_err(got, loop_scores(maps, reference_map_score, lam=0.03)) < 1e-5


@pytest.mark.parametrize("size", [8, 7, 9, 4, 3, 1])  # square, odd (remainder block), one block, < a block
@pytest.mark.parametrize("relu", [False, True])
def test_paper_variant_matches_per_map_formula(size, relu):
    maps = random_maps(3, 5, size, seed=10 + size, relu=relu)
    got = cfdp.channel_scores(maps, "paper", lam=0.03)
    assert rel_err(got, loop_scores(maps, paper_map_score, lam=0.03)) < 1e-5


def test_paper_variant_on_non_square_maps():
    maps = torch.randn(2, 3, 6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert rel_err(cfdp.channel_scores(maps, "paper"), loop_scores(maps, paper_map_score, lam=0.03)) < 1e-5

def test_block_sigma_and_lam_options_reach_the_formula():
    maps = random_maps(2, 4, 12, seed=3)
    got = cfdp.channel_scores(maps, "paper", lam=0.5, block=3, sigma=0.7)
    assert rel_err(got, loop_scores(maps, paper_map_score, lam=0.5, block=3, sigma=0.7)) < 1e-5
    got = cfdp.channel_scores(maps, "reference", lam=0.1, block=4, sigma=2.0)
    assert rel_err(got, loop_scores(maps, reference_map_score, lam=0.1, block=4, sigma=2.0)) < 1e-5


def test_variants_differ_and_float32_stays_close_to_float64():
    maps = random_maps(4, 6, 16, seed=5, relu=True)
    ref, paper = cfdp.channel_scores(maps, "reference"), cfdp.channel_scores(maps, "paper")
    assert rel_err(ref, paper) > 1e-2
    for variant, exact in (("reference", ref), ("paper", paper)):
        assert rel_err(cfdp.channel_scores(maps.float(), variant), exact) < 1e-3


def test_channels_last_maps_score_the_same():
    maps = random_maps(2, 3, 8, seed=4, relu=True)
    for variant in cfdp.VARIANTS:
        torch.testing.assert_close(
            cfdp.channel_scores(maps.contiguous(memory_format=torch.channels_last), variant),
            cfdp.channel_scores(maps, variant),
        )


def test_lam_adds_the_spatial_norm():
    maps = random_maps(2, 3, 8, seed=9)
    spatial = torch.linalg.vector_norm(maps.flatten(-2), dim=-1).mean(0)
    diff = cfdp.channel_scores(maps, "paper", lam=1.0) - cfdp.channel_scores(maps, "paper", lam=0.0)
    torch.testing.assert_close(diff, spatial)


def test_a_silent_channel_scores_lowest():
    maps = random_maps(2, 4, 8, seed=1, relu=True)
    maps[:, 2] *= 1e-3
    for variant in cfdp.VARIANTS:
        assert cfdp.channel_scores(maps, variant).argmin().item() == 2


@pytest.mark.parametrize(
    "kwargs, key",
    [({"variant": "fft"}, "method.variant"), ({"lam": -1.0}, "method.lam"), ({"block": 0}, "method.block"),
     ({"sigma": -2.0}, "method.sigma")],
)
def test_bad_options_raise_compress_error(kwargs, key):
    with pytest.raises(CompressError, match=key):
        cfdp.channel_scores(random_maps(1, 2, 4, seed=0), **kwargs)


# -- method=cfdp --------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.linear = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.linear(x.mean((2, 3)))


def tiny_context(arch: str, calls: list | None = None, size: int = 16) -> Context:
    def calibration(batches: int, batch_size: int, augment: bool = False):
        if calls is not None:
            calls.append((batches, batch_size, augment))
        g = torch.Generator().manual_seed(0)
        return iter([torch.randn(batch_size, 3, size, size, generator=g) for _ in range(batches)])

    return cpu_context(arch, num_classes=10, size=size, calibration=calibration)


@pytest.mark.parametrize("variant", cfdp.VARIANTS)
@pytest.mark.parametrize("feature", ["relu", "conv"])
def test_cfdp_prunes_the_silent_channels_of_a_tiny_model(variant, feature):
    torch.manual_seed(0)
    model = TinyNet().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # channels that produce nothing score 0 and must be the ones removed
        model.conv1.weight[[0, 2, 5, 7]] = 0
        model.conv2.weight[[1, 4, 5]] = 0
        original["conv1.weight"][[0, 2, 5, 7]] = 0
    calls: list = []
    method = CFDP(CFDPOptions(variant=variant, feature=feature, batches=2, batch_size=4, compress_rate=0.5))
    pruned = method.compress(model, tiny_context("tiny", calls))
    assert calls == [(2, 4, False)]  # every layer scored in the same calibration passes
    assert pruned.conv1.weight.shape == (4, 3, 3, 3) and pruned.conv2.weight.shape == (3, 4, 3, 3)
    assert pruned.linear.weight.shape == (10, 3)
    torch.testing.assert_close(pruned.conv1.weight, original["conv1.weight"][[1, 3, 4, 6]])
    torch.testing.assert_close(pruned.conv2.weight, original["conv2.weight"][[0, 2, 3]][:, [1, 3, 4, 6]])
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_cfdp_resnet_hrank_rates_prune_to_the_expected_shapes_and_reload():
    torch.manual_seed(0)
    model = build("resnet20", 10).eval()
    method = CFDP(CFDPOptions(compress_rate="[0.]+[0.18]*11", batches=1, batch_size=4))
    pruned = method.compress(model, tiny_context("resnet20", size=32))
    widths = {n: (m.in_channels, m.out_channels) for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["conv1"] == (3, 16)  # stem rate 0
    assert widths["layer1.0.conv1"] == (16, 13) and widths["layer1.2.conv2"] == (13, 13)  # 16 * 0.82 -> 13
    assert widths["layer2.1.conv1"] == (26, 26) and widths["layer2.2.conv2"] == (26, 26)  # 32 * 0.82 -> 26
    assert widths["layer3.0.conv1"] == (26, 52) and widths["layer3.2.conv2"] == (52, 64)  # stage-3 stream kept
    x = torch.randn(2, 3, 32, 32)
    fresh = type(method).restore(build("resnet20", 10), method.meta(pruned), pruned.state_dict())
    fresh.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(fresh.eval()(x), pruned(x))


@pytest.mark.parametrize(
    "kwargs, key",
    [({"variant": "dct"}, "method.variant"), ({"feature": "bn"}, "method.feature"), ({"batches": 0}, "method.batches"),
     ({"batch_size": 2.5}, "method.batch_size"), ({"augment": "yes"}, "method.augment"),
     ({"sigma": -1}, "method.sigma"), ({"sigma": 1e9}, "method.sigma"), ({"lam": float("nan")}, "method.lam"),
     ({"block": True}, "method.block"), ({"step_rate": 0}, "method.step_rate"),
     ({"compress_rate": "[0.1]*99999999999"}, "method.compress_rate")],
)
def test_cfdp_rejects_bad_options(kwargs, key):
    with pytest.raises(CompressError, match=rf"^{key}: [^\n]*$"):
        CFDPOptions(**kwargs)


def test_cfdp_options_defaults_and_resolved_variant_defaults():
    opts = CFDPOptions()
    assert (opts.name, opts.compress_rate, opts.threshold, opts.step_rate, opts.variant, opts.lam) == (
        "cfdp", "paper", None, 0.1, "reference", 0.03)
    assert opts.rate_spec is None  # "paper": resolved against the architecture when the model arrives
    assert (CFDP(opts).block, CFDP(opts).sigma) == (2, 10.0)
    assert (CFDP(CFDPOptions(variant="paper")).block, CFDP(CFDPOptions(variant="paper")).sigma) == (4, 1.0)
    assert CFDP(CFDPOptions(variant="paper", block=3, sigma=0.0)).block == 3
