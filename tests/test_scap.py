"""SCAP: interaction field, spectra, fidelity, autoencoder, the normalised importance and its threshold,
coupled groups, determinism, chunking."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from compress import CompressError, models
from compress.methods import scap
from compress.methods.base import Context
from compress.methods.scap import SCAP, SCAPOptions
from compress.methods.structured import L1Options, L1Pruning
from compress.prune import engine
from compress.prune.rates import RateSpec
from compress.prune.scorers import filter_l1
from tests.contexts import cpu_context

# The rule before issue 26 (per-layer min-max of the uncentred fidelity, no L1 term, no per-layer floor), which
# these tests pin; the readings and today's defaults: tests/test_scap_readings.py.
MINMAX_LAYER = dict(normalise="minmax_layer", ae_center=False, l1_weight=0.0, compress_rate=1.0)


def Opts(**kw) -> SCAPOptions:
    return SCAPOptions(**{**MINMAX_LAYER, **kw})


# Small and fast: the autoencoder sees few spectra for few epochs.
FAST = dict(ae_hidden=4, ae_epochs=3, ae_samples=256, ae_batch_size=64, batches=2, batch_size=4)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    ).eval()


def make_ctx(seed: int = 0, images: int = 8, size: int = 8) -> Context:
    data = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(123))

    def calibration(batches, batch_size, augment=False):
        return iter(data[: batches * batch_size].split(batch_size))

    return cpu_context(size=size, seed=seed, calibration=calibration)


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# -- the field ------------------------------------------------------------------------------------------------
def test_interaction_field_shapes_and_parts():
    x = torch.randn(2, 3, 4, 5)
    y = torch.randn(2, 6, 4, 5)
    z = scap.interaction_field(x, y)
    assert z.shape == (2, 6, 3, 4, 5) and z.is_complex()
    # real part: input channel c, the same for every output channel j
    assert torch.equal(z.real[1, 4, 2], x[1, 2]) and torch.equal(z.real[1, 0, 2], x[1, 2])
    # imaginary part: output channel j, broadcast over input channels
    assert torch.equal(z.imag[0, 5, 0], y[0, 5]) and torch.equal(z.imag[0, 5, 2], y[0, 5])


def test_field_spectra_equal_fft_of_field():
    x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    direct = scap.plane_fft(scap.interaction_field(x, y))
    by_linearity = scap.field_spectra(scap.plane_fft(x), scap.plane_fft(y))
    assert torch.allclose(direct, by_linearity, atol=1e-5)


def test_align_output_nearest_repeats_each_pixel_over_its_stride_cell():
    y = torch.arange(4.0).view(1, 1, 2, 2)
    up = scap.align_output(y, (4, 4))
    assert up.shape == (1, 1, 4, 4)
    assert torch.equal(up[0, 0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    assert scap.align_output(y, (2, 2)) is y


def test_layer_planes_pair_strided_output_with_input_grid():
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    fx, fy = scap.layer_planes(x, y, dataclasses.replace(SCAP().spectrum_opts, balance="none"))
    assert fx.shape == (2, 3, 8, 8) and fy.shape == (2, 5, 8, 8)
    assert torch.allclose(fy, scap.plane_fft(scap.align_output(y, (8, 8))))


def test_balance_layer_keeps_relative_strength_and_channel_equalises():
    t = torch.ones(1, 2, 3, 3)
    t[:, 1] *= 3
    layer = scap.balance(t)
    assert torch.allclose(layer.pow(2).mean(), torch.tensor(1.0))
    assert torch.allclose(layer[0, 1] / layer[0, 0], torch.full((3, 3), 3.0))
    chan = scap.balance(t, per_channel=True)
    assert torch.allclose(chan, torch.ones_like(t))
    assert torch.equal(scap.balance(torch.zeros(1, 2, 3, 3)), torch.zeros(1, 2, 3, 3))


# -- spectra and fidelity -------------------------------------------------------------------------------------
def test_normalised_spectra_kinds_and_unit_norm():
    spectra = torch.tensor([[3 + 4j, 0j], [0j, 1j]]).view(1, 2, 2)
    for kind, expected in (("magnitude", [5.0, 0, 0, 1]), ("power", [25.0, 0, 0, 1]),
                           ("log", torch.log1p(torch.tensor([5.0, 0, 0, 1])).tolist())):
        v = scap.normalise_spectra(spectra, kind)
        e = torch.tensor(expected)
        assert torch.allclose(v, (e / e.norm()).view(1, 4)), kind
    with pytest.raises(CompressError, match="method.spectrum"):
        scap.normalise_spectra(spectra, "phase")


def test_fidelity_of_a_perfectly_reconstructable_spectrum_is_one():
    s = scap.normalise_spectra(torch.randn(5, 3, 4, 4, dtype=torch.complex64))
    # identity autoencoder (hidden = D, ReLU passes the non-negative spectra unchanged)
    d = s.shape[-1]
    identity = scap.Autoencoder(torch.eye(d), torch.zeros(d), torch.eye(d), torch.zeros(d), torch.zeros(d))
    assert torch.allclose(identity.fidelity(s), torch.ones(5, 3))
    # a scaled reconstruction is still perfect under the cosine
    assert torch.allclose(scap.cosine_fidelity(s, 7 * s), torch.ones(5, 3))
    # an orthogonal one scores 0
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert scap.cosine_fidelity(a, b).item() == 0.0


def test_trained_autoencoder_reconstructs_its_manifold_better_than_off_manifold():
    g = torch.Generator().manual_seed(0)
    # spectra on a 1-D manifold: mixtures of two fixed non-negative patterns
    base = torch.rand(2, 16, generator=g)
    w = torch.rand(512, 1, generator=g)
    on = scap.unit_norm(w * base[0] + (1 - w) * base[1])
    ae = scap.train_autoencoder(on, hidden=2, epochs=60, lr=1e-2, batch_size=64, generator=g)
    off = scap.unit_norm(torch.rand(64, 16, generator=g))
    on_fid, off_fid = ae.fidelity(on).mean().item(), ae.fidelity(off).mean().item()
    assert on_fid > 0.99
    assert off_fid < on_fid - 0.02


def test_centred_autoencoder_sees_deviations_from_the_mean_spectrum():
    g = torch.Generator().manual_seed(0)
    s = scap.unit_norm(torch.rand(64, 8, generator=g) + 5)  # all close to the same direction
    ae = scap.train_autoencoder(s, hidden=2, epochs=1, lr=1e-3, batch_size=64, generator=g, center=True)
    assert torch.allclose(ae.center, s.mean(0))
    v = ae.prepare(s)
    assert torch.allclose(v.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert v.mean(0).norm() < 0.5  # centred: no longer all pointing the same way


# -- scoring ---------------------------------------------------------------------------------------------------
def test_chunked_scores_equal_unchunked():
    g = torch.Generator().manual_seed(0)
    fx = scap.plane_fft(torch.randn(3, 4, 6, 6, generator=g))
    fy = scap.plane_fft(torch.randn(3, 7, 6, 6, generator=g))
    ae = scap.init_autoencoder(36, 3, g)
    opts = SCAP().spectrum_opts
    whole = scap.fidelity_sums(fx, fy, ae, opts, None)
    assert whole.shape == (7,)
    for chunk in (1, 3, 7, 50):
        assert torch.allclose(scap.fidelity_sums(fx, fy, ae, opts, chunk), whole, atol=1e-6)
    # and per channel it is the image sum of the mean over input channels of the direct computation
    direct = ae.fidelity(scap.normalise_spectra(scap.field_spectra(fx, fy))).mean(2).sum(0)
    assert torch.allclose(whole, direct, atol=1e-6)


def test_method_chunked_equals_unchunked_end_to_end():
    model, ctx = tiny_model(), make_ctx()
    a = SCAP(Opts(chunk_size=1, **FAST)).channel_scores(model, ctx, convs(model))
    b = SCAP(Opts(chunk_size=None, **FAST)).channel_scores(model, ctx, convs(model))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6)


def test_scores_deterministic_under_seed_and_seed_matters():
    model = tiny_model()
    first = SCAP(Opts(**FAST)).channel_scores(model, make_ctx(seed=3), convs(model))
    again = SCAP(Opts(**FAST)).channel_scores(model, make_ctx(seed=3), convs(model))
    other = SCAP(Opts(**FAST)).channel_scores(model, make_ctx(seed=4), convs(model))
    for name in first:
        assert first[name].shape == (convs(model)[name].out_channels,)
        assert torch.equal(first[name], again[name])
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_odd_channel_out_gets_the_lowest_fidelity():
    """Seven copies of one filter and one different filter: the autoencoder learns the majority's
    interaction spectra, so the odd channel is reconstructed worst (kept), the copies best (pruned)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[:] = torch.randn(1, 3, 3, 3)  # smooth-ish shared filter
        conv.weight[5] = torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]]).expand(3, 3, 3)  # checkerboard
    model = nn.Sequential(conv).eval()
    ctx = make_ctx(images=16, size=8)
    method = SCAP(Opts(ae_hidden=1, ae_epochs=40, ae_lr=1e-2, ae_samples=1024, ae_batch_size=128,
                              batches=2, batch_size=8, balance="channel"))
    fidelity = method.fidelities(model, ctx, {"0": conv})["0"]
    assert int(fidelity.argmin()) == 5
    scores = method.channel_scores(model, ctx, {"0": conv})["0"]
    assert int(scores.argmax()) == 5 and scores[5] == 1.0  # importance: higher = keep, the layer's best is 1


