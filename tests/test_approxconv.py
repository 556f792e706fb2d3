"""ApproxConv (CosConv / ChebConv), its series kernels (compress.layers.series) and the fake-quantisation
pieces it uses (compress.layers.quant): tiny models, real numbers."""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from compress import CompressError, methods, models
from compress.layers import deployable
from compress.layers.quant import ActivationFakeQuant, fake_quant_per_channel, packed_state_bytes
from compress.layers.series import (
    basis_matrix,
    fit_adam,
    fit_lstsq,
    fit_mse,
    initial_coefficients,
    kernel_from_coefficients,
    sample_points,
)
from compress.methods.approxconv import MAX_ORDERS, ApproxConv, harmonic_groups, parse_harmonics, plan_orders
from compress.methods.base import Context
from tests.contexts import cpu_context

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class TinyResNet(nn.Module):
    """A stem, two 'stages' (layer1, layer2) and a 1x1 downsample conv: the structure the harmonics
    notation counts, at toy width."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 5, stride=2, padding=2), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=2))
        self.downsample = nn.Conv2d(4, 8, 1, stride=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x) + self.downsample(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def ctx(calibration=None) -> Context:
    return cpu_context(num_classes=3, calibration=calibration)


def approxconv(**options) -> ApproxConv:
    return ApproxConv(ApproxConv.Options(**options))


X = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# -- basis ---------------------------------------------------------------------------------------------
def test_sample_points_follow_the_public_code():
    assert torch.allclose(sample_points("cos", 3), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64) * math.pi)
    assert torch.allclose(sample_points("cheb", 5), torch.tensor([-1, -0.5, 0, 0.5, 1], dtype=torch.float64))


def test_chebyshev_basis_matches_numpy_polynomials():
    x = np.linspace(-1, 1, 7)
    expected = np.stack([np.polynomial.chebyshev.chebval(x, np.eye(5)[i]) for i in range(5)], axis=1)
    assert np.allclose(basis_matrix("cheb", 7, 5).numpy(), expected, atol=1e-12)
    cos = basis_matrix("cos", 3, 3)
    assert torch.allclose(cos[:, 2], torch.cos(2 * sample_points("cos", 3)))
    assert torch.allclose(cos[:, 0], torch.ones(3, dtype=torch.float64))


def test_kernel_is_the_double_series_sum():
    a = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    b = basis_matrix("cos", 3, 2)
    slow = torch.einsum("pi,ocij,qj->ocpq", b, a, b)
    assert torch.allclose(kernel_from_coefficients(a, b), slow, atol=1e-12)


# -- fitting -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("series", ["cos", "cheb"])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_fit_with_n_equal_k_reproduces_the_kernel(series, k):
    w = torch.randn(6, 4, k, k)
    b = basis_matrix(series, k, k)
    recon = kernel_from_coefficients(fit_lstsq(w, b), b.float())
    # Relative to the kernel's scale: float32 coefficients of the cos basis at K = 7 (condition number
    # 27 per axis) carry ~1e-6 relative rounding; a float64 fit is exact to rounding.
    assert (recon - w).abs().max() < 1e-5 * w.abs().max()
    exact = kernel_from_coefficients(fit_lstsq(w.double(), b), b)
    assert (exact - w.double()).abs().max() < 1e-10


@pytest.mark.parametrize("series", ["cos", "cheb"])
def test_lstsq_is_the_least_squares_minimiser(series):
    w = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    b = basis_matrix(series, 5, 3)
    a = fit_lstsq(w, b)
    # Reference: the unstructured least-squares problem on the Kronecker system, filter by filter.
    kron = torch.kron(b, b)
    ref = torch.linalg.lstsq(kron, w.reshape(-1, 25).T).solution.T.reshape(3, 2, 3, 3)
    assert torch.allclose(a, ref, atol=1e-10)
    # ... and the residual is orthogonal to the basis (normal equations hold).
    resid = w - kernel_from_coefficients(a, b)
    assert kernel_from_coefficients(resid, b.T).abs().max() < 1e-10
    assert fit_mse(w, a, b).mean() > 1e-3  # N < K: a real approximation, not a trivial zero


@pytest.mark.parametrize("series", ["cos", "cheb"])
def test_lstsq_beats_or_equals_adam(series):
    w = torch.randn(8, 4, 7, 7)
    b = basis_matrix(series, 7, 4).float()
    g = torch.Generator().manual_seed(0)
    adam = fit_adam(w, b, initial_coefficients(series, w, 4, g), steps=600, lr=0.1)
    lstsq = fit_lstsq(w, b)
    mse_adam, mse_lstsq = fit_mse(w, adam, b).mean(), fit_mse(w, lstsq, b).mean()
    assert mse_lstsq <= mse_adam * (1 + 1e-6)
    assert mse_adam < 2 * mse_lstsq  # the iterative fit does converge towards the same optimum


def test_cos_and_cheb_fit_the_same_3x3_kernels():
    # For K = 3 both bases span the polynomials of degree < N on 3 symmetric equispaced points, so
    # the paper's identical CosConv / ChebConv "Pre Top 1" on CIFAR follows: identical kernels.
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    for n in (1, 2, 3):
        kc = kernel_from_coefficients(fit_lstsq(w, basis_matrix("cos", 3, n)), basis_matrix("cos", 3, n))
        kt = kernel_from_coefficients(fit_lstsq(w, basis_matrix("cheb", 3, n)), basis_matrix("cheb", 3, n))
        assert torch.allclose(kc, kt, atol=1e-12)


def test_initialisation_follows_the_paper():
    w = torch.randn(16, 32, 3, 3)
    cheb = initial_coefficients("cheb", w, 2)
    assert torch.allclose(cheb[:, :, 0, 0], w.mean(dim=(2, 3))) and cheb[:, :, 1:, :].abs().sum() == 0
    cos = initial_coefficients("cos", w, 2, torch.Generator().manual_seed(0))
    assert abs(cos.std().item() - 1 / math.sqrt(32 * 9)) < 0.02


# -- the method on a model -----------------------------------------------------------------------------
def test_n_equal_k_leaves_model_outputs_unchanged():
    model = tiny()
    before = model(X)
    full = {"layer2.0": 5}  # the 5x5 conv of the 3x3 stage
    out = approxconv(series="cos", harmonics=[3, 3, 3], overrides=full).compress(copy.deepcopy(model), ctx())
    assert sum(parametrize.is_parametrized(m) for m in out.modules()) == 4
    assert (out(X) - before).abs().max() < 1e-5
    out = approxconv(series="cheb", harmonics=[3, 3, 3], overrides=full).compress(copy.deepcopy(model), ctx())
    assert (out(X) - before).abs().max() < 1e-5


def test_parameters_are_the_coefficients():
    model = approxconv(harmonics=[2, 3, 4], overrides={"layer2.2": 1}).compress(tiny(), ctx())
    stem = model.conv1.parametrizations.weight.original
    assert stem.shape == (4, 3, 2, 2) and model.conv1.weight.shape == (4, 3, 3, 3)
    assert isinstance(model.conv1, nn.Conv2d)
    # convs: N^2 coefficients per filter (+ bias); the 1x1 conv's weight; 2 BNs' affine; the fc layer
    expected = 4 * 3 * 4 + 4 * 4 * 9 + (8 * 4 * 16 + 8) + (8 * 4 * 1 + 8) + (8 * 4 + 8) + 2 * (2 * 4) + (3 * 8 + 3)
    assert sum(p.numel() for p in model.parameters()) == expected
    names = {n for n, _ in model.named_parameters()}
    assert "conv1.parametrizations.weight.original" in names and "conv1.weight" not in names


def test_gradients_train_the_coefficients():
    model = approxconv(harmonics=[2]).compress(tiny().train(), ctx())
    coeffs = model.layer1[0].parametrizations.weight.original
    before = coeffs.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(X).square().mean().backward()
    assert coeffs.grad is not None and coeffs.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(coeffs, before)
    assert torch.allclose(model.layer1[0].weight, kernel_from_coefficients(coeffs, basis_matrix("cos", 3, 2).float()))


def test_eval_mode_caches_the_kernel_until_coefficients_change():
    model = approxconv(harmonics=[2]).compress(tiny(), ctx())
    conv = model.layer1[0]
    with torch.no_grad():
        first = conv.weight
        assert conv.weight is first  # cached
        conv.parametrizations.weight.original.mul_(2)  # in-place change bumps the version counter
        second = conv.weight
    assert second is not first and torch.allclose(second, 2 * first)
    with torch.no_grad():
        model.train()
        assert conv.parametrizations.weight[0]._cache is None
        assert conv.weight is not conv.weight  # no cache in training mode
    model.eval()
    w = conv.weight  # grad enabled: not cached (the graph must reach the coefficients)
    assert w.requires_grad and conv.parametrizations.weight[0]._cache is None


def test_one_by_one_convs_stay_ordinary_and_are_logged(caplog):
    model = tiny()
    w = model.downsample.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="compress"):
        approxconv(harmonics=[2]).compress(model, ctx())
    assert not parametrize.is_parametrized(model.downsample)
    assert torch.equal(model.downsample.weight, w)
    assert "downsample stays an ordinary convolution (1x1 kernel)" in caplog.text


def test_order_above_kernel_size_is_an_error_naming_the_layer():
    with pytest.raises(CompressError, match=r"method.harmonics: order 4 for layer 'layer1.0' exceeds its kernel size 3"):
        approxconv(harmonics=[3, 4, 3]).compress(tiny(), ctx())
    with pytest.raises(CompressError, match=r"method.overrides: order 6 for layer 'layer2.0'"):
        approxconv(harmonics=[3], overrides={"layer2.0": 6}).compress(tiny(), ctx())


def test_harmonics_length_must_match_the_groups():
    assert [g.label for g in harmonic_groups(tiny())] == ["stem", "layer1", "layer2"]
    with pytest.raises(CompressError, match=r"method.harmonics: 2 orders given, but this model has 3 groups"):
        approxconv(harmonics=[3, 3]).compress(tiny(), ctx())


def test_overrides_by_glob():
    orders, skipped = plan_orders(tiny(), [3, 3, 3], {"layer2.*": 2, "layer1.0": None})
    assert orders == {"conv1": 3, "layer2.0": 2, "layer2.2": 2}
    assert skipped == {"layer1.0": "not in method.harmonics / overrides", "downsample": "1x1 kernel"}
    with pytest.raises(CompressError, match="method.overrides: 'layer9.*' matches no conv"):
        plan_orders(tiny(), [3], {"layer9.*": 2})


@pytest.mark.parametrize("spec, expected", [
    ("3,3,3,2", [3, 3, 3, 2]),
    ("[3, 3, 3, 2]", [3, 3, 3, 2]),
    ([6, 3, 3, 3, 2], [6, 3, 3, 3, 2]),
    (2, [2]),
    ("7x3,7x3,5x9,4x3", [7] * 6 + [5] * 9 + [4] * 3),
    ("7×3, 7×3, 7×9, 6×3,", [7] * 15 + [6] * 3),  # the paper's Table 3 spelling, trailing comma included
    (["7x3", "7x3", "7x4", "6x5", "6x3"], [7] * 10 + [6] * 8),
    (None, None),
    ("null", None),
])
def test_harmonics_notation(spec, expected):
    assert parse_harmonics(spec) == expected


@pytest.mark.parametrize("spec", ["3,a", "0", "3x0", True, [3, 2.5], {"a": 1}, "", "  ", "[]", [], "9" * 5000,
                                  "2x" + "9" * 20, f"2x{MAX_ORDERS + 1}", ["2x9999", 2, 2]])
def test_bad_harmonics_are_user_errors(spec):
    # An empty spec is a mistake, not "approximate nothing" (that is null); digit strings and repetitions
    # are bounded before anything is built from them.
    with pytest.raises(CompressError, match="method.harmonics"):
        parse_harmonics(spec)
    with pytest.raises(CompressError, match="method.harmonics"):
        ApproxConv.Options(harmonics=spec)


def test_harmonics_expand_up_to_the_bound():
    assert parse_harmonics(f"2x{MAX_ORDERS}") == [2] * MAX_ORDERS


@pytest.mark.parametrize("options, key", [
    ({"series": "sin"}, "method.series"), ({"fit": "sgd"}, "method.fit"), ({"quant_bits": 1}, "method.quant_bits"),
    ({"quant_bits": 17}, "method.quant_bits"), ({"quant_scope": "x"}, "method.quant_scope"),
    ({"overrides": {"a": -1}}, "method.overrides"), ({"overrides": {"a": True}}, "method.overrides"),
    ({"overrides": ["a"]}, "method.overrides"), ({"adam_steps": 0}, "method.adam_steps"),
    ({"adam_lr": 0.0}, "method.adam_lr"), ({"adam_lr": math.nan}, "method.adam_lr"),
    ({"quant_momentum": 0.0}, "method.quant_momentum"), ({"quant_momentum": 1.5}, "method.quant_momentum"),
    ({"calibration_batches": -1}, "method.calibration_batches"),
    ({"calibration_batch_size": 0}, "method.calibration_batch_size"),
    ({"calibration_batch_size": 10**9}, "method.calibration_batch_size"),
])
def test_bad_options_are_user_errors(options, key):
    with pytest.raises(CompressError, match=key):
        ApproxConv.Options(**options)


def test_registered_with_a_typed_options_schema():
    assert methods.get("approxconv") is ApproxConv
    assert ApproxConv.one_shot and ApproxConv.iterative and ApproxConv.changes_model and not ApproxConv.requires_rounds
    schema = OmegaConf.structured(ApproxConv.Options)
    assert OmegaConf.to_object(schema) == ApproxConv.Options() == ApproxConv().options
    assert ApproxConv.Options().harmonics == [3, 3, 3, 2] and ApproxConv.Options().quant_bits is None
    # what Hydra does with overrides: union values pass as given, typed ones are checked
    for harmonics in ([6, 3, 3, 3, 2], "7x3,7x3,5x9,4x3", 2, None):
        options = OmegaConf.to_object(OmegaConf.merge(schema, {"harmonics": harmonics}))
        assert options.harmonics == harmonics
        ApproxConv(options)
    options = OmegaConf.to_object(OmegaConf.merge(schema, {"overrides": {"layer3.*.conv2": 2, "layer1.0": None},
                                                           "quant_bits": 4}))
    assert options.overrides == {"layer3.*.conv2": 2, "layer1.0": None} and options.quant_bits == 4
    for bad in ({"quant_bits": "abc"}, {"overrides": {"a": "x"}}, {"adam_lr": True}, {"series": [1]}):
        with pytest.raises(ValidationError):
            OmegaConf.merge(schema, bad)


# -- persistence and the deployable form ---------------------------------------------------------------
@pytest.mark.parametrize("quant_bits", [None, 4])
def test_meta_restore_reloads_the_same_model(quant_bits):
    method = approxconv(series="cheb", harmonics=[2, 3, 3], overrides={"layer2.0": 4}, quant_bits=quant_bits)
    model = method.compress(tiny(), ctx(lambda n, bs, augment=False: iter([X] * n)))
    model.train()
    model(X)  # move BN statistics and activation ranges away from their initial values
    model.eval()
    expected = model(X)
    meta, state = method.meta(model), {k: v.clone() for k, v in model.state_dict().items()}
    fresh = ApproxConv.restore(tiny(seed=7), meta, state)
    assert set(fresh.state_dict()) == set(state)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.allclose(fresh(X), expected, atol=1e-6)


@pytest.mark.parametrize("quant_bits", [None, 8])
def test_deployable_bakes_plain_kernels_with_identical_outputs(quant_bits):
    method = approxconv(harmonics=[2, 2, 3], quant_bits=quant_bits)
    model = method.compress(tiny(), ctx(lambda n, bs, augment=False: iter([X] * n)))
    expected = model(X)
    baked = deployable(model)
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert type(baked.conv1) is nn.Conv2d and baked.conv1.weight.shape == (4, 3, 3, 3)
    assert torch.allclose(baked(X), expected, atol=1e-5)
    # Quantised: the baked weights are the quantised values (<= 2^(b-1)-1 levels per output channel), and
    # the input quantisers stay.
    if quant_bits is not None:
        w = baked.downsample.weight.detach().flatten(1)
        levels = w / (w.abs().amax(1, keepdim=True) / 127)
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert isinstance(baked.conv1.input_quant, ActivationFakeQuant)
    # The original keeps working: baking must not strip the weight property from a shared class.
    assert torch.allclose(model(X), expected, atol=0)
    assert torch.allclose(copy.deepcopy(model)(X), expected, atol=0)


# -- quantisation --------------------------------------------------------------------------------------
def test_per_channel_fake_quant_levels_and_straight_through_gradient():
    x = torch.randn(4, 50, requires_grad=True)
    q = fake_quant_per_channel(x, 4)
    for row, qrow in zip(x.detach(), q.detach()):
        step = row.abs().max() / 7
        levels = torch.round(qrow / step)
        assert torch.allclose(levels * step, qrow, atol=1e-6) and levels.abs().max() <= 7
        assert (qrow - row).abs().max() <= step / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_activation_range_is_an_ema_and_frozen_in_eval():
    quant = ActivationFakeQuant(bits=8, momentum=0.5)
    quant(torch.tensor([-1.0, 3.0]))
    quant(torch.tensor([0.0, 1.0]))
    assert quant.running_min.item() == pytest.approx(-0.5) and quant.running_max.item() == pytest.approx(2.0)
    quant.eval()
    out = quant(torch.tensor([-10.0, 0.3, 10.0]))
    assert out[0].item() == pytest.approx(-0.5) and out[2].item() == pytest.approx(2.0)  # clipped to the range
    assert abs(out[1].item() - 0.3) <= 2.5 / 255 / 2 + 1e-6
    assert quant.running_max.item() == pytest.approx(2.0)  # eval does not update


def test_quantised_model_calibrates_and_stays_close():
    calls = []

    def calibration(batches, batch_size, augment=False):
        calls.append((batches, batch_size))
        return iter([X] * batches)

    reference = approxconv(harmonics=[2, 3, 3]).compress(tiny(), ctx())(X)
    model = approxconv(harmonics=[2, 3, 3], quant_bits=8, calibration_batches=3).compress(tiny(), ctx(calibration))
    assert calls == [(3, 64)]
    quantisers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    assert len(quantisers) == 6 and all(bool(q.observed) and not q.training for q in quantisers)
    assert torch.equal(model.bn1.running_mean, tiny().bn1.running_mean)  # calibration leaves BN alone
    out = model(X)
    assert 0 < (out - reference).abs().max() < 0.05 * reference.abs().max()


def test_quant_storage_size():
    # conv1 N=2: 4x3x2x2 coefficients; layer1 conv N=3; layer2 convs (bias) N=3 (5x5 and grouped 3x3); 1x1 conv and
    # fc quantised as plain weights (scope all); BN affine + running stats fp32; 2 fp32 range values
    # per quantised layer input; num_batches_tracked and the observed flags not counted.
    model = approxconv(harmonics=[2, 3, 3], quant_bits=4, calibration_batches=0).compress(tiny(), ctx())
    quantised_values = [(48, 4), (144, 4), (8 * 4 * 9, 8), (8 * 4 * 9, 8), (32, 8), (24, 3)]
    fp32_values = 2 * 4 * 4 + 8 + 8 + 8 + 3 + 6 * 2
    expected = sum(math.ceil(n * 4 / 8) + 4 * ch for n, ch in quantised_values) + 4 * fp32_values
    method = approxconv(harmonics=[2, 3, 3], quant_bits=4)
    assert method.storage_bytes(model) == expected == 836
    unquantised = approxconv(harmonics=[2, 3, 3]).compress(tiny(), ctx())
    assert method.storage_bytes(unquantised) is None  # e.g. the baseline row: the serialised size
    assert method.storage_bytes(tiny()) is None
    # scope 'approx': only the approximated convs are packed, everything else stays fp32
    approx = approxconv(harmonics=[2, 3, 3], quant_bits=8, quant_scope="approx", calibration_batches=0)
    m2 = approx.compress(tiny(), ctx())
    assert not parametrize.is_parametrized(m2.fc) and not hasattr(m2.fc, "input_quant")
    assert approx.storage_bytes(m2) == packed_state_bytes(
        m2.state_dict(), 8, [k for k in m2.state_dict() if k.endswith("weight.original")],
        [k for k in m2.state_dict() if k.endswith(("num_batches_tracked", "observed"))])


# -- the paper's architectures -------------------------------------------------------------------------
def test_resnet18_groups_and_the_papers_parameter_count():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    assert [(g.label, len(g.layers)) for g in harmonic_groups(model)] == [
        ("stem", 1), ("layer1", 4), ("layer2", 4), ("layer3", 4), ("layer4", 4)]
    approxconv(harmonics="6,3,3,3,2").compress(model, ctx())
    assert sum(p.numel() for p in model.parameters()) == 7_099_496  # Table 2: 7.09M
    assert not parametrize.is_parametrized(model.layer4[0].downsample[0])


def test_convnext_groups_are_the_depthwise_convs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.convnext_tiny()
    groups = harmonic_groups(model)
    assert len(groups) == 18 and groups[0].layers == ["features.1.0.block.0"]
    orders, skipped = plan_orders(model, parse_harmonics("7x3,7x3,7x4,6x5,6x3"), {})
    coefficients = sum(dict(model.named_modules())[n].out_channels * n_ ** 2 for n, n_ in orders.items())
    assert coefficients == 269_664  # + 6,624 biases + the 4x4 stem's 4,608 = Table 3's 0.27M
    assert skipped["features.2.1"] == "2x2 kernel"


def test_resnet20_config_matches_the_papers_table():
    model = models.build("resnet20", 10)
    approxconv(harmonics=[3, 3, 3, 2]).compress(model, ctx())
    assert sum(p.numel() for p in model.parameters()) == 157_082
    model = models.build("resnet32", 10)
    approxconv(harmonics=[3, 3, 3, 2]).compress(model, ctx())
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.27  # Table 1: 0.27M


@pytest.mark.skipif(not (SHARED / "pretrained" / "resnet20-12fca82f.th").is_file(), reason="needs ../shared/pretrained")
def test_pretrained_resnet20_fit():
    sd = torch.load(SHARED / "pretrained" / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)["state_dict"]
    model = models.build("resnet20", 10)
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    model.eval()
    cos = approxconv(series="cos", harmonics=[3, 3, 3, 2]).compress(copy.deepcopy(model), ctx())
    cheb = approxconv(series="cheb", harmonics=[3, 3, 3, 2]).compress(copy.deepcopy(model), ctx())
    w = model.layer3[1].conv2.weight
    for approx in (cos, cheb):
        assert (approx.layer1[0].conv1.weight - model.layer1[0].conv1.weight).abs().max() < 1e-5
    err = (cos.layer3[1].conv2.weight - w).square().mean() / w.square().mean()
    assert 0.05 < err < 0.9  # N=2 on a trained 3x3 kernel: a real but partial approximation
    assert (cos.layer3[1].conv2.weight - cheb.layer3[1].conv2.weight).abs().max() < 1e-5


def test_a_saved_approxconv_model_can_be_refitted_and_quantised():
    # The quantised rows can start from an unquantised approxconv run's model.pt: restore, then compress.
    first = approxconv(harmonics=[2, 3, 3])
    model = first.compress(tiny(), ctx())
    expected = model(X)
    again = approxconv(harmonics=[2, 3, 3]).compress(copy.deepcopy(model), ctx())  # same orders: exact refit
    assert torch.allclose(again(X), expected, atol=1e-5)
    assert again.conv1.parametrizations.weight.original.shape == (4, 3, 2, 2)
    assert len(again.conv1.parametrizations.weight) == 1  # replaced, not stacked
    quantised = approxconv(harmonics=[2, 3, 3], quant_bits=8, calibration_batches=0).compress(copy.deepcopy(model), ctx())
    with pytest.raises(CompressError, match="already quantised"):
        approxconv(harmonics=[2, 3, 3], quant_bits=8).compress(quantised, ctx())
    assert torch.allclose(model(X), expected)  # the source model is untouched by the copies' baking


def test_kernel_keeps_float32_under_autocast_and_cache_survives_it():
    model = approxconv(harmonics=[2, 3, 3]).compress(tiny(), ctx())
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(X)
            assert model.conv1.weight.dtype == torch.float32
        assert low.dtype == torch.bfloat16
        full = model(X)  # the kernel cached under autocast is reused in a float32 pass
    assert full.dtype == torch.float32 and torch.allclose(full, low.float(), atol=0.1)
