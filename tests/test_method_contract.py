"""The contract every registered method keeps with the pipeline (compress/methods/base.py), checked on
each entry of `compress.methods.METHODS`:

- it builds from its default options and from its Hydra config group (`method=<name>`), and the two agree
  (one source for each default);
- its declared capabilities are consistent (a method that needs rounds names a recipe that has them);
- what it does to a model survives `model.pt`: `meta` + `state_dict` -> torch.save/load -> a fresh model,
  `restore`, strict `load_state_dict` -> identical outputs; its round state survives `state.pt`;
- `compress.layers.deployable` turns the result into plain modules with the same outputs;
- every experiment (YAML file or table row) composes and builds its method (fast, no training).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize, prune

from compress import layers, models
from compress.job import checkpoints
from compress.methods import METHODS, Method, MethodOptions
from tests.conftest import noise_calibration
from tests.contexts import cpu_context

pytestmark = pytest.mark.usefixtures("threads")

ARCH, CLASSES, SIZE = "resnet20", 10, 8  # ResNet-20 on 8x8 images: every method's layer types, in milliseconds

# Options that keep each method fast on the tiny model while still compressing something. A method
# missing here runs with its defaults (a new method is covered the day it is registered).
FAST: dict[str, dict] = {
    "l1": dict(compress_rate=0.5),
    "random": dict(compress_rate=0.5),
    "hrank": dict(compress_rate=0.5, batches=2, batch_size=4),
    "cfdp": dict(compress_rate=0.5, batches=2, batch_size=4),
    "scap": dict(compress_rate=0.5, threshold=None, batches=1, batch_size=4, ae_epochs=1, ae_samples=64),
    "aup": dict(pr=0.5),
    "fgfp": dict(layers=2, fit_steps=2, pr=0.5),
    "quant": dict(calibration_batches=2, calibration_batch_size=4),
    "chain": dict(steps=[{"name": "l1", "compress_rate": 0.5}, {"name": "approxconv", "harmonics": 2},
                         {"name": "quant", "calibration_batches": 1, "calibration_batch_size": 4}]),
}
# Further option sets worth their own round trip (other layer types: fake quantisation).
VARIANTS: dict[str, dict] = {
    "approxconv-q8": dict(quant_bits=8, calibration_batches=2, calibration_batch_size=4),
}


def method_cases() -> list:
    """(registry name, options override, mode) for each method and each way the pipeline can run it:
    one-shot (`compress`) and/or in rounds (`prepare` + one `step`)."""
    cases = []
    for name, cls in sorted(METHODS.items()):
        option_sets = [(name, FAST.get(name, {}))] + [(v, o) for v, o in VARIANTS.items() if v.split("-")[0] == name]
        for label, opts in option_sets:
            for mode, enabled in (("one_shot", cls.one_shot), ("rounds", cls.iterative)):
                if enabled:
                    cases.append(pytest.param(name, opts, mode, id=f"{label}-{mode}"))
    return cases


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = models.build(ARCH, CLASSES)
    with torch.no_grad():  # BatchNorm statistics away from the identity, so every layer matters to the output
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


calibration = noise_calibration((3, SIZE, SIZE), per_request=True)


def context():
    return cpu_context(ARCH, num_classes=CLASSES, size=SIZE, calibration=calibration, evaluate=lambda m: 50.0,
                       quick=True)


def inputs() -> torch.Tensor:
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123))


def options(name: str, overrides: dict) -> MethodOptions:
    # dataclasses.replace runs __post_init__ again, and raises on a key the options do not have.
    return dataclasses.replace(METHODS[name].Options(), **overrides)


def apply(method: Method, model: nn.Module, mode: str) -> nn.Module:
    ctx = context()
    if mode == "one_shot":
        return method.compress(model, ctx)
    model = method.prepare(model, ctx)
    stepped = method.step(model, ctx, 1, 1.0)
    return model if stepped is None else stepped


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def nonzero(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


def through_bytes(obj):
    """torch.save -> torch.load(weights_only=True): what model.pt and state.pt go through."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