# -- the importance scale -------------------------------------------------------------------------------------
def test_minmax_maps_a_layer_onto_zero_to_one():
    values = torch.tensor([0.93, 0.81, 0.95, 0.88, 0.90])
    n = scap.minmax(values)
    assert n.min() == 0.0 and n.max() == 1.0 and ((n >= 0) & (n <= 1)).all()
    assert int(n.argmin()) == 1 and int(n.argmax()) == 2
    assert torch.allclose(n, (values - 0.81) / (0.95 - 0.81))
    assert torch.equal(n.argsort(), values.argsort())  # order kept


def test_fidelity_term_inverts_fidelity_within_the_layer():
    """High fidelity = compressible: the layer's highest fidelity gets 0, its lowest 1, whatever the scale."""
    for low, high in ((0.80, 0.95), (0.1, 0.3), (-0.5, 1.0)):
        fid = torch.tensor([high, low, (low + high) / 2])
        assert torch.allclose(scap.fidelity_term(fid), torch.tensor([0.0, 1.0, 0.5]), atol=1e-6)


def test_fusion_at_l1_weight_zero_one_and_half():
    fid = torch.tensor([0.90, 0.80, 0.85, 0.95])  # fidelity term: [1/3, 1, 2/3, 0]
    l1 = torch.tensor([4.0, 0.0, 1.0, 2.0])  # L1 term: [1, 0, 1/4, 1/2]
    fid_term = torch.tensor([1 / 3, 1.0, 2 / 3, 0.0])
    l1_term = torch.tensor([1.0, 0.0, 0.25, 0.5])
    assert torch.allclose(scap.importance(fid, l1, 0.0), fid_term)
    assert torch.allclose(scap.importance(fid, l1, 1.0), l1_term)
    assert torch.allclose(scap.importance(fid, l1, 0.5), torch.tensor([2 / 3, 0.5, 11 / 24, 0.25]))
    # a convex weight keeps the fused importance in [0, 1] for any weight
    for w in torch.linspace(0, 1, 11).tolist():
        fused = scap.importance(fid, l1, w)
        assert ((fused >= 0) & (fused <= 1)).all()


