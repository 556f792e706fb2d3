"""The typed configuration, the pieces the pipeline is made of (ledger, iterative schedule, LR schedule),
and the library-based measurements (MACs, latency)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from compress import CompressError, models
from compress.config import LimitsConfig, ScheduleConfig
from compress.deploy import measure
from compress.job.compose import compose
from compress.job.ledger import RunLedger, fingerprint
from compress.job.rounds import IterativeSchedule
from compress.training.train import make_scheduler


# -- composition and checks -------------------------------------------------------------------------------
def test_default_job_composes_to_typed_config():
    config = compose([])
    assert (config.arch.name, config.method.name, config.dataset.name) == ("resnet56", "cfdp", "cifar10")
    assert config.method.compress_rate == "paper"  # one default, in the options dataclass
    assert config.schedule.epochs == 1 and config.pretrain.epochs == 200 and config.pretrain.milestones == [100, 150]
    from compress.methods.cfdp import CFDPOptions

    assert type(config.method) is CFDPOptions and dataclasses.is_dataclass(config.method)  # typed, not a dict


@pytest.mark.parametrize("override, key", [
    ("seed=-1", "seed"), ("threads=-2", "threads"), ("threads=0", "threads"), ("device=gpu", "device"),
    ("schedule.lr=0", "schedule.lr"), ("schedule.momentum=1.5", "schedule.momentum"),
    ("schedule.scheduler=linear", "schedule.scheduler"), ("dataset.val_size=0", "dataset.val_size"),
    ("measure.latency_repeats=0", "measure.latency_repeats"), ("pretrain.batch_size=0", "pretrain.batch_size"),
    ("schedule.min_top1=101", "schedule.min_top1"), ("seed=99999999999999999999", "seed"),
])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(CompressError) as e:
        compose([override])
    assert str(e.value).startswith(f"{key}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["schedule.epochs=abc", "schedule.epochs=true", "schedule.lr=true",
                                      "measure.latency=maybe", "schedule.nosuchkey=1"])
def test_wrong_types_and_unknown_keys_fail_at_composition(override):
    from hydra.errors import HydraException

    with pytest.raises((HydraException, CompressError)):
        compose([override])


@pytest.mark.parametrize("override, message", [
    ("+foo=1", "foo: unknown config option"),
    ("+schedule.epoch=3", "schedule.epoch: unknown config option (did you mean: schedule.epochs?)"),
    ("+method.harmonic=3", "method.harmonic: unknown config option"),
])
def test_a_key_added_with_plus_that_no_schema_has_is_refused(override, message):
    # Hydra adds it; OmegaConf.to_object would drop it and the run would silently use the default.
    with pytest.raises(CompressError) as e:
        compose(["method=l1", override])
    assert str(e.value) == message


def test_smoke_preset_caps_every_schedule_and_keeps_one_shot_runs_one_shot():
    one_shot = compose(["debug=smoke"])
    assert one_shot.dataset.name == "synthetic" and one_shot.arch.checkpoint == "random"
    assert one_shot.schedule.rounds == 0 and one_shot.schedule.epochs == 1 and one_shot.schedule.max_batches == 2
    fgfp = compose(["experiment=fgfp_resnet20", "debug=smoke"])
    assert (fgfp.schedule.rounds, fgfp.schedule.epochs, fgfp.schedule.prepare_epochs, fgfp.schedule.batch_size) == (2, 1, 0, 16)
    assert fgfp.limits.quick and not fgfp.measure.latency


def test_limits_never_raise_a_value():
    limits = LimitsConfig(epochs=3, rounds=5, batches=10, batch_size=64)
    capped = limits.schedule(ScheduleConfig(epochs=1, rounds=0, batch_size=16, max_batches=4))
    assert (capped.epochs, capped.rounds, capped.batch_size, capped.max_batches) == (1, 0, 16, 4)


# -- the LR schedule: SequentialLR gives the hand-written warm-up schedule's values ----------------------------
def _old_lambda(sched: ScheduleConfig, steps_per_epoch: int):
    """The schedule as the project computed it before (one LambdaLR), as an oracle."""
    total = max(1, sched.epochs * steps_per_epoch)
    warm = sched.warmup_epochs * steps_per_epoch
    if sched.scheduler == "constant":
        main = lambda step: 1.0  # noqa: E731
    elif sched.scheduler == "cosine":
        main = lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))  # noqa: E731
    else:
        milestones = [m * steps_per_epoch for m in sched.milestones]
        main = lambda step: sched.gamma ** sum(step >= m for m in milestones)  # noqa: E731
    return lambda step: (0.1 + 0.9 * step / warm) if step < warm else main(step)


@pytest.mark.parametrize("kind, warmup, milestones", [("cosine", 0, []), ("cosine", 2, []), ("constant", 1, []),
                                                      ("multistep", 0, [3, 5]), ("multistep", 2, [3, 5])])
def test_scheduler_matches_the_hand_written_schedule(kind, warmup, milestones):
    sched = ScheduleConfig(epochs=6, lr=0.1, scheduler=kind, warmup_epochs=warmup, milestones=milestones, gamma=0.1)
    steps = 4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=sched.lr)
    scheduler = make_scheduler(opt, sched, steps)
    oracle = _old_lambda(sched, steps)
    for step in range(sched.epochs * steps):
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr * oracle(step), rel=1e-6, abs=1e-12), step
        opt.step()
        scheduler.step()


# -- the iterative schedule's decisions ---------------------------------------------------------------------------
def test_threshold_is_the_stricter_bound_and_rollback_policy():
    s = ScheduleConfig(rounds=5, min_top1=90.0, max_drop=1.5, on_rollback="shrink", shrink_factor=0.5, max_rollbacks=2)
    plan = IterativeSchedule.from_config(s, baseline_val_top1=93.0)
    assert plan.threshold == 91.5 and plan.accepts(91.5) and not plan.accepts(91.49)
    first = plan.after_rollback(0, 1.0)
    assert (first.rollbacks, first.step_scale, first.over) == (1, 0.5, False)
    third = plan.after_rollback(2, 0.25)
    assert third.over and third.step_scale == 0.25
    # the method says a smaller step means nothing for what was rolled back: the scale stays, and it is no
    # retry, so even past max_rollbacks the schedule goes on (FGFP's failed conversions)
    kept = plan.after_rollback(0, 1.0, shrink=False)
    assert (kept.rollbacks, kept.step_scale, kept.over) == (0, 1.0, False)
    assert not plan.after_rollback(2, 0.25, shrink=False).over
    stop = IterativeSchedule.from_config(dataclasses.replace(s, on_rollback="stop"), 93.0).after_rollback(0, 1.0)
    assert stop.over
    assert IterativeSchedule.from_config(ScheduleConfig(rounds=3), 93.0).accepts(0.0)


# -- the ledger -----------------------------------------------------------------------------------------------------
def _row(stage):
    return {"run_id": "r", "stage": stage, "top1": 1.0, "val_top1": 1.0, "params": 1, "params_nonzero": 1, "macs": 1e6}


def test_ledger_refuses_an_occupied_dir_and_resumes_without_duplicates(tmp_path):
    ledger = RunLedger.open(tmp_path, resume=False, config_fingerprint="abc", run_id="r")
    ledger.record(_row("baseline"), {"state_dict": {}}, {})
    ledger.record(_row("compressed"), {"state_dict": {}}, {"x": 1})
    with pytest.raises(CompressError, match="already holds a run"):
        RunLedger.open(tmp_path, resume=False, config_fingerprint="abc", run_id="r")
    with pytest.raises(CompressError, match="config differs"):
        RunLedger.open(tmp_path, resume=True, config_fingerprint="other", run_id="r")
    (tmp_path / "metrics.csv").write_text((tmp_path / "metrics.csv").read_text() + "garbage,row\n")
    again = RunLedger.open(tmp_path, resume=True, config_fingerprint="abc", run_id="r2")
    assert [r["stage"] for r in again.rows] == ["baseline", "compressed"] and again.run_id == "r"
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3  # header + the two recorded rows
    assert again.done("compressed") and not again.done("final") and again.method_state == {"x": 1}


def test_fingerprint_ignores_where_and_how_fast():
    a = {"seed": 0, "threads": 1, "resume": False, "run_id": "x"}
    assert fingerprint(a) == fingerprint({**a, "threads": 2, "resume": True, "run_id": "y"})
    assert fingerprint(a) != fingerprint({**a, "seed": 1})


# -- measurements from the libraries -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, macs", [("resnet20", 40_551_040), ("resnet56", 125_485_696)])
def test_macs_of_the_cifar_resnets(arch, macs):
    assert measure.count_macs(models.build(arch, 10), (3, 32, 32)) == macs


def test_macs_see_functional_calls():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.w, padding=1).flatten(1) @ torch.ones(8 * 16 * 16, 5)

    assert measure.count_macs(Functional(), (3, 16, 16)) == 8 * 16 * 16 * 27 + 8 * 16 * 16 * 5


def test_latency_gives_median_and_spread():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    median, iqr = measure.latency_ms(model, (3, 16, 16), batch=2, repeats=5, threads=1)
    assert median > 0 and iqr >= 0 and iqr < 100 * median


def test_interleaved_timing_gives_the_speed_up_over_the_first_call(monkeypatch):
    """Paired blocks: each repeat times call 0, then call 1, and the speed-up is the median of the ratios
    within a repeat, so a slow spell that hits both calls of one repeat cancels out. A clock that slows down
    3x in the middle repeat (the machine is shared) still reads exactly 4x; the per-call medians are the
    medians of the blocks. The timer is replaced: this checks the arithmetic, not this machine's speed."""
    seconds = {"slow": 0.004, "fast": 0.001}
    load = iter([1, 1, 3, 3, 1, 1, 1, 1, 1, 1])  # per timed block, in the order they run (after warm-up)

    class Timer:
        def __init__(self, stmt, globals, num_threads):
            self.kind, self.calls = globals["call"](), 0

        def timeit(self, number):
            self.calls += 1  # the first two: warm-up and the single call that sizes the blocks
            factor = 1 if self.calls <= 2 else next(load)
            return type("Measurement", (), {"median": seconds[self.kind] * factor})()

    monkeypatch.setattr(measure, "_benchmark", lambda: type("benchmark", (), {"Timer": Timer}))
    timed = measure.interleaved_ms([lambda: "slow", lambda: "fast"], repeats=5, threads=1, block_s=0.02)
    assert timed.speedup == [1.0, pytest.approx(4.0)]
    assert timed.median_ms == [pytest.approx(4.0), pytest.approx(1.0)]