# -- building ---------------------------------------------------------------------------------------------
def test_the_registry_holds_every_method_of_the_readme():
    assert set(METHODS) == {"none", "l1", "random", "hrank", "cfdp", "scap", "approxconv", "aup", "fgfp", "quant",
                            "chain", "torch_pruning"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_builds_from_its_default_options_and_declares_consistent_capabilities(name):
    cls = METHODS[name]
    assert cls.name == name
    assert dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, MethodOptions)
    opts = cls.Options()
    assert opts.name == name, "the options' name must select this method"
    method = cls(opts)
    assert method.options is opts
    assert cls(None).options == opts  # no options: the defaults
    assert all(isinstance(flag, bool) for flag in (cls.one_shot, cls.iterative, cls.requires_rounds, cls.changes_model))
    assert cls.one_shot or cls.iterative, "a method the pipeline can run neither way"
    assert not cls.requires_rounds or (cls.iterative and not cls.one_shot)
    if cls.iterative:
        assert type(method).step is not Method.step, "declared iterative without a step"
    if cls.Options is not MethodOptions:  # every constructor has the same shape: its own options only
        with pytest.raises(TypeError):
            cls(MethodOptions())


@pytest.fixture
def hydra_configs():
    from compress.job.compose import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="compress.configs", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_builds_from_its_hydra_config_with_the_same_defaults(hydra_configs, name):
    cfg = compose(config_name="config", overrides=[f"method={name}"])
    opts = OmegaConf.to_object(cfg.method)
    cls = METHODS[name]
    assert type(opts) is cls.Options
    assert opts == cls.Options(), "the config group and the dataclass disagree on a default"
    assert cls(opts).options is opts


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.recipe is not None))
def test_a_recipe_names_a_schedule_that_runs_the_method(hydra_configs, name):
    cls = METHODS[name]
    cfg = compose(config_name="config", overrides=[f"method={name}", f"schedule={cls.recipe}"])
    if cls.requires_rounds:
        assert cfg.schedule.rounds > 0, f"schedule={cls.recipe} has no rounds, but {name} needs them"


# -- persistence and deployment -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, overrides, mode", method_cases())
def test_compressed_model_round_trips_through_model_pt_and_deploys_to_plain_modules(name, overrides, mode):
    cls = METHODS[name]
    method = cls(options(name, overrides))
    model = tiny_model()
    before, nonzero_before = state_of(model), nonzero(model)
    model = apply(method, model, mode).eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all()

    # What the method did is visible in the weights (a method that does nothing is a contract breach
    # too: the pipeline would label the baseline as compressed).
    after = state_of(model)
    if mode == "one_shot" and not cls.changes_model:
        assert same_state(after, before), "changes_model=False, but compress changed the model"
    if name != "none":
        assert not same_state(after, before) or nonzero(model) < nonzero_before, f"{name} changed nothing"

    # model.pt: {"format", "arch", "method", "meta", "state_dict"}, meta plain data.
    meta = method.meta(model)
    json.dumps(meta)  # plain str/int/float/list/dict: no tensors, no objects
    saved = through_bytes(checkpoints.pack(model, ARCH, cls.name, meta))
    assert saved["method"] == name and saved["format"] == checkpoints.FORMAT
    fresh = models.build(ARCH, CLASSES)
    fresh = METHODS[saved["method"]].restore(fresh, saved["meta"], saved["state_dict"])
    checkpoints.load_into(fresh, saved["state_dict"], "model.pt")  # strict: every key and shape matches
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)

    # deployable: plain modules, the same outputs, and the trained form left untouched.
    plain = layers.deployable(model)
    assert plain is not model
    for module_name, m in plain.named_modules():
        assert not parametrize.is_parametrized(m), f"{module_name} still has a parametrization"
        assert not any(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values()), \
            f"{module_name} still has a prune hook"
    assert not [k for k in plain.state_dict() if k.endswith(("_orig", "_mask")) or ".parametrizations." in k]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert same_state(state_of(model), after)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.iterative))
def test_round_state_survives_state_pt(name):
    """Resuming in the middle of an iterative schedule rebuilds the method from its state_dict."""
    cls = METHODS[name]
    method = cls(options(name, FAST.get(name, {})))
    apply(method, tiny_model(), "rounds")
    state = method.state_dict()
    again = cls(options(name, FAST.get(name, {})))
    again.load_state_dict(through_bytes(state))
    assert again.state_dict() == state


# -- every experiment composes and builds its method ------------------------------------------------------
def experiment_names() -> list[str]:
    """Every option of the `experiment` group: YAML files and the rows registered in the ConfigStore."""
    from compress.job.compose import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="compress.configs", version_base="1.3"):
        names = GlobalHydra.instance().config_loader().get_group_options("experiment")
    GlobalHydra.instance().clear()
    return sorted(names)


EXPERIMENTS = experiment_names()