def test_raw_l1_norms_and_their_scale_do_not_matter():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    l1 = filter_l1(conv.weight)
    assert torch.allclose(l1, conv.weight.detach().abs().sum((1, 2, 3)))
    assert torch.allclose(scap.minmax(l1), scap.minmax(1000 * l1))


def test_degenerate_layer_keeps_every_channel():
    """All fidelities equal (or equal up to float rounding): nothing tells the channels apart, so the
    term is 1 for every channel (keep all) and nothing divides by zero."""
    for values in (torch.full((5,), 0.9), torch.zeros(5), torch.tensor([0.9, 0.9 + 1e-8, 0.9 - 1e-8, 0.9, 0.9])):
        assert torch.equal(scap.fidelity_term(values), torch.ones(5))
        assert torch.equal(scap.minmax(values), torch.ones(5))
    assert torch.equal(scap.importance(torch.full((4,), 0.7), torch.full((4,), 3.0), 0.5), torch.ones(4))
    # one channel only: degenerate too
    assert torch.equal(scap.minmax(torch.tensor([0.42])), torch.ones(1))
    # with the L1 term alive, only the L1 term ranks
    fused = scap.importance(torch.full((3,), 0.7), torch.tensor([1.0, 3.0, 2.0]), 0.5)
    assert torch.allclose(fused, torch.tensor([0.5, 1.0, 0.75]))


