"""compress.layers: the one baking walker `deployable` on a model holding every layer type at once (series
kernel, FGF layer, prune mask, fake quantisation), and the package's independence from the rest."""
from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from compress.layers import bake_parametrized, deployable, fgf, masks, quant, series
from compress.layers.quant import ActivationFakeQuant

LAYERS = Path(__file__).resolve().parents[1] / "compress" / "layers"
X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def every_layer_type() -> nn.Module:
    """conv1: series kernel with 4-bit coefficients; conv2: FGF; conv3: half its weights masked; fc: weight
    and input fake-quantised at 8 bits. Then one training step, so that the masked weight is a non-leaf
    tensor and the BatchNorm / activation-range statistics have moved."""
    torch.manual_seed(0)
    model = Tiny()
    series.approximate_conv(model.conv1, "cos", 2, quant_bits=4)
    fgf.convert(model, ["conv2"], {"terms": 15, "step": 0.25, "grid": "pixel", "amplitude": True}, 5, 0.05, [1.0])
    mask = masks.magnitude_mask(model.conv3.weight, torch.ones_like(model.conv3.weight), 0.5)
    masks.set_mask(model.conv3, mask)
    quant.fake_quantise(model.fc, 8)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    model(X).square().mean().backward()
    optimiser.step()
    model(X).square().mean().backward()  # leaves conv3.weight computed with a graph
    return model


def snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [len(m._forward_pre_hooks) for m in model.modules()], model.training)


def test_deployable_gives_plain_modules_with_the_same_outputs():
    model = every_layer_type()
    assert model.conv3.weight.grad_fn is not None  # a plain deepcopy would refuse this model
    before = snapshot(model)
    plain = deployable(model)

    # only plain modules: no parametrizations, no prune hooks or _orig/_mask tensors, torch's own classes
    # (and the model's), the input quantiser kept with its pre-hook
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert all(type(m).__module__.startswith("torch.nn.") or type(m) in (Tiny, ActivationFakeQuant)
               for m in plain.modules())
    assert [type(m) for m in (plain.conv1, plain.conv2, plain.conv3, plain.fc)] == [nn.Conv2d, nn.Conv2d, nn.Conv2d,
                                                                                     nn.Linear]
    assert not any(isinstance(h, prune.BasePruningMethod) for m in plain.modules() for h in m._forward_pre_hooks.values())
    assert not any(k.endswith(("_orig", "_mask", ".original")) for k in plain.state_dict())
    assert all(isinstance(m.weight, nn.Parameter) for m in (plain.conv1, plain.conv2, plain.conv3, plain.fc))
    assert isinstance(plain.fc.input_quant, ActivationFakeQuant) and len(plain.fc._forward_pre_hooks) == 1

    # the baked values: generated kernels, permanent zeros, quantised weights
    assert plain.conv1.weight.shape == (4, 3, 3, 3) and plain.conv2.weight.shape == (6, 4, 3, 3)
    assert torch.equal(plain.conv3.weight == 0, model.conv3.weight_mask == 0)
    w = plain.fc.weight.detach()
    levels = w / (w.abs().amax(1, keepdim=True) / 127)
    assert torch.allclose(levels, levels.round(), atol=1e-4)

    # same outputs in eval mode, and the argument is unchanged (values, structure, hooks, mode)
    assert plain.training == model.training
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(X), model(X), atol=1e-6)
    model.train()
    after = snapshot(model)
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    assert parametrize.is_parametrized(model.conv1) and hasattr(model.conv3, "weight_mask")


def test_deployable_makes_exactly_one_deep_copy(monkeypatch):
    model = every_layer_type()
    copies = []
    real = copy.deepcopy

    def counting(x, memo=None, _nil=[]):  # noqa: B006 (copy.deepcopy's own signature)
        if x is model:
            copies.append(x)
        return real(x, memo)

    monkeypatch.setattr(copy, "deepcopy", counting)
    deployable(model)
    assert len(copies) == 1


def test_baking_a_copy_leaves_the_original_working():
    # A deep copy shares the original's injected Parametrized<Layer> class; baking the copy must not
    # remove the weight property from that class.
    model = every_layer_type().eval()
    with torch.no_grad():
        expected = model(X)
        twin = copy.deepcopy(model)
        assert bake_parametrized(twin.conv1) and bake_parametrized(twin.conv2) and bake_parametrized(twin.fc)
        assert not bake_parametrized(twin.conv1)  # nothing left to bake
        assert type(twin.conv1) is nn.Conv2d and type(model.conv1) is not nn.Conv2d
        assert torch.allclose(model(X), expected, atol=0) and torch.allclose(twin(X), expected, atol=1e-6)
        assert torch.allclose(deployable(twin)(X), expected, atol=1e-6)


def test_deployable_of_a_plain_model_is_an_equal_copy():
    model = Tiny().eval()
    plain = deployable(model)
    assert plain is not model and plain.conv1.weight is not model.conv1.weight
    with torch.no_grad():
        assert torch.equal(plain(X), model(X))


def test_the_package_depends_on_torch_and_compress_error_only():
    for path in LAYERS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compress"):
                assert node.module.startswith("compress.layers") or (
                    node.module == "compress" and [a.name for a in node.names] == ["CompressError"]), (path, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("compress") for a in node.names), path
    code = ("import sys, compress.layers; "
            "print(sorted(m for m in sys.modules if m.startswith('compress') and not m.startswith('compress.layers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['compress']"
