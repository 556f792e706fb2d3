"""`method=torch_pruning`: Torch-Pruning's own pruner and importances as a peer of the structured methods
(compress/methods/torch_pruning.py, docs/torch-pruning.md). Random-init models, CPU, one thread."""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from compress import CompressError, models
from compress.deploy.measure import count_macs, count_params
from compress.job import checkpoints
from compress.methods import METHODS
from compress.methods.torch_pruning import IMPORTANCES, TOLERANCE, TorchPruning, TorchPruningOptions
from compress.models.cifar_resnet import ShortcutA
from tests.conftest import compress_cli, noise_calibration
from tests.contexts import cpu_context

pytestmark = pytest.mark.usefixtures("threads")

SHAPE = (3, 32, 32)


calibration = noise_calibration(SHAPE, per_request=True)


def context(arch: str):
    return cpu_context(arch, num_classes=10, size=SHAPE[1], calibration=calibration)


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return models.build(arch, 10).eval()


def prune(arch: str, **options) -> tuple[nn.Module, nn.Module, TorchPruning]:
    """(the model before, the model after, the method)."""
    model = build(arch)
    before = copy.deepcopy(model)
    method = TorchPruning(TorchPruningOptions(**options))
    out = method.compress(model, context(arch))
    assert out is model  # TP prunes in place
    return before, model.eval(), method


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def test_registered_with_the_structured_keys():
    assert METHODS["torch_pruning"] is TorchPruning
    opts = TorchPruningOptions()
    assert opts.name == "torch_pruning" and opts.importance == "group_l1"
    for key in ("target_macs", "target_params", "allocation", "min_keep"):  # the structured methods' defaults
        assert getattr(opts, key) == getattr(METHODS["l1"].Options(), key)
    assert TorchPruning.one_shot and not TorchPruning.iterative and TorchPruning.changes_model


# -- targets ----------------------------------------------------------------------------------------------
# uniform bisects over ~30 measured copies (~5 s each arch): make test-full; global stays in make test
@pytest.mark.parametrize("arch, allocation", [
    ("resnet56", "global"), ("vgg16_bn", "global"),
    pytest.param("resnet56", "uniform", marks=pytest.mark.slow), pytest.param("vgg16_bn", "uniform", marks=pytest.mark.slow),
])
def test_group_l1_lands_within_one_percent_of_the_macs_target(arch, allocation):
    before, model, method = prune(arch, target_macs=0.47, allocation=allocation)
    kept = count_macs(model, SHAPE) / count_macs(before, SHAPE)
    assert abs(kept / 0.47 - 1) <= TOLERANCE, kept
    assert method.result["kept"] == pytest.approx(kept)
    # fewer channels, the classifier's outputs untouched, and the pruned model runs
    old, new = widths(before), widths(model)
    assert all(new[n] <= old[n] for n in old) and sum(new.values()) < sum(old.values())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1].out_features == 10
    with torch.no_grad():
        out = model(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if allocation == "uniform":  # one ratio: every group of the same width keeps the same, give or take a channel
        by_width: dict[int, set[int]] = {}
        for n in old:
            by_width.setdefault(old[n], set()).add(new[n])
        assert all(max(s) - min(s) <= 1 for s in by_width.values()), by_width


@pytest.mark.parametrize("importance", IMPORTANCES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_every_importance_meets_a_params_target(importance, allocation):
    before, model, method = prune("resnet20", importance=importance, allocation=allocation, target_params=0.6,
                                  batches=2, batch_size=8)
    kept = count_params(model) / count_params(before)
    assert abs(kept / 0.6 - 1) <= TOLERANCE, kept
    assert method.result["metric"] == "params"
    assert all(p.grad is None for p in model.parameters())  # group_taylor's gradients are not left behind


@pytest.mark.parametrize("allocation, target, adjusted", [("uniform", 0.12, "narrowed"), ("global", 0.62, "spared")])
def test_the_channel_granularity_is_worked_around(allocation, target, adjusted):
    """Where no single ratio lands within 1 % (resnet20, seed 0, at these targets): uniform narrows some
    groups by one channel more, global keeps the expensive channel at which the budget crosses the target."""
    before, model, method = prune("resnet20", target_macs=target, allocation=allocation)
    kept = count_macs(model, SHAPE) / count_macs(before, SHAPE)
    assert abs(kept / target - 1) <= TOLERANCE / 2, kept
    assert method.result[adjusted] > 0, f"this case no longer needs the {adjusted} path: pick another target"


def test_group_taylor_needs_calibration_data():
    model = build("resnet20")
    method = TorchPruning(TorchPruningOptions(importance="group_taylor", target_macs=0.5))
    with pytest.raises(CompressError, match="calibration data"):
        method.compress(model, cpu_context("resnet20", num_classes=10, size=SHAPE[1]))


def test_global_allocation_honours_min_keep():
    before, model, _ = prune("resnet20", target_macs=0.15, allocation="global", min_keep=0.25)
    old, new = widths(before), widths(model)
    assert all(new[n] >= math.ceil(0.25 * old[n]) for n in old), {n: (old[n], new[n]) for n in old}
    assert any(new[n] < old[n] // 2 for n in old)  # global: some groups far below the average


def test_unreachable_target_names_the_key():
    with pytest.raises(CompressError, match=r"^method\.target_macs: 0\.05 of the baseline's macs is out of reach: .*min_keep=0\.5.* they are 0\.\d+ of it$"):
        prune("resnet20", target_macs=0.05, min_keep=0.5)


def test_compress_rate_is_torch_prunings_pruning_ratio():
    before, model, _ = prune("resnet20", compress_rate=0.25)
    old, new = widths(before), widths(model)
    assert all(new[n] == int(old[n] * 0.75) for n in old), (old, new)


# -- model.pt ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, allocation", [
    ("resnet56", "global"), pytest.param("vgg16_bn", "uniform", marks=pytest.mark.slow)])
def test_meta_and_restore_rebuild_the_pruned_model(arch, allocation):
    _, model, method = prune(arch, target_macs=0.47, allocation=allocation)
    assert any(isinstance(m, ShortcutA) for m in model.modules()) == arch.startswith("resnet")
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    saved = through_bytes(checkpoints.pack(model, arch, method.name, method.meta(model)))
    fresh = models.build(arch, 10)
    fresh = METHODS[saved["method"]].restore(fresh, saved["meta"], saved["state_dict"])
    checkpoints.load_into(fresh, saved["state_dict"], "model.pt")  # strict
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert count_macs(fresh, SHAPE) == count_macs(model, SHAPE)


# -- options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    (dict(importance="fpgm"), "importance"),
    (dict(compress_rate="paper"), "compress_rate"),
    (dict(compress_rate={"layer1.*": 0.5}), "compress_rate"),
    (dict(compress_rate="[0.]+[0.18]*29"), "compress_rate"),
    (dict(compress_rate=1.5), "compress_rate"),
    (dict(threshold=0.5), "threshold"),
    (dict(target_macs=1.0), "target_macs"),
    (dict(target_params=0.0), "target_params"),
    (dict(target_macs=0.5, target_params=0.5), "target_params"),
    (dict(allocation="layerwise"), "allocation"),
    (dict(min_keep=0.0), "min_keep"),
    (dict(batches=0), "batches"),
    (dict(batch_size=True), "batch_size"),
    (dict(round_to=0), "round_to"),
    (dict(target_macs=0.5, allocation="global", round_to=8), "round_to"),
])
def test_bad_options_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(CompressError) as info:
        dataclasses.replace(TorchPruningOptions(), **override)
    message = str(info.value)
    assert message.startswith(f"method.{key}: ") and "\n" not in message, message