def test_non_finite_values_are_the_least_important():
    n = scap.minmax(torch.tensor([0.2, float("nan"), 0.6, float("-inf"), 0.4]))
    assert torch.allclose(n, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5]))
    assert torch.equal(scap.minmax(torch.full((3,), float("nan"))), torch.zeros(3))


def test_silent_channels_are_those_next_to_nothing_of_their_layer():
    power = torch.tensor([0.0, 1.0, 1e-14, 4.0, 1e-6])  # RMS 0, 1, 1e-7, 2, 1e-3 (loudest: 2)
    assert scap.silent_channels(power).tolist() == [True, False, True, False, False]
    assert scap.silent_channels(torch.zeros(3)).all()


def test_dead_channel_gets_no_fidelity_the_lowest_importance_and_leaves_the_range_to_the_live_ones():
    """A ReLU-dead channel (relu(BN(conv)) = 0 on every image) has nothing to reconstruct; unmarked, its
    field (the input alone) is the hardest for the autoencoder, so it was kept first and set the top of
    its layer's range, squeezing every live channel towards 0 (1-5 such channels per ResNet-56 layer)."""
    model, ctx = tiny_model(), make_ctx()
    with torch.no_grad():
        model[1].bias[2] = -100.0  # BN output < 0 everywhere: channel 2 of conv 0 is dead after the ReLU
    method = SCAP(Opts(threshold=0.6, **FAST))
    fid = method.fidelities(model, ctx, convs(model))
    assert torch.isnan(fid["0"][2]) and torch.isfinite(fid["0"][torch.arange(8) != 2]).all()
    assert torch.isfinite(fid["3"]).all()
    scores = method.channel_scores(model, ctx, convs(model))["0"]
    live = scores[torch.arange(8) != 2]
    assert scores[2] == 0.0 and live.min() == 0.0 and live.max() == 1.0
    original = copy.deepcopy(model[0])
    pruned = method.compress(model, ctx)
    assert 2 not in _surviving_filters(original, pruned[0])
    assert pruned[0].out_channels == int((scores >= 0.6).sum())


def test_higher_threshold_never_keeps_more_channels():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        fid, l1 = 0.8 + 0.15 * torch.rand(16, generator=g), torch.rand(16, generator=g)
        for w in (0.0, 0.3, 1.0):
            imp = scap.importance(fid, l1, w)
            kept = [int((imp >= t).sum()) for t in torch.linspace(0, 1, 21).tolist()]
            assert kept[0] == 16  # threshold 0 keeps all
            if w in (0.0, 1.0):  # one term alone: its best channel is 1 (a fused maximum may be
                assert kept[-1] >= 1  # below 1: the engine then still keeps one channel)
            assert all(a >= b for a, b in zip(kept, kept[1:]))


# -- the method with the pruning engine ---------------------------------------------------------------------
def _surviving_filters(before: nn.Conv2d, after: nn.Conv2d) -> list[int]:
    """Indices (in `before`) of the output filters still present in `after` (first conv: inputs unchanged)."""
    return [i for i in range(before.out_channels)
            if any(torch.equal(before.weight[i], w) for w in after.weight)]


def _fixed_fidelities(monkeypatch, fid: dict[str, torch.Tensor]) -> None:
    monkeypatch.setattr(scap.SCAP, "fidelities", lambda self, m, c, layers: {n: fid[n] for n in layers})


def test_threshold_keeps_low_fidelity_and_prunes_high(monkeypatch):
    model = tiny_model()
    original = copy.deepcopy(model[0])
    # importance = (0.95 - f) / 0.85: [0.06, 1, 0.29, 0.76, 0.40, 0.42, 0, 0.88]
    _fixed_fidelities(monkeypatch, {"0": torch.tensor([0.9, 0.1, 0.7, 0.3, 0.61, 0.59, 0.95, 0.2]),
                                    "3": torch.full((6,), 0.1)})  # degenerate layer: every channel kept
    pruned = SCAP(Opts(threshold=0.6)).compress(model, make_ctx())
    assert _surviving_filters(original, pruned[0]) == [1, 3, 7]  # importance >= 0.6 stays
    assert pruned[3].out_channels == 6


