"""AUP: per-round rates, masks (compress.layers.masks) through training / save / restore / deepcopy, the
deployable form, sparse storage size, the options schema, and (through the CLI) a rollback under an
impossible threshold."""
from __future__ import annotations

import copy
import csv
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from torch import nn

from compress import CompressError
from compress.layers import clone, deployable
from compress.layers.masks import magnitude_mask, sparse_storage_bytes, sparse_tensor_bytes
from compress.methods.aup import AUP
from compress.methods.base import Context
from tests.conftest import compress_cli
from tests.contexts import cpu_context


def ctx() -> Context:
    return cpu_context(log=logging.getLogger("test"))


def aup(**options) -> AUP:
    return AUP(AUP.Options(**options))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def effective(module: nn.Module) -> torch.Tensor:
    return module.weight_orig * module.weight_mask


def test_magnitude_mask_removes_exactly_the_smallest_alive():
    weight = torch.tensor([0.5, -0.1, 0.3, 0.05, -0.7, 0.2, 0.0, 0.9])
    mask = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 1])  # 7 alive; the dead 0.0 must not be counted again
    new = magnitude_mask(weight * mask, mask, 0.3)  # round(0.3 * 7) = 2: -0.1 and 0.05
    assert new.tolist() == [1, 0, 1, 0, 1, 1, 0, 1]
    assert torch.equal(magnitude_mask(weight, mask, 0.01), mask)  # round(0.07) = 0: nothing


def test_each_round_removes_pr_of_each_layers_remaining_weights():
    torch.manual_seed(0)
    model, method = Tiny(), aup(pr=0.05)
    alive = {"conv": 216, "fc": 32}
    for k, scale in ((1, 1.0), (2, 1.0), (3, 0.5), (4, 1.0)):
        before = {n: effective(getattr(model, n)).detach().clone() for n in alive} if k > 1 else None
        assert method.step(model, ctx(), k, scale) is model
        for name in alive:
            alive[name] -= math.floor(0.05 * scale * alive[name] + 0.5)
            m = getattr(model, name)
            assert int(m.weight_mask.sum()) == alive[name], (k, name)
            if before is not None:  # the newly removed weights are the smallest of those that were alive
                removed = (before[name] != 0) & (m.weight_mask == 0)
                kept = m.weight_mask.bool()
                if removed.any():
                    assert before[name][removed].abs().max() <= before[name][kept].abs().min()
    assert alive == {"conv": 180, "fc": 26}  # conv 216 -> 205 -> 195 -> 190 (half step) -> 180
    assert not hasattr(model.bn, "weight_mask") and not hasattr(model.conv, "bias_mask")


def test_target_params_ends_the_rounds_at_the_target_and_resumes():
    """method.target_params: full rounds of pr while far from the target, a last round that takes only what
    is left, then None; the baseline count travels in state_dict (resume, rollback)."""
    from compress.deploy.measure import count_nonzero

    torch.manual_seed(0)
    model, method = Tiny(), aup(pr=0.2, target_params=0.6)
    baseline = count_nonzero(model)  # conv 216 + 8, BatchNorm 8 (its zero biases do not count), fc 32 + 4
    assert method.prepare(model, ctx()) is model and method.state_dict() == {"baseline_params": baseline}
    counts = [baseline]
    for k in range(1, 10):
        resumed = aup(pr=0.2, target_params=0.6)
        resumed.load_state_dict(method.state_dict())  # as a resumed run rebuilds it
        method = resumed
        if method.step(model, ctx(), k, 1.0) is None:
            break
        counts.append(count_nonzero(model))
    # 268 -> 219 (-43 conv, -6 fc: 20 % of each) -> 179 (-35, -5) -> 160 (-16, -3: exactly the 19 that
    # bring it under the target 160.8, shared by what each layer has alive); then the schedule ends
    assert baseline == 268 and counts == [268, 219, 179, 160]
    assert counts[-1] <= 0.6 * baseline < counts[-1] + 1  # the target reached, not a weight more pruned
    assert aup(target_params=0.6).state_dict() == {"baseline_params": None}


def test_the_round_that_reaches_the_target_removes_exactly_what_is_left():
    from compress.methods.aup import removal_counts

    # the ResNet-20 control run: 19 layers, 3 weights over the target; per-layer rounding removed nothing
    alive = [64, 2304] * 9 + [640]
    assert sum(removal_counts(alive, 3 / sum(alive))) == 0
    counts = removal_counts(alive, 3 / sum(alive), total=3)
    assert sum(counts) == 3 and counts == [0, 1, 0, 1, 0, 1] + [0] * 13  # the largest layers, first by index
    # shares follow what each layer has alive; largest remainder settles the rest
    assert removal_counts([138, 21], 19 / 159, total=19) == [16, 3]
    assert removal_counts([5, 0, 7], 0.5, total=100) == [5, 0, 7]  # never more than is alive
    assert removal_counts([216, 32], 0.05) == [11, 2]  # without a total: round(pr * alive) each