def test_rows_time_the_speed_up_against_the_baseline_in_pytorch_and_onnx_runtime(tmp_path, quick_args, threads):
    from compress.job.compose import compose
    from compress.job.pipeline import Run
    from tests.test_pipeline import rows

    pytest.importorskip("onnxruntime")
    run_dir = tmp_path / "run"
    args = [a for a in quick_args if a != "measure.latency=false"] + [
        "dataset.image_size=8", "method=l1", "method.compress_rate=0.5", "schedule.epochs=0", "measure.latency_repeats=3"]
    Run(compose(args), run_dir).execute()
    baseline, compressed = rows(run_dir)[:2]
    assert baseline["speedup_b1"] == baseline["speedup_b64"] == baseline["ort_speedup_b1"] == "1.0"
    for column in ("latency_ms_b1", "latency_ms_b64", "speedup_b1", "speedup_b64", "ort_latency_ms_b1", "ort_speedup_b1"):
        assert 0 < float(compressed[column]) < 1e4, column


def test_onnx_runtime_latency_without_onnxruntime_names_the_key(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(CompressError, match=r"^measure.ort_latency: needs onnxruntime, not installed"):
        compose(["dataset=synthetic", "arch.checkpoint=null"])
    assert not compose(["dataset=synthetic", "arch.checkpoint=null", "measure.ort_latency=false"]).measure.ort_latency


def test_a_misspelt_experiment_is_refused_not_replaced_by_the_default_job(tmp_path):
    from tests.conftest import compress_cli

    proc = compress_cli("run", "experiment=approxconv_resnet20_cos_33", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("error: experiment: no option 'approxconv_resnet20_cos_33'") and "cos_3332" in line


def test_nested_lists_for_a_number_list_name_the_key():
    with pytest.raises(CompressError, match=r"^arch\.mean: must be three finite numbers"):
        compose(["arch.mean=[[1,[2,[3]]],[],{a:1}]"])


def test_an_override_that_does_not_parse_is_named(tmp_path):
    from tests.conftest import compress_cli

    proc = compress_cli("run", "seed=1", "dataset.name=[", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    line, = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("error: dataset.name: cannot parse")