def test_threshold_scale_ends_and_nested_survivors(monkeypatch):
    """Threshold 0 keeps every channel, 1 only each layer's best; in between a higher threshold keeps a
    subset of what a lower one keeps."""
    g = torch.Generator().manual_seed(1)
    fid = {"0": 0.85 + 0.1 * torch.rand(8, generator=g), "3": 0.85 + 0.1 * torch.rand(6, generator=g)}
    _fixed_fidelities(monkeypatch, fid)
    survivors = []
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        model = tiny_model()
        original = copy.deepcopy(model[0])
        pruned = SCAP(Opts(threshold=t)).compress(model, make_ctx())
        survivors.append((set(_surviving_filters(original, pruned[0])), pruned[3].out_channels))
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    assert survivors[0] == (set(range(8)), 6)
    assert survivors[-1] == ({int(fid["0"].argmin())}, 1)
    for (a, na), (b, nb) in zip(survivors, survivors[1:]):
        assert b <= a and nb <= na


def test_l1_weight_one_is_l1_pruning_and_fusion_protects_heavy_filters(monkeypatch):
    model = tiny_model()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].weight[0].mul_(100.0)  # filter 0 dominates the layer's L1 norms
    # filter 0 also has the highest fidelity: the fidelity term alone would prune it first
    fid = {"0": torch.tensor([0.95, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.55]), "3": torch.full((6,), 0.1)}
    _fixed_fidelities(monkeypatch, fid)
    original = copy.deepcopy(model[0])
    alone = SCAP(Opts(threshold=0.6, l1_weight=0.0)).compress(copy.deepcopy(model), make_ctx())
    assert 0 not in _surviving_filters(original, alone[0])
    fused = SCAP(Opts(threshold=0.6, l1_weight=0.9)).compress(copy.deepcopy(model), make_ctx())
    # filter 0: 0.1 * 0 + 0.9 * 1 = 0.9 stays; the light ones: <= 0.1 * 1 + 0.9 * ~0.02 go
    assert _surviving_filters(original, fused[0]) == [0]
    # l1_weight 1: exactly L1 pruning's choice (and no fidelity pass is needed)
    monkeypatch.setattr(scap.SCAP, "fidelities", lambda *a: pytest.fail("fidelities computed at l1_weight 1"))
    by_rate = SCAP(Opts(threshold=None, compress_rate=0.5, l1_weight=1.0)).compress(copy.deepcopy(model), make_ctx())
    l1 = L1Pruning(L1Options(compress_rate=0.5)).compress(copy.deepcopy(model), make_ctx())
    assert _surviving_filters(original, by_rate[0]) == _surviving_filters(original, l1[0])
    assert torch.equal(by_rate[3].weight, l1[3].weight)


def test_threshold_one_keeps_one_channel_per_layer_and_model_still_runs():
    model = tiny_model()
    pruned = SCAP(Opts(threshold=1.0, **FAST)).compress(model, make_ctx())  # only each layer's best is 1
    assert pruned[0].out_channels == 1 and pruned[3].out_channels == 1
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


# Enough autoencoder training that the raw fidelities come out high (0.93-0.95), as on a trained ResNet-56.
HIGH_FIDELITY = dict(FAST, ae_hidden=8, ae_ratio=0.5, ae_epochs=20, ae_samples=1024, batches=2, batch_size=8)


def test_paper_threshold_does_not_collapse_layers_whose_raw_fidelities_are_all_high():
    """Issue 13: raw fidelities all above 0.6 made `threshold: 0.6` prune every layer down to one channel.
    On the normalised scale the same 0.6 keeps the channels in the top 40 % of each layer's range."""
    model, ctx = tiny_model(), make_ctx(images=16)
    method = SCAP(Opts(threshold=0.6, **HIGH_FIDELITY))
    raw = method.fidelities(model, ctx, convs(model))
    assert all(float(f.min()) > 0.9 for f in raw.values())  # the old rule (prune fidelity > 0.6) pruned all
    scores = method.channel_scores(model, ctx, convs(model))
    expected = {name: int((s >= 0.6).sum()) for name, s in scores.items()}
    assert all(1 < n < convs(model)[name].out_channels for name, n in expected.items())
    pruned = method.compress(model, ctx)
    assert (pruned[0].out_channels, pruned[3].out_channels) == (expected["0"], expected["3"])
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


