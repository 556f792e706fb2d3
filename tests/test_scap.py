"""SCAP: interaction field, spectra, fidelity, autoencoder, threshold direction, determinism, chunking."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress import CompressError
from compress.methods.base import Context
from tests.contexts import cpu_context
from compress.methods import scap
from compress.methods.scap import SCAP, SCAPOptions

torch.set_num_threads(1)

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
    fx, fy = scap.layer_planes(x, y, scap.SpectrumOptions(balance="none"))
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
    opts = scap.SpectrumOptions()
    whole = scap.fidelity_sums(fx, fy, ae, opts, None)
    assert whole.shape == (7,)
    for chunk in (1, 3, 7, 50):
        assert torch.allclose(scap.fidelity_sums(fx, fy, ae, opts, chunk), whole, atol=1e-6)
    # and per channel it is the image sum of the mean over input channels of the direct computation
    direct = ae.fidelity(scap.normalise_spectra(scap.field_spectra(fx, fy))).mean(2).sum(0)
    assert torch.allclose(whole, direct, atol=1e-6)


def test_method_chunked_equals_unchunked_end_to_end():
    model, ctx = tiny_model(), make_ctx()
    a = SCAP(SCAPOptions(chunk_size=1, **FAST)).channel_scores(model, ctx, convs(model))
    b = SCAP(SCAPOptions(chunk_size=None, **FAST)).channel_scores(model, ctx, convs(model))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6)


def test_scores_deterministic_under_seed_and_seed_matters():
    model = tiny_model()
    first = SCAP(SCAPOptions(**FAST)).channel_scores(model, make_ctx(seed=3), convs(model))
    again = SCAP(SCAPOptions(**FAST)).channel_scores(model, make_ctx(seed=3), convs(model))
    other = SCAP(SCAPOptions(**FAST)).channel_scores(model, make_ctx(seed=4), convs(model))
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
    method = SCAP(SCAPOptions(ae_hidden=1, ae_epochs=40, ae_lr=1e-2, ae_samples=1024, ae_batch_size=128,
                              batches=2, batch_size=8, balance="channel"))
    fidelity = method.fidelities(model, ctx, {"0": conv})["0"]
    assert int(fidelity.argmin()) == 5
    scores = method.channel_scores(model, ctx, {"0": conv})["0"]
    assert int(scores.argmax()) == 5  # keep score: higher = keep


# -- the method with the pruning engine ---------------------------------------------------------------------
def _surviving_filters(before: nn.Conv2d, after: nn.Conv2d) -> list[int]:
    """Indices (in `before`) of the output filters still present in `after` (first conv: inputs unchanged)."""
    return [i for i in range(before.out_channels)
            if any(torch.equal(before.weight[i], w) for w in after.weight)]


def test_threshold_direction_prunes_high_fidelity(monkeypatch):
    model = tiny_model()
    original = copy.deepcopy(model[0])
    fid = {"0": torch.tensor([0.9, 0.1, 0.7, 0.3, 0.61, 0.59, 0.95, 0.2]), "3": torch.full((6,), 0.1)}
    monkeypatch.setattr(scap.SCAP, "fidelities", lambda self, m, c, layers: {n: fid[n] for n in layers})
    pruned = SCAP(SCAPOptions(threshold=0.6)).compress(model, make_ctx())
    assert _surviving_filters(original, pruned[0]) == [1, 3, 5, 7]  # fidelity <= 0.6 stays
    assert pruned[3].out_channels == 6


def test_l1_fusion_protects_heavy_filters(monkeypatch):
    model = tiny_model()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].weight[0].mul_(100.0)  # filter 0 dominates the layer's L1 norms
    original = copy.deepcopy(model[0])
    fid = {"0": torch.full((8,), 0.7), "3": torch.full((6,), 0.1)}
    monkeypatch.setattr(scap.SCAP, "fidelities", lambda self, m, c, layers: {n: fid[n] for n in layers})
    pruned = SCAP(SCAPOptions(threshold=0.6, l1_weight=0.5)).compress(model, make_ctx())
    # 0.7 - 0.5 * 1.0 = 0.2 <= 0.6 keeps filter 0; the light ones (l1n ~ 0.01) are pruned
    assert _surviving_filters(original, pruned[0]) == [0]


def test_layer_never_emptied_and_model_still_runs():
    model = tiny_model()
    pruned = SCAP(SCAPOptions(threshold=-5.0, **FAST)).compress(model, make_ctx())  # every channel is above -5
    assert pruned[0].out_channels == 1 and pruned[3].out_channels == 1
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_rate_mode_without_threshold():
    model = tiny_model()
    pruned = SCAP(SCAPOptions(threshold=None, compress_rate=0.5, **FAST)).compress(model, make_ctx())
    assert pruned[0].out_channels == 4 and pruned[3].out_channels == 3


def test_relu_output_scores_are_finite():
    model, ctx = tiny_model(), make_ctx()
    scores = SCAP(SCAPOptions(output="relu", **FAST)).channel_scores(model, ctx, convs(model))
    assert all(torch.isfinite(s).all() for s in scores.values())


@pytest.mark.parametrize("key, value", [
    ("spectrum", "phase"), ("balance", "yes"), ("ae_hidden", 0), ("threshold", "high"), ("threshold", float("nan")),
    ("chunk_size", 0), ("ae_lr", -1.0), ("resize", "cubic"), ("ae_epochs", True), ("ae_center", "yes"),
    ("ae_samples", scap.MAX_AE_SAMPLES + 1), ("ae_ratio", 1.5), ("l1_weight", float("inf")), ("compress_rate", "[0.5]*99999999999"),
])
def test_bad_options_fail_with_one_line_naming_the_key(key, value):
    with pytest.raises(CompressError, match=rf"^method\.{key}: [^\n]*$"):
        SCAPOptions(**{key: value})


def test_options_keep_scaps_own_defaults():
    opts = SCAPOptions()
    assert (opts.name, opts.threshold, opts.compress_rate, opts.step_rate) == ("scap", 0.6, 1.0, 0.1)
    assert SCAP(opts).threshold == pytest.approx(0.4)  # the engine's keep-score scale: 1 - fidelity threshold
    assert SCAP().options == opts and SCAP.one_shot and SCAP.iterative and SCAP.changes_model


def test_smoke_runs_train_the_autoencoders_for_a_token_budget():
    method = SCAP(SCAPOptions(ae_epochs=50, ae_samples=8192))
    assert method.autoencoder_budget(quick=False) == method.ae_opts
    quick = method.autoencoder_budget(quick=True)
    assert (quick.epochs, quick.samples, quick.hidden) == (1, scap.QUICK_AE_SAMPLES, method.ae_opts.hidden)


def test_layer_scores_do_not_depend_on_the_other_layers_scored():
    model, ctx = tiny_model(), make_ctx()
    both = SCAP(SCAPOptions(**FAST)).channel_scores(model, ctx, convs(model))
    alone = SCAP(SCAPOptions(**FAST)).channel_scores(model, ctx, {"3": model[3]})
    assert torch.allclose(both["3"], alone["3"], atol=1e-5)


def test_stacked_training_matches_separate_training():
    g = torch.Generator().manual_seed(0)
    spectra = scap.unit_norm(torch.rand(2, 128, 16, generator=g))
    stacked = scap.train_autoencoders(spectra, 3, 4, 1e-2, 32, [torch.Generator().manual_seed(s) for s in (1, 2)])
    for i, seed in enumerate((1, 2)):
        alone = scap.train_autoencoder(spectra[i], 3, 4, 1e-2, 32, torch.Generator().manual_seed(seed))
        assert torch.allclose(stacked[i].enc_w, alone.enc_w, atol=1e-5)
        assert torch.allclose(stacked[i].fidelity(spectra[i]), alone.fidelity(spectra[i]), atol=1e-5)
