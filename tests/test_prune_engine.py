"""Surgery: pruning dead channels changes nothing; save/restore; iterative steps; ShortcutA routes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compress import CompressError
from compress.methods.base import Context
from compress.methods.structured import L1Options, L1Pruning
from compress.models import build
from compress.models.cifar_resnet import ShortcutA
from compress.prune import engine
from compress.prune.rates import RateSpec
from tests.contexts import cpu_context

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def context(arch: str) -> Context:
    return cpu_context(arch, num_classes=10, size=32)


def randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics so that eval-mode outputs depend on every channel."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def kill_channels(model: nn.Module, arch: str, spec: str | float) -> dict[str, int]:
    """Make the channels the l1 criterion will prune contribute exactly nothing: zero the filters and the
    BN affine parameters of the channels of each group (all convs and BNs tied to them), so that the
    pruned model must compute exactly what this model computes. Returns the kept counts."""
    plan = engine.PruningPlan.build(model, (3, 32, 32), RateSpec.parse(spec))
    keep = plan.target_keep()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for group, count in keep.items():
            # Stream channels fed by an option-A shortcut carry the previous stage's channels, so they can
            # only be made dead where the shortcut zero-pads: choose the dead channels among those.
            fed: set[int] = set()
            for dep, _ in plan.graph.get_pruning_group(plan.convs[group], engine.tp.prune_conv_out_channels, [0]):
                if isinstance(dep.target.module, ShortcutA) and plan.graph.is_out_channel_pruning_fn(dep.handler):
                    if dep.target.module.stride > 1:
                        fed.update(dep.target.module.out_index.tolist())
            free = torch.tensor([c for c in range(plan.channels[group]) if c not in fed])
            assert len(free) >= plan.channels[group] - count
            dead = free[torch.randperm(len(free), generator=g)[: plan.channels[group] - count]].tolist()
            for dep, idxs in plan.graph.get_pruning_group(plan.convs[group], engine.tp.prune_conv_out_channels, dead):
                module, idx = dep.target.module, [int(i) for i in idxs]
                if isinstance(module, nn.Conv2d) and plan.graph.is_out_channel_pruning_fn(dep.handler):
                    module.weight[idx] = 0
                    if module.bias is not None:
                        module.bias[idx] = 0
                elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.weight[idx] = 0
                    module.bias[idx] = 0
            if arch.startswith("resnet") and group.startswith("layer1.") and group.endswith("conv2"):
                # The HRank layout decouples the stem from the stage-1 stream: the stem channels routed to
                # the pruned stream channels must be dead too for the outputs to match exactly.
                model.conv1.weight[dead] = 0
                model.bn1.weight[dead] = 0
                model.bn1.bias[dead] = 0
    return keep


@pytest.mark.parametrize(
    "arch, spec",
    [
        ("resnet20", 0.5),  # stem coupled with the stage-1 stream; pruned option-A shortcuts in between
        ("resnet20", "[0.]+[0.3]*2+[0.5]*9"),  # HRank layout: stem decoupled through a routing shortcut
        ("vgg16_bn", "[0.21]*7+[0.75]*5"),
        ("googlenet", "[0.3]+[0.6]*2+[0.7]*5+[0.8]*2"),  # concatenations
    ],
)
def test_pruning_dead_channels_keeps_outputs(arch, spec):
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    randomise_batchnorm(model)
    keep = kill_channels(model, arch, spec)
    reference = model(X)
    before = sum(p.numel() for p in model.parameters())
    pruned = L1Pruning(L1Options(compress_rate=spec)).compress(model, context(arch)).eval()
    assert sum(p.numel() for p in pruned.parameters()) < before
    widths = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(widths[g] == k for g, k in keep.items())
    torch.testing.assert_close(pruned(X), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "arch, spec",
    [
        ("resnet20", "[0.]+[0.18]*11"),
        ("resnet20", 0.4),
        ("resnet20", {"layer2.*": 0.5, "layer3.*.conv1": 0.25}),
        ("googlenet", "[0.3]+[0.6]*2+[0.7]*5+[0.8]*2"),
    ],
)
def test_save_restore_round_trip(tmp_path, arch, spec):
    torch.manual_seed(0)
    model = build(arch, 10).eval()
    randomise_batchnorm(model)
    method = L1Pruning(L1Options(compress_rate=spec))
    model = method.compress(model, context(arch)).eval()
    path = tmp_path / "model.pt"
    torch.save({"meta": method.meta(model), "state_dict": model.state_dict()}, path)
    packed = torch.load(path, map_location="cpu", weights_only=True)
    fresh = type(method).restore(build(arch, 10), packed["meta"], packed["state_dict"])
    fresh.load_state_dict(packed["state_dict"])
    fresh.eval()
    assert torch.equal(fresh(X), model(X))
    assert repr(fresh) == repr(model)


def test_restore_rejects_foreign_meta():
    with pytest.raises(CompressError, match="arch.checkpoint"):
        engine.restore_structure(build("resnet20", 10), {}, {})


def test_iterative_steps_reach_the_one_shot_widths():
    spec = {"layer1.*": 0.5, "layer3.*.conv1": 0.75}
    ctx = context("resnet20")
    one_shot = L1Pruning(L1Options(compress_rate=spec)).compress(build("resnet20", 10), ctx)
    method = L1Pruning(L1Options(compress_rate=spec, step_rate=0.3))
    model = method.prepare(build("resnet20", 10), ctx)
    widths, rounds = [], 0
    while (stepped := method.step(model, ctx, rounds + 1, 1.0)) is not None:
        model, rounds = stepped, rounds + 1
        widths.append(model.layer3[0].conv1.out_channels)
        # the pipeline rolls back by deep copies and resumes by the method's plain state
        method.load_state_dict(copy.deepcopy(method.state_dict()))
    assert rounds >= 3
    assert widths == sorted(widths, reverse=True) and widths[0] == 64 - int(64 * 0.3)
    assert repr(model) == repr(one_shot)


def test_step_scale_shrinks_a_round():
    ctx = context("resnet20")
    full, half = (L1Pruning(L1Options(compress_rate=0.5, step_rate=0.5)) for _ in range(2))
    a = full.step(full.prepare(build("resnet20", 10), ctx), ctx, 1, 1.0)
    b = half.step(half.prepare(build("resnet20", 10), ctx), ctx, 1, 0.5)
    assert a.layer3[0].conv1.out_channels == 32 and b.layer3[0].conv1.out_channels == 48


def test_layer_never_emptied():
    model = L1Pruning(L1Options(compress_rate=1.0)).compress(build("resnet20", 10), context("resnet20"))
    assert all(m.out_channels == 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(X).shape == (4, 10)


def test_threshold_prunes_low_scores_but_keeps_one():
    model = build("resnet20", 10)
    with torch.no_grad():
        model.layer3[1].conv1.weight.mul_(0.0).add_(1e-3)  # every filter's L1 is 0.576: all below 1
        model.layer3[2].conv1.weight.mul_(1e-3)  # L1 about 0.03 ...
        model.layer3[2].conv1.weight[:10] *= 1e4  # ... but 10 filters far above 1
    method = L1Pruning(L1Options(compress_rate=1.0, threshold=1.0))
    pruned = method.compress(model, context("resnet20"))
    assert pruned.layer3[1].conv1.out_channels == 1
    assert pruned.layer3[2].conv1.out_channels == 10


def test_shortcut_routes_forward_and_backward():
    shortcut = ShortcutA(3, 5, stride=2)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    padded = shortcut(x)
    assert padded.shape == (2, 12, 3, 3) and torch.equal(padded[:, 3:7], x[:, :, ::2, ::2])
    shortcut.set_routes(4, 5, [0, 3], [4, 1])  # input 0 -> output 4, input 3 -> output 1
    out = shortcut(x)
    expected = torch.zeros(2, 5, 3, 3)
    expected[:, 4], expected[:, 1] = x[:, 0, ::2, ::2], x[:, 3, ::2, ::2]
    assert torch.equal(out, expected)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    expected_grad = torch.zeros_like(x)
    expected_grad[:, 0, ::2, ::2], expected_grad[:, 3, ::2, ::2] = weights[:, 4], weights[:, 1]
    assert torch.equal(grad, expected_grad)
    assert torch.autograd.gradcheck(lambda t: shortcut(t), (torch.randn(1, 4, 4, 4, dtype=torch.double, requires_grad=True),))


def test_threshold_in_rounds_reaches_the_one_shot_result():
    def model():
        m = build("resnet20", 10)
        with torch.no_grad():
            m.layer3[2].conv1.weight.mul_(1e-3)
            m.layer3[2].conv1.weight[:20] *= 1e4
        return m

    ctx, spec = context("resnet20"), {"layer3.2.conv1": 1.0}
    one_shot = L1Pruning(L1Options(compress_rate=spec, threshold=1.0)).compress(model(), ctx)
    method = L1Pruning(L1Options(compress_rate=spec, threshold=1.0, step_rate=0.5))
    stepped, rounds = method.prepare(model(), ctx), 0
    while (result := method.step(stepped, ctx, rounds + 1, 1.0)) is not None:
        stepped, rounds = result, rounds + 1
    assert one_shot.layer3[2].conv1.out_channels == stepped.layer3[2].conv1.out_channels == 20
    assert rounds == 2  # 64 -> 32 -> 20