# -- coupled channel groups (residual additions) ------------------------------------------------------------
def _resnet20():
    torch.manual_seed(0)
    return models.build("resnet20", 10).eval()


def _random_fidelities(monkeypatch, spread: dict[str, float] | None = None) -> None:
    """A fixed pseudo-random fidelity per channel, 0.8-0.95, seeded by the layer's name; `spread` scales
    a layer's deviations (one layer can be made nearly flat)."""
    spread = spread or {}

    def fake(self, model, ctx, layers):
        out = {}
        for name, conv in layers.items():
            g = scap.layer_generator(0, name)
            out[name] = 0.875 + spread.get(name, 1.0) * 0.075 * (2 * torch.rand(conv.out_channels, generator=g) - 1)
        return out

    monkeypatch.setattr(scap.SCAP, "fidelities", fake)


def test_every_group_spans_zero_to_one_and_single_conv_groups_equal_their_layer(monkeypatch):
    _random_fidelities(monkeypatch)
    model, ctx = _resnet20(), make_ctx(size=8)
    plan = engine.PruningPlan.build(model, (3, 8, 8), RateSpec.parse(1.0))
    coupled = [g for g, members in plan.members.items() if len(members) > 1]
    assert coupled, "ResNet-20 has residual streams"
    for w in (0.0, 0.5, 1.0):
        method = SCAP(Opts(l1_weight=w))
        groups = method._group_scores(model, ctx, plan, plan.target_keep())
        layer = method.channel_scores(model, ctx, plan.convs)
        assert set(groups) == set(plan.members)
        for g, score in groups.items():
            assert ((score >= 0) & (score <= 1)).all()
            if w in (0.0, 1.0):  # one term alone spans [0, 1] in every group, coupled or not
                assert score.min() == 0 and score.max() == 1, g
            if len(plan.members[g]) == 1:
                assert torch.allclose(score, layer[g], atol=1e-6), g


def test_coupled_group_is_the_renormalised_mean_of_its_layers_terms(monkeypatch):
    _random_fidelities(monkeypatch)
    model, ctx = _resnet20(), make_ctx(size=8)
    plan = engine.PruningPlan.build(model, (3, 8, 8), RateSpec.parse(1.0))
    group, members = next((g, m) for g, m in plan.members.items() if len(m) > 1)
    method = SCAP(Opts(l1_weight=0.25))
    fid = method.fidelities(model, ctx, {n: plan.convs[n] for n in members})
    mean_fid = torch.stack([scap.fidelity_term(fid[n]) for n in members]).mean(0)
    mean_l1 = torch.stack([scap.minmax(filter_l1(plan.convs[n].weight)) for n in members]).mean(0)
    expected = 0.75 * scap.minmax(mean_fid) + 0.25 * scap.minmax(mean_l1)
    got = method._group_scores(model, ctx, plan, plan.target_keep())[group]
    assert torch.allclose(got, expected, atol=1e-6)


def test_coupled_group_is_judged_on_its_own_range_not_squeezed_by_the_average(monkeypatch):
    """ResNet-20's first residual stream (the stem conv and three block outputs, 16 channels): when its
    convs rank the channels in opposite orders, their average is flat -- no evidence against any channel
    -- so the group keeps all 16 (the plain average, 0.5 everywhere, would fall below 0.6 and leave one).
    When they agree, the group keeps what each of them would keep alone."""
    model, ctx = _resnet20(), make_ctx(size=8)
    plan = engine.PruningPlan.build(copy.deepcopy(model), (3, 8, 8), RateSpec.parse(1.0))
    members = plan.members["conv1"]
    assert len(members) == 4
    rising = torch.linspace(0.80, 0.95, 16)
    for agree, expected in ((False, 16), (True, int((scap.fidelity_term(rising) >= 0.6).sum()))):
        fid = {name: rising if agree or i % 2 else rising.flip(0) for i, name in enumerate(members)}
        monkeypatch.setattr(scap.SCAP, "fidelities",
                            lambda self, m, c, layers, fid=fid: {n: fid.get(n, torch.linspace(0.80, 0.95, layers[n].out_channels))
                                                             for n in layers})
        pruned = SCAP(Opts(threshold=0.6)).compress(copy.deepcopy(model), ctx)
        assert pruned.conv1.out_channels == expected
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert 1 < expected < 16


