"""`arch=torchvision`, `arch=timm`, `arch=module` (docs/own-model.md): building, the one weight rule of
`arch.checkpoint`, the builder spec in model.pt, and hostile values of the new keys (one line naming the key)."""
from __future__ import annotations

import sys

import pytest
import torch

from compress import CompressError, models
from compress.commands.export import export_model
from compress.job import checkpoints, sources
from compress.job.compose import compose
from compress.job.pipeline import Run
from compress.methods import METHODS
from compress.models import Spec
from tests.contexts import cpu_context

pytestmark = pytest.mark.usefixtures("threads")

TINY = "tests.own_nets:TinyNet"
QUICK = ["dataset=synthetic", "dataset.train_size=32", "dataset.val_size=16", "dataset.test_size=16",
         "measure.latency=false", "schedule.batch_size=16", "threads=1"]


def tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build(Spec("module", target=TINY, kwargs=kwargs), 10).eval()


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 1000
    return message


# -- building ---------------------------------------------------------------------------------------------
def test_torchvision_builders_get_the_classes_and_kwargs():
    model = models.build(Spec("torchvision", "mobilenet_v2", kwargs={"width_mult": 0.5}), 7)
    assert model.classifier[-1].out_features == 7 and model.features[0][0].out_channels == 16  # 32 * 0.5


@pytest.mark.parametrize("overrides, key, words", [
    (["arch=torchvision", "arch.name=mobilenet_v3"], "arch.name", "close matches: mobilenet_v2, mobilenet_v3_small"),
    (["arch=torchvision", "arch.name=resnet18", "arch.checkpoint=torchvision"], "arch.checkpoint", "cannot be downloaded"),
    (["arch=torchvision", "arch.name=resnet18", "arch.kwargs={weights:DEFAULT}"], "arch.kwargs", "arch.checkpoint=/path"),
    (["arch=torchvision", "arch.name=resnet18", "arch.kwargs={num_classes:3}"], "arch.kwargs", "dataset.num_classes"),
    (["arch=torchvision", "arch.name=resnet18", "arch.kwargs=abc"], "arch.kwargs", "a dict of builder arguments"),
    (["arch=torchvision", "arch.name=resnet18", "arch.source=keras"], "arch.source", "compress"),
    (["arch=module"], "arch.target", "is missing"),
    (["arch=module", "arch.target=no module"], "arch.target", "package.module:callable"),
    (["arch=module", "arch.target=justaname"], "arch.target", "package.module:callable"),
    (["arch=module", "arch.target=a:b:c"], "arch.target", "package.module:callable"),
    (["arch=resnet20", "arch.target=tests.own_nets:TinyNet"], "arch.target", "arch=module only"),
    (["arch.name=mobilenet_v2"], "arch.name", "arch=torchvision"),
    (["arch=torchvision", "arch.name=resnet18", "paper_row=approxconv-t1-resnet20-cheb-2222"], "paper_row",
     "published row of the papers' resnet20"),
])
def test_bad_arch_values_fail_at_composition_with_one_line(overrides, key, words):
    with pytest.raises(CompressError) as excinfo:
        compose(["dataset=synthetic", *overrides])
    line = one_line(excinfo)
    assert line.startswith(f"{key}: ") and words in line, line


@pytest.mark.parametrize("spec, key, words", [
    (Spec("module", target="tests.no_such_module:Net"), "arch.target", "cannot import tests.no_such_module"),
    (Spec("module", target="tests.own_nets:Missing"), "arch.target", "has no attribute 'Missing'"),
    (Spec("module", target="tests.own_nets:NOT_CALLABLE"), "arch.target", "not a callable"),
    (Spec("module", target="tests.own_nets:not_a_model"), "arch.target", "returned a dict, not an nn.Module"),
    (Spec("module", target="tests.own_nets:broken"), "arch.target", "RuntimeError: the user's builder fails"),
    (Spec("module", target=TINY, kwargs={"depth": 3}), "arch.kwargs", "unexpected keyword argument 'depth'"),
    (Spec("torchvision", "resnet18", kwargs={"widht": 2}), "arch.kwargs", "widht"),
    (Spec("torchvision", "resnet18", kwargs={"width_per_group": "x"}), "arch.kwargs", "failed"),
])
def test_builders_that_fail_name_the_key(spec, key, words):
    with pytest.raises(CompressError) as excinfo:
        models.build(spec, 10)
    line = one_line(excinfo)
    assert line.startswith(f"{key}: ") and words in line, line