# Every experiment of the repository before the ApproxConv table became data: each must stay addressable.
PAPER_ROWS = """
cfdp_googlenet cfdp_resnet50 cfdp_resnet56 cfdp_vgg16 fgfp_resnet20 fgfp_resnet50 scap_vgg16
approxconv_convnext_tiny_imagenet_cos_5x3_5x3_5x9_5x3 approxconv_convnext_tiny_imagenet_cos_6x3_6x3_6x9_6x3
approxconv_convnext_tiny_imagenet_cos_7x3_6x3_6x9_6x3 approxconv_convnext_tiny_imagenet_cos_7x3_7x3_4x9_4x3
approxconv_convnext_tiny_imagenet_cos_7x3_7x3_5x9_4x3 approxconv_convnext_tiny_imagenet_cos_7x3_7x3_5x9_5x3
approxconv_convnext_tiny_imagenet_cos_7x3_7x3_6x9_6x3 approxconv_convnext_tiny_imagenet_cos_7x3_7x3_7x4_6x5_6x3
approxconv_convnext_tiny_imagenet_cos_7x3_7x3_7x9_6x3
approxconv_resnet18_imagenet_conv2d_q4 approxconv_resnet18_imagenet_conv2d_q8
""".split() + [
    f"approxconv_resnet18_imagenet_{series}_{orders}{quant}"
    for series in ("cheb", "cos")
    for orders in ("43322", "43332", "53322", "53332", "53333", "63222", "63322", "63332", "63333")
    for quant in (("", "_q4", "_q8") if orders in ("53322", "53332", "63322", "63332") else ("",))
] + [f"approxconv_{arch}_{series}_{orders}" for arch in ("resnet20", "resnet32") for series in ("cheb", "cos")
     for orders in ("2222", "2223", "3222", "3322", "3332")]


def test_every_paper_row_is_still_an_experiment():
    assert len(PAPER_ROWS) == 72 and sum(r.startswith("approxconv_") for r in PAPER_ROWS) == 65
    assert sorted(set(PAPER_ROWS) - set(EXPERIMENTS)) == []


def approxconv_row(name: str) -> dict:
    """What an ApproxConv row's name says it runs (the table's data must agree with its row names)."""
    rest = name.removeprefix("approxconv_")
    quant = None
    if rest[-3:] in ("_q4", "_q8"):
        rest, quant = rest[:-3], int(rest[-1])
    for arch in ("convnext_tiny_imagenet", "resnet18_imagenet", "resnet20", "resnet32"):
        if rest.startswith(arch + "_"):
            series, _, orders = rest[len(arch) + 1:].partition("_")
            break
    if arch == "convnext_tiny_imagenet":
        harmonics = orders.replace("_", ",")
    elif series == "conv2d":
        harmonics = None
    else:
        harmonics = [int(d) for d in orders]
    imagenet = arch.endswith("_imagenet")
    return {"arch": arch, "dataset": "imagenet" if imagenet else "cifar10", "series": series, "harmonics": harmonics,
            "quant_bits": quant, "schedule": "approxconv_imagenet" if imagenet else "approxconv_cifar"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_method(experiment):
    from compress.job.compose import compose as compose_config

    config = compose_config([f"experiment={experiment}"])
    assert config.arch.name in models.names()
    cls = METHODS[config.method.name]
    assert type(config.method) is cls.Options
    method = cls(config.method)
    assert method.options is config.method
    if cls.requires_rounds:
        assert config.schedule.rounds > 0, f"{experiment}: {cls.name} needs rounds, the schedule has none"
    if experiment.startswith("approxconv_") and experiment in PAPER_ROWS:
        row = approxconv_row(experiment)
        assert (config.arch.name, config.dataset.name, config.method.name) == (row["arch"], row["dataset"], "approxconv")
        harmonics = config.method.harmonics
        assert (list(harmonics) if isinstance(harmonics, (list, tuple)) else harmonics) == row["harmonics"]
        if row["harmonics"] is not None:
            assert config.method.series == row["series"]
        assert config.method.quant_bits == row["quant_bits"]
        assert config.schedule == reference_schedule(row["arch"], row["dataset"], row["schedule"])


@functools.lru_cache(maxsize=None)
def reference_schedule(arch: str, dataset: str, schedule: str):
    from compress.job.compose import compose as compose_config

    return compose_config([f"arch={arch}", f"dataset={dataset}", f"schedule={schedule}"]).schedule