def test_rate_mode_without_threshold():
    model = tiny_model()
    pruned = SCAP(Opts(threshold=None, compress_rate=0.5, **FAST)).compress(model, make_ctx())
    assert pruned[0].out_channels == 4 and pruned[3].out_channels == 3


def test_relu_output_scores_are_finite():
    model, ctx = tiny_model(), make_ctx()
    scores = SCAP(Opts(output="relu", **FAST)).channel_scores(model, ctx, convs(model))
    assert all(torch.isfinite(s).all() for s in scores.values())


@pytest.mark.parametrize("key, value", [
    ("spectrum", "phase"), ("balance", "yes"), ("ae_hidden", 0), ("threshold", "high"), ("threshold", float("nan")),
    ("threshold", -0.1), ("threshold", 1.5), ("threshold", True), ("l1_weight", -0.5), ("l1_weight", 1.01),
    ("l1_weight", None),
    ("chunk_size", 0), ("ae_lr", -1.0), ("resize", "cubic"), ("ae_epochs", True), ("ae_center", "yes"),
    ("ae_samples", scap.MAX_AE_SAMPLES + 1), ("ae_ratio", 1.5), ("l1_weight", float("inf")), ("compress_rate", "[0.5]*99999999999"),
])
def test_bad_options_fail_with_one_line_naming_the_key(key, value):
    with pytest.raises(CompressError, match=rf"^method\.{key}: [^\n]*$"):
        SCAPOptions(**{key: value})


def test_options_keep_scaps_own_defaults():
    """Issue 26's reading is the default: raw centred fidelity fused with 0.25 of the layer-min-maxed L1
    norm, threshold 0.6, every layer keeping at least 10 % of its channels (compress_rate 0.9)."""
    opts = SCAPOptions()
    assert (opts.name, opts.threshold, opts.compress_rate, opts.step_rate) == ("scap", 0.6, 0.9, 0.1)
    assert (opts.normalise, opts.ae_center, opts.l1_weight, opts.l1_norm) == ("raw", True, 0.25, "minmax")
    assert SCAP(opts).threshold == 0.6  # the importance scale is the engine's: keep scores >= threshold
    for t in (0.0, 1.0, None):
        assert SCAP(Opts(threshold=t)).threshold == t
    assert SCAP().options == opts and SCAP.one_shot and SCAP.iterative and SCAP.changes_model


def test_smoke_runs_train_the_autoencoders_for_a_token_budget():
    method = SCAP(Opts(ae_epochs=50, ae_samples=8192))
    assert method.autoencoder_budget(quick=False) == method.ae_opts
    quick = method.autoencoder_budget(quick=True)
    assert (quick.epochs, quick.samples, quick.hidden) == (1, scap.QUICK_AE_SAMPLES, method.ae_opts.hidden)


def test_layer_scores_do_not_depend_on_the_other_layers_scored():
    model, ctx = tiny_model(), make_ctx()
    both = SCAP(Opts(**FAST)).channel_scores(model, ctx, convs(model))
    alone = SCAP(Opts(**FAST)).channel_scores(model, ctx, {"3": model[3]})
    assert torch.allclose(both["3"], alone["3"], atol=1e-5)


def test_stacked_training_matches_separate_training():
    g = torch.Generator().manual_seed(0)
    spectra = scap.unit_norm(torch.rand(2, 128, 16, generator=g))
    stacked = scap.train_autoencoders(spectra, 3, 4, 1e-2, 32, [torch.Generator().manual_seed(s) for s in (1, 2)])
    for i, seed in enumerate((1, 2)):
        alone = scap.train_autoencoder(spectra[i], 3, 4, 1e-2, 32, torch.Generator().manual_seed(seed))
        assert torch.allclose(stacked[i].enc_w, alone.enc_w, atol=1e-5)
        assert torch.allclose(stacked[i].fidelity(spectra[i]), alone.fidelity(spectra[i]), atol=1e-5)