@pytest.mark.parametrize("value", [0, 1, 1.5, True, "half"])
def test_target_params_is_a_fraction(value):
    with pytest.raises(CompressError, match="^method.target_params: must be null or the fraction"):
        aup(target_params=value)


def test_step_returns_none_when_nothing_is_left_to_prune():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    assert aup(pr=0.1).step(model, ctx(), 1, 1.0) is None  # round(0.1 * 4) = 0


def test_masks_hold_through_optimizer_steps_and_deepcopy():
    torch.manual_seed(0)
    model = Tiny()
    aup(pr=0.5).step(model, ctx(), 1, 1.0)
    dead = model.conv.weight_mask == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).logsumexp(1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))  # forward refreshes `weight`
    assert model.conv.weight_orig.grad[dead].abs().max() == 0
    assert (model.conv.weight[dead] == 0).all() and (model.conv.weight[~dead] != 0).all()
    snapshot = copy.deepcopy(model)  # the pipeline's rollback copy
    assert torch.equal(snapshot.conv.weight_mask, model.conv.weight_mask)


def test_clone_works_after_a_training_forward_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Tiny()
    aup(pr=0.5).step(model, ctx(), 1, 1.0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # the masked `weight` is now a non-leaf tensor
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    weight = model.conv.weight
    snapshot = clone(model)
    assert model.conv.weight is weight and weight.grad_fn is not None  # not touched
    assert torch.equal(snapshot.conv.weight, weight.detach()) and snapshot.conv.weight.grad_fn is None
    assert torch.equal(snapshot.conv.weight_mask, model.conv.weight_mask)
    snapshot.conv.weight_orig.data.fill_(1.0)  # a copy, not a view
    assert not torch.equal(model.conv.weight_orig, snapshot.conv.weight_orig)


def test_masks_survive_save_and_restore():
    torch.manual_seed(0)
    model, method = Tiny(), aup(pr=0.3)
    method.step(model, ctx(), 1, 1.0)
    method.step(model, ctx(), 2, 1.0)
    saved = {"meta": method.meta(model), "state_dict": copy.deepcopy(model.state_dict())}
    assert saved["meta"] == {"pruned": ["conv", "fc"]}
    assert {"conv.weight_orig", "conv.weight_mask", "fc.weight_orig", "fc.weight_mask"} <= set(saved["state_dict"])
    fresh = AUP.restore(Tiny(), saved["meta"], saved["state_dict"])
    fresh.load_state_dict(saved["state_dict"])
    assert torch.equal(fresh.conv.weight_mask, model.conv.weight_mask)
    x = torch.randn(2, 3, 8, 8)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x))
    # the restored masks are live: training the restored model keeps the zeros
    opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
    fresh(x).sum().backward()
    opt.step()
    with torch.no_grad():
        fresh(x)
    assert (fresh.conv.weight[model.conv.weight_mask == 0] == 0).all()


def test_deployable_makes_the_zeros_permanent():
    torch.manual_seed(0)
    model, method = Tiny(), aup(pr=0.4)
    method.step(model, ctx(), 1, 1.0)
    exported = deployable(model)
    assert isinstance(exported.conv.weight, nn.Parameter) and not hasattr(exported.conv, "weight_mask")
    assert not exported.conv._forward_pre_hooks
    assert int((exported.conv.weight == 0).sum()) == int((model.conv.weight_mask == 0).sum())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(exported.eval()(x), model.eval()(x))
    assert hasattr(model.conv, "weight_mask")  # the model itself is untouched


def test_sparse_storage_size():
    values = torch.zeros(10, 100)
    values[:, :50] = 1.0  # 500 nonzero of 1000
    # 500 fp32 values + the cheaper of a bitmap (125 B) and CSR (500 one-byte columns + 11 int32 pointers)
    assert sparse_tensor_bytes(values) == 2000 + 125
    few = torch.zeros(10, 100)
    few[0, :5] = 1.0  # 5 nonzero: CSR (5 + 44 B) beats the bitmap
    assert sparse_tensor_bytes(few) == 20 + 5 + 44
    assert sparse_tensor_bytes(torch.ones(10, 100)) == 4000  # never more than dense

    torch.manual_seed(0)
    model, method = nn.Sequential(nn.Linear(100, 10)), aup(pr=0.5)
    method.step(model, ctx(), 1, 1.0)
    # weight: 500 of 1000 alive -> 2125 B; bias dense 40 B; the mask itself is not stored separately
    assert method.storage_bytes(model) == sparse_storage_bytes(model) == 2125 + 40