def test_module_target_calls_with_num_classes_when_it_takes_them():
    assert tiny().classifier.out_features == 10 and tiny(width=4).classifier.in_features == 8
    assert models.build(Spec("module", target=TINY), 3).classifier.out_features == 3
    assert models.build(Spec("module", target="tests.own_nets.fixed_ten"), 3).classifier.out_features == 10  # as given


def test_module_target_is_found_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "beside_me_net.py").write_text("from torch import nn\n\ndef make(num_classes):\n"
                                               "    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert models.build(Spec("module", target="beside_me_net:make"), 5)[1].out_features == 5


def test_timm_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(CompressError) as excinfo:
        compose(["dataset=synthetic", "arch=timm", "arch.name=resnet18"])
    assert "pip install compress[timm]" in one_line(excinfo) and "make install" in str(excinfo.value)


def test_timm_models_build_without_hub_weights():
    pytest.importorskip("timm")
    model = models.build(Spec("timm", "resnet18"), 10)
    assert model.fc.out_features == 10
    with pytest.raises(CompressError, match=r"^arch\.name: unknown timm model 'resnet181' \(close matches: resnet18"):
        compose(["dataset=synthetic", "arch=timm", "arch.name=resnet181"])


# -- paper-only options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate, words", [
    ("paper", "'paper' names the CFDP/HRank tables' rates"),
    ("[0.]+[0.18]*29", "the list notation is defined for CIFAR ResNets"),
])
def test_paper_rates_and_layouts_refuse_other_models(rate, words):
    ctx = cpu_context(f"module:{TINY}", num_classes=10, size=16)
    with pytest.raises(CompressError) as excinfo:
        METHODS["l1"](METHODS["l1"].Options(compress_rate=rate)).compress(tiny(), ctx)
    line = one_line(excinfo)
    assert line.startswith("method.compress_rate: ") and words in line, line


# -- weights: the one rule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "module_prefix", "under_state_dict", "under_model"])
def test_state_dict_files_load_in_every_documented_layout(tmp_path, layout):
    source = tiny()
    sd = source.state_dict()
    obj = {"plain": sd, "module_prefix": {f"module.{k}": v for k, v in sd.items()},
           "under_state_dict": {"state_dict": sd, "epoch": 3}, "under_model": {"model": sd, "optimizer": {"lr": 0.1}}}[layout]
    torch.save(obj, tmp_path / "w.pth")
    loaded = sources.from_file(str(tmp_path / "w.pth"), Spec("module", target=TINY), 10, [], tmp_path)
    assert checkpoints.digest(loaded) == checkpoints.digest(source)


