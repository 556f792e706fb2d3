"""The contract of "your own CNN" (docs/own-model.md): every structured method, and approxconv, aup and quant,
on torchvision's families (random weights, 32x32 inputs, 10 classes), as the pipeline runs them:

- a structured method at `target_macs=0.5` lands within 1 % of half the MACs (compress.deploy.measure's counter);
- the compressed model runs forward;
- its `model.pt` (checkpoints.pack, with the builder spec) reloads through sources.load_saved into the same
  outputs, and `compress export` of it (commands.export.export_model: ONNX, checked in ONNX Runtime) matches PyTorch.

`make test` runs a fast subset (regnet_x_400mf under l1: its grouped convs failed before, and the two
grouped-conv unit tests); `make test-full` the whole matrix (54 cases, ~15 min on 2 shared cores).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from compress import models
from compress.commands.export import export_model
from compress.deploy.measure import count_macs
from compress.job import checkpoints, sources
from compress.methods import METHODS
from compress.models import Spec
from tests.conftest import noise_calibration
from tests.contexts import cpu_context

pytestmark = pytest.mark.usefixtures("threads")

FAMILIES = ["mobilenet_v2", "resnet18", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny", "densenet121"]
STRUCTURED = ["l1", "random", "hrank", "cfdp", "scap", "torch_pruning"]
OTHERS = ["approxconv", "aup", "quant"]
SIZE, CLASSES, TARGET = 32, 10, 0.5
SHAPE = (3, SIZE, SIZE)

# Options that keep the data-driven criteria cheap (few calibration images); the pruning is the real one.
CHEAP: dict[str, dict] = {
    "hrank": dict(batches=1, batch_size=8),
    "cfdp": dict(batches=1, batch_size=8),
    "scap": dict(threshold=None, batches=1, batch_size=8, ae_epochs=1, ae_samples=64),
    "aup": dict(pr=0.5),
    "approxconv": dict(harmonics=[2]),  # one order for every group (the default list is the CIFAR ResNets' 4 stages)
    "quant": dict(calibration_batches=2, calibration_batch_size=8),
}
FAST = {("regnet_x_400mf", "l1")}  # ~8 s; the rest ~10-40 s each (export included): make test-full


def cases(methods: list[str]) -> list:
    return [pytest.param(f, m, id=f"{f}-{m}", marks=() if (f, m) in FAST else pytest.mark.slow)
            for f in FAMILIES for m in methods]


calibration = noise_calibration(SHAPE, per_request=True)


def build(family: str) -> tuple[Spec, nn.Module]:
    spec = Spec("torchvision", family)
    torch.manual_seed(0)
    return spec, models.build(spec, CLASSES).eval()


def options(method: str, **extra):
    return dataclasses.replace(METHODS[method].Options(), **{**CHEAP.get(method, {}), **extra})


def context(spec: Spec):
    return cpu_context(spec.label, num_classes=CLASSES, size=SIZE, calibration=calibration,
                       evaluate=lambda m: 50.0, quick=True)


def saved_and_exported(tmp_path, spec: Spec, method, model: nn.Module, capsys) -> None:
    """model.pt as the pipeline writes it -> `compress export` of it: the reload gives the same outputs, the
    ONNX file matches PyTorch (export_model fails with CompressError otherwise)."""
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x)
    assert expected.shape == (4, CLASSES) and torch.isfinite(expected).all()
    file = tmp_path / "model.pt"
    checkpoints.atomic_save(checkpoints.pack(model, spec, method.name, method.meta(model), num_classes=CLASSES,
                                             input_shape=SHAPE), file)
    saved = sources.load_saved(file)
    assert saved.arch == spec.label and saved.input_shape == SHAPE
    with torch.no_grad():
        torch.testing.assert_close(saved.model(x), expected, rtol=0, atol=1e-5)
    export_model([str(file), "--images", "8"])
    assert (tmp_path / "model.onnx").is_file() and "checked on" in capsys.readouterr().out


@pytest.mark.parametrize("family, method_name", cases(STRUCTURED))
def test_structured_method_halves_the_macs_of_a_torchvision_family(tmp_path, capsys, family, method_name):
    spec, model = build(family)
    baseline = count_macs(model, SHAPE)
    method = METHODS[method_name](options(method_name, target_macs=TARGET))
    model = method.compress(model, context(spec))
    kept = count_macs(model, SHAPE) / baseline
    assert abs(kept / TARGET - 1) <= 0.01, f"{family} {method_name}: {kept:.4f} of the MACs, target {TARGET}"
    saved_and_exported(tmp_path, spec, method, model, capsys)


@pytest.mark.parametrize("family, method_name", cases(OTHERS))
def test_approxconv_aup_and_quant_on_a_torchvision_family(tmp_path, capsys, family, method_name):
    spec, model = build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = METHODS[method_name]
    method = cls(options(method_name))
    ctx = context(spec)
    if cls.one_shot:
        model = method.compress(model, ctx)
    else:  # aup works in rounds: prepare, then one step
        model = method.prepare(model, ctx)
        model = method.step(model, ctx, 1, 1.0) or model
    after = model.state_dict()
    assert after.keys() != before.keys() or any(not torch.equal(after[k], before[k]) for k in before), \
        f"{method_name} changed nothing in {family}"
    saved_and_exported(tmp_path, spec, method, model, capsys)


def test_grouped_convs_lose_the_same_positions_in_every_group():
    """regnet_x_400mf's grouped 3x3 convs (groups of 16 channels) keep their number of groups, every group the
    same width, and at least two channels per group (fewer would read as depthwise to Torch-Pruning)."""
    spec, model = build("regnet_x_400mf")
    grouped = {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels}
    assert grouped
    method = METHODS["l1"](options("l1", compress_rate=0.95))
    model = method.compress(model, context(spec))
    convs = dict(model.named_modules())
    for name, groups in grouped.items():
        conv = convs[name]
        assert conv.groups == groups and conv.out_channels % groups == 0 and conv.in_channels % groups == 0
        assert conv.out_channels // groups >= 2 and conv.weight.shape[1] == conv.in_channels // groups
    assert model(torch.randn(2, *SHAPE)).shape == (2, CLASSES)


def test_grouped_conv_costs_are_exact_in_the_cost_model():
    """The budget search's cost model predicts the grouped convs' MACs exactly (out * in / groups), so a
    target lands in one pass."""
    from compress.prune import allocation, engine
    from compress.prune.rates import RateSpec

    spec, model = build("regnet_x_400mf")
    plan = engine.PruningPlan.build(model, SHAPE, RateSpec(uniform=1.0, text="1.0"))
    cost = allocation.CostModel.build(plan, SHAPE, "macs", count_macs(model, SHAPE))
    keep = {g: max(plan.min_channels(g), math.ceil(c / 2 / plan.units[g]) * plan.units[g])
            for g, c in plan.channels.items()}
    predicted = float(cost.cost(cost.widths_of(keep)))
    scores = {g: torch.arange(c, dtype=torch.float) for g, c in plan.channels.items()}
    engine.prune_groups(model, plan, scores, keep)
    assert predicted == count_macs(model, SHAPE)


def test_pruned_layer_norms_and_layer_scales_reload_from_model_pt():
    """ConvNeXt's blocks hold a LayerNorm and a bare `layer_scale` parameter that Torch-Pruning narrows with
    the channels: restore_structure gives a fresh model those shapes, so the saved weights load strictly."""
    from torchvision.models.convnext import CNBlock

    def tiny_convnext() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), CNBlock(16, layer_scale=0.5, stochastic_depth_prob=0.0),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES)).eval()

    method = METHODS["l1"](options("l1", compress_rate=0.5))
    model = method.compress(tiny_convnext(), cpu_context("tiny", num_classes=CLASSES, size=8))
    assert model[1].layer_scale.shape[0] == 8 and model[1].block[2].normalized_shape == (8,)
    saved = checkpoints.pack(model, "tiny", method.name, method.meta(model))
    fresh = METHODS["l1"].restore(tiny_convnext(), saved["meta"], saved["state_dict"])
    checkpoints.load_into(fresh, saved["state_dict"], "model.pt")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)