def test_rounds_are_refused_with_one_line(cli_in_process, tmp_path, quick_args):
    result = cli_in_process.run(["run", *quick_args, "method=torch_pruning", "schedule.rounds=2",
                                 f"hydra.run.dir={tmp_path / 'r'}"])
    assert result["code"] == 2, result
    line, = result["stderr"].strip().splitlines()
    assert line.startswith("error: schedule.rounds: ") and "torch_pruning" in line


# -- end to end -------------------------------------------------------------------------------------------
@pytest.mark.slow  # a CLI process, ~15 s: make test-full
def test_smoke_run_through_the_cli_writes_the_rows_and_a_reloadable_model(tmp_path):
    run_dir = tmp_path / "run"
    common = ["threads=1", "measure.latency=false", f"paths.cache={tmp_path / 'cache'}"]
    compress_cli("run", "debug=smoke", "arch=resnet20", "method=torch_pruning", "method.target_macs=0.5", *common,
                 f"hydra.run.dir={run_dir}", check=True, timeout=300, env={"OMP_NUM_THREADS": "1"})
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["baseline", "compressed", "final"]
    assert all(r["method"] == "torch_pruning" for r in rows)
    kept = int(rows[1]["macs"]) / int(rows[0]["macs"])
    assert abs(kept / 0.5 - 1) <= TOLERANCE, kept
    assert rows[2]["macs"] == rows[1]["macs"] and int(rows[2]["params"]) < int(rows[0]["params"])

    again = tmp_path / "again"
    compress_cli("run", "debug=smoke", "arch=resnet20", "method=none", f"arch.checkpoint={run_dir / 'model.pt'}",
                 "schedule.epochs=0", *common, f"hydra.run.dir={again}", check=True, timeout=300,
                 env={"OMP_NUM_THREADS": "1"})
    with (again / "metrics.csv").open() as f:
        reloaded = list(csv.DictReader(f))
    assert (reloaded[0]["params"], reloaded[0]["macs"]) == (rows[2]["params"], rows[2]["macs"])


def test_round_to_keeps_uniform_widths_multiples_of_it():
    before, model, _ = prune("resnet20", target_macs=0.5, allocation="uniform", round_to=8)
    new = widths(model)
    assert all(w % 8 == 0 for w in new.values()) and sum(new.values()) < sum(widths(before).values())
    assert count_macs(model, SHAPE) / count_macs(before, SHAPE) == pytest.approx(0.5, abs=0.05)