def test_a_file_with_other_keys_names_the_file_and_some_keys(tmp_path):
    torch.save(models.build(Spec("torchvision", "resnet18"), 10).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(CompressError) as excinfo:
        sources.from_file(str(tmp_path / "resnet.pth"), Spec("module", target=TINY), 10, [], tmp_path)
    line = one_line(excinfo)
    assert line.startswith("arch.checkpoint: ") and "resnet.pth" in line and "missing: features.0.weight" in line
    assert "unexpected: conv1.weight" in line


def test_a_file_without_tensors_and_a_pickled_module_get_one_line(tmp_path):
    torch.save({"epoch": 3, "state_dict": {"a": 1}}, tmp_path / "notes.pt")
    with pytest.raises(CompressError, match=r"notes\.pt holds no state dict: neither its top level nor its 'state_dict'"):
        sources.from_file(str(tmp_path / "notes.pt"), Spec("module", target=TINY), 10, [], tmp_path)
    torch.save(tiny(), tmp_path / "whole.pt")
    with pytest.raises(CompressError, match=r"save model\.state_dict\(\) instead"):
        sources.from_file(str(tmp_path / "whole.pt"), Spec("module", target=TINY), 10, [], tmp_path)


def test_model_pt_stores_the_builder_and_refuses_another_architecture(tmp_path):
    spec = Spec("module", target=TINY, kwargs={"width": 4})
    model = tiny(width=4)
    packed = checkpoints.pack(model, spec, "none", {}, num_classes=10, input_shape=(3, 16, 16))
    assert packed["builder"] == {"source": "module", "name": None, "target": TINY, "kwargs": {"width": 4}}
    torch.save(packed, tmp_path / "model.pt")
    again = sources.from_file(str(tmp_path / "model.pt"), spec, 10, [], tmp_path)
    assert checkpoints.digest(again) == checkpoints.digest(model)
    with pytest.raises(CompressError, match=r"holds a 'tests.own_nets:TinyNet' model \(kwargs \{'width': 4\}\), not "
                                            r"tests.own_nets:TinyNet$"):
        sources.from_file(str(tmp_path / "model.pt"), Spec("module", target=TINY), 10, [], tmp_path)
    with pytest.raises(CompressError, match=r"classifies 10 classes, the data set has 3"):
        sources.from_file(str(tmp_path / "model.pt"), spec, 3, [], tmp_path)


def test_model_pt_files_from_before_the_builder_spec_still_load(tmp_path):
    torch.manual_seed(0)
    model = models.build("resnet20", 10)
    old = {"format": checkpoints.FORMAT, "arch": "resnet20", "method": "none", "meta": {},
           "state_dict": model.state_dict()}  # what pack wrote before
    torch.save(old, tmp_path / "model.pt")
    assert checkpoints.digest(sources.unpack(old, "resnet20", 10)) == checkpoints.digest(model)
    saved = sources.load_saved(tmp_path / "model.pt")
    assert saved.arch == "resnet20" and saved.input_shape == (3, 32, 32)


# -- end to end ----------------------------------------------------------------------------------------------
def test_own_module_runs_prunes_resumes_and_exports(tmp_path, capsys):
    """`compress run arch=module ...` in process: l1 to half the MACs, model.pt with the builder; a second run
    starts from that model.pt; `compress export` rebuilds it from the stored spec."""
    run_dir = tmp_path / "run"
    args = [*QUICK, "arch=module", f"arch.target={TINY}", "arch.kwargs={width:8}", "arch.checkpoint=random",
            "method=l1", "method.target_macs=0.5", "schedule.epochs=1", "measure.ort_latency=false"]
    Run(compose(args), run_dir).execute()
    packed = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert packed["arch"] == TINY and packed["builder"]["kwargs"] == {"width": 8} and packed["num_classes"] == 10
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and all(f",{TINY}," in row for row in rows[1:])
    baseline, final = (dict(zip(rows[0].split(","), r.split(","))) for r in (rows[1], rows[3]))
    assert abs(int(final["macs"]) / int(baseline["macs"]) / 0.5 - 1) <= 0.01

    again = tmp_path / "again"
    Run(compose([*args[:-4], f"arch.checkpoint={run_dir / 'model.pt'}", "method=none", "schedule.epochs=0",
                 "measure.ort_latency=false"]), again).execute()
    assert (again / "metrics.csv").read_text().splitlines()[1].split(",")[13] == final["macs"]

    export_model([str(run_dir), "--images", "8"])
    assert f"({TINY}, method l1)" in capsys.readouterr().out and (run_dir / "model.onnx").is_file()


def test_runs_started_before_the_builder_keys_existed_still_resume():
    import dataclasses

    from compress.job.ledger import fingerprint

    config = dataclasses.asdict(compose(["dataset=synthetic", "arch.checkpoint=random"]))
    before = {**config, "arch": {k: v for k, v in config["arch"].items() if k not in ("source", "target", "kwargs")}}
    assert fingerprint(config) == fingerprint(before)
    other = dataclasses.asdict(compose(["dataset=synthetic", "arch.checkpoint=random", "arch.kwargs={width:4}"]))
    assert fingerprint(other) != fingerprint(config)