@pytest.mark.parametrize("options, key", [
    ({"pr": 1.5}, "method.pr"), ({"pr": 0.0}, "method.pr"), ({"pr": math.nan}, "method.pr"), ({"pr": True}, "method.pr"),
    ({"prune_layers": 3}, "method.prune_layers"), ({"prune_layers": ["a", 1]}, "method.prune_layers"),
    ({"keep_layers": {"a": 1}}, "method.keep_layers"),
])
def test_bad_options(options, key):
    with pytest.raises(CompressError, match=key):
        AUP.Options(**options)


def test_layer_choice():
    with pytest.raises(CompressError, match="method.prune_layers"):
        aup(prune_layers="nothing*").step(Tiny(), ctx(), 1, 1.0)
    model = Tiny()
    aup(keep_layers=["fc"]).step(model, ctx(), 1, 1.0)
    assert hasattr(model.conv, "weight_mask") and not hasattr(model.fc, "weight_mask")
    model = Tiny()
    aup(prune_layers="fc", keep_layers="conv*").step(model, ctx(), 1, 1.0)
    assert hasattr(model.fc, "weight_mask") and not hasattr(model.conv, "weight_mask")


def test_options_schema_and_capabilities():
    schema = OmegaConf.structured(AUP.Options)
    assert OmegaConf.to_object(schema) == AUP.Options() == AUP().options
    assert AUP.Options() == AUP.Options(name="aup", pr=0.05, prune_layers="*", keep_layers=[])
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"pr": "abc"})
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"threshold": 0.5})
    assert OmegaConf.to_object(OmegaConf.merge(schema, {"keep_layers": ["conv1", "fc"]})).keep_layers == ["conv1", "fc"]
    # AUP only works in rounds, and changes nothing before round 1 (the compressed row is the baseline's)
    assert AUP.requires_rounds and AUP.iterative and not AUP.one_shot and not AUP.changes_model


# -- end to end through the CLI (needs the typed-config pipeline) ---------------------------------------
def test_unknown_option_is_one_line(tmp_path):
    proc = compress_cli("run", "debug=smoke", "method=aup", "schedule.rounds=1", "method.threshold=0.5",
                        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "method.threshold" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


def test_a_final_row_without_fine_tune_reports_the_accepted_model_not_the_rolled_back_one(tmp_path):
    """schedule.epochs=0 and the last round rolled back: the final row repeats the last *accepted* model's
    numbers (the model saved), not the thrown-away candidate's."""
    from compress.job.compose import compose
    from compress.job.pipeline import Run

    run_dir = tmp_path / "run"
    Run(compose(["debug=smoke", "method=aup", "arch=resnet20", "schedule.rounds=1", "schedule.epochs=0",
                 "schedule.min_top1=100", "threads=1", "measure.latency=false", f"paths.cache={tmp_path / 'cache'}"]),
        run_dir).execute()
    rows = {r["stage"]: r for r in csv.DictReader((run_dir / "metrics.csv").open())}
    assert rows["round_1"]["status"] == "rolled_back"
    assert int(rows["round_1"]["params_nonzero"]) < int(rows["compressed"]["params_nonzero"])
    for key in ("top1", "val_top1", "params_nonzero", "size_bytes"):
        assert rows["final"][key] == rows["compressed"][key], key
    assert rows["final"]["rounds_accepted"] == "0" and rows["final"]["rounds_rolled_back"] == "1"


def test_impossible_threshold_rolls_the_round_back(tmp_path):
    run_dir = tmp_path / "run"
    # smoke: synthetic data, random weights, 2 batches per epoch; no accuracy reaches 100 %
    proc = compress_cli("run", "debug=smoke", "method=aup", "arch=resnet20", "schedule.rounds=2",
                        "schedule.min_top1=100", "schedule.on_rollback=stop", "threads=1",
                        f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=300,
                        env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    stages = [(r["stage"], r["status"]) for r in rows]
    assert stages == [("baseline", ""), ("compressed", ""), ("round_1", "rolled_back"), ("final", "")]
    # the rolled-back round was measured pruned (5 % of ~270k weights fewer) ...
    assert int(rows[1]["params_nonzero"]) - int(rows[2]["params_nonzero"]) > 0.04 * 270_000
    # ... and the saved model is the accepted, unpruned one: no masks, no zeroed weights
    packed = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.endswith("_mask") for k in packed["state_dict"])
    weights = [v for k, v in packed["state_dict"].items() if k.endswith("weight") and v.dim() > 1]
    assert sum(int((w == 0).sum()) for w in weights) == 0
