"""The search for the largest reduction within a top-1 drop (compress/job/search.py, configs/hparams_search/,
docs/search.md): the objective on hand-made metrics rows, the Hydra callback that hands it to the sweeper,
the presets' composition and the CLI's checks, and one short search end to end."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from compress import CompressError
from compress.job.search import OFFSET, SEARCH_CSV, SearchObjective, evaluate, objective, read_rows
from tests.conftest import REPO, compress_cli

PRESETS = sorted(p.stem for p in (REPO / "configs" / "hparams_search").glob("*.yaml"))


def rows(baseline_top1: float, final_top1: float, reduction: float = 50.0, *, params_reduction: float = 40.0,
         column: str = "val_top1", as_text: bool = False) -> list[dict]:
    """A run's metrics.csv rows: baseline, compressed, final (numbers, or text as csv.DictReader gives them)."""
    other = "top1" if column == "val_top1" else "val_top1"
    made = [
        {"stage": "baseline", column: baseline_top1, other: 0.0, "macs_reduction_pct": 0.0, "params_reduction_pct": 0.0},
        {"stage": "compressed", column: 10.0, other: 0.0, "macs_reduction_pct": reduction,
         "params_reduction_pct": params_reduction},
        {"stage": "final", column: final_top1, other: 0.0, "macs_reduction_pct": reduction,
         "params_reduction_pct": params_reduction},
    ]
    return [{k: str(v) for k, v in r.items()} for r in made] if as_text else made


# -- the objective ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("as_text", [False, True])
def test_within_the_drop_the_value_is_the_reduction(as_text):
    assert objective(rows(92.0, 91.5, 63.2, as_text=as_text), max_drop=1.0) == pytest.approx(63.2)
    result = evaluate(rows(92.0, 91.5, 63.2, as_text=as_text), max_drop=1.0)
    assert result.admissible and result.drop == pytest.approx(0.5)
    assert (result.baseline_top1, result.final_top1, result.reduction) == (92.0, 91.5, 63.2)


def test_a_drop_of_exactly_max_drop_or_a_gain_is_admissible():
    assert evaluate(rows(93.5, 92.5), max_drop=1.0).admissible  # 93.5 - 92.5 == 1.0 despite float error
    assert evaluate(rows(93.39, 92.39), max_drop=1.0).admissible
    gain = evaluate(rows(90.0, 91.0, 20.0), max_drop=0.0)
    assert gain.admissible and gain.drop == pytest.approx(-1.0) and gain.value == 20.0


def test_over_the_drop_is_penalised_by_the_excess():
    result = evaluate(rows(92.0, 89.0, 80.0), max_drop=1.0, penalty=10.0)  # excess 2 points
    assert not result.admissible
    assert result.value == pytest.approx(80.0 - OFFSET - 10.0 * 2.0)
    assert result.value < -100
    # a smaller excess scores higher: the sampler learns which way the admissible region lies
    assert objective(rows(92.0, 90.5, 80.0), max_drop=1.0) > result.value
    # ... and so does a larger reduction at the same excess
    assert objective(rows(92.0, 89.0, 85.0), max_drop=1.0) > result.value


@settings(max_examples=200, deadline=None)
@given(admissible_reduction=st.floats(-99.0, 100.0), penalised_reduction=st.floats(-99.0, 100.0),
       baseline=st.floats(0.0, 100.0), drop_ok=st.floats(0.0, 1.0), excess=st.floats(1e-3, 100.0),
       max_drop=st.floats(0.0, 5.0), penalty=st.floats(0.01, 1000.0))
def test_every_penalised_value_is_below_every_admissible_one(admissible_reduction, penalised_reduction, baseline,
                                                             drop_ok, excess, max_drop, penalty):
    ok = objective(rows(baseline, baseline - drop_ok * max_drop, admissible_reduction), max_drop=max_drop,
                   penalty=penalty)
    over = objective(rows(baseline, baseline - max_drop - excess, penalised_reduction), max_drop=max_drop,
                     penalty=penalty)
    assert ok == pytest.approx(admissible_reduction)
    assert over < ok


def test_metric_and_accuracy_choose_the_columns():
    made = rows(70.0, 69.0, 55.0, params_reduction=33.0, column="top1")
    assert objective(made, max_drop=1.0, metric="params_reduction_pct", accuracy="top1") == 33.0
    # judged on val_top1 (0 before, 0 after in these rows), the same run is within any drop
    assert evaluate(made, max_drop=0.0, accuracy="val_top1").admissible
    assert not evaluate(made, max_drop=0.5, accuracy="top1").admissible


def test_the_last_baseline_and_final_rows_count():
    made = rows(80.0, 10.0, 90.0) + rows(80.0, 79.5, 45.0)  # a resumed run that appended a second attempt
    assert objective(made, max_drop=1.0) == 45.0


@pytest.mark.parametrize("broken, message", [
    (lambda r: r[:2], "no final row"),
    (lambda r: r[1:], "no baseline row"),
    (lambda r: [*r[:2], {**r[2], "val_top1": "nan"}], "final row has no val_top1"),
    (lambda r: [*r[:2], {**r[2], "macs_reduction_pct": ""}], "final row has no macs_reduction_pct"),
])
def test_an_unfinished_or_unmeasured_run_is_an_error(broken, message):
    with pytest.raises(CompressError, match=message):
        objective(broken(rows(90.0, 89.0, as_text=True)), max_drop=1.0)


@pytest.mark.parametrize("options, key", [
    ({"max_drop": -1.0}, "max_drop"), ({"max_drop": math.nan}, "max_drop"), ({"max_drop": True}, "max_drop"),
    ({"metric": "top1"}, "metric"), ({"accuracy": "top5"}, "accuracy"), ({"penalty": 0}, "penalty"),
])
def test_settings_are_checked(options, key):
    with pytest.raises(CompressError, match=rf"hydra\.callbacks\.search\.{key}: must be"):
        objective(rows(90.0, 89.0), **{"max_drop": 1.0, **options})
    with pytest.raises(CompressError, match=key):
        SearchObjective(**options)


# -- the callback ----------------------------------------------------------------------------------------
def finished_job(run_dir: Path, made: list[dict] | None, num: int, overrides: list[str]):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True)
    if made is not None:
        with open(run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(made[0]))
            writer.writeheader()
            writer.writerows(made)
    hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}, "job": {"num": num}}})
    job = JobReturn(overrides=overrides, hydra_cfg=hydra_cfg, status=JobStatus.COMPLETED)
    job.return_value = None  # what compress run's task function returns
    return job


def test_callback_hands_the_sweeper_the_objective_and_writes_search_csv(tmp_path):
    from hydra.core.utils import JobStatus
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    callback = SearchObjective(max_drop=1.0)
    callback.on_multirun_start(OmegaConf.create({"hydra": {"overrides": {"task": ["method=l1"]}}}))
    jobs = [finished_job(sweep / "0_l1", rows(90.0, 89.5, 30.0), 0, ["method.target_macs=0.7", "method=l1"]),
            finished_job(sweep / "1_l1", rows(90.0, 85.0, 70.0), 1, ["method.target_macs=0.3", "method=l1"]),
            finished_job(sweep / "2_l1", rows(90.0, 90.0, 45.0), 2, ["method.target_macs=0.55", "method=l1"])]
    for job in jobs:
        callback.on_job_end(None, job)
    assert [job.return_value for job in jobs] == [30.0, pytest.approx(70.0 - OFFSET - 10.0 * 4.0), 45.0]
    assert all(job.status == JobStatus.COMPLETED for job in jobs)

    callback.on_multirun_end(None)
    table = list(csv.DictReader(open(sweep / SEARCH_CSV)))
    assert [t["run_dir"] for t in table] == [str(sweep / n) for n in ("2_l1", "0_l1", "1_l1")]  # best first
    assert [t["params"] for t in table] == ["method.target_macs=0.55", "method.target_macs=0.7",
                                           "method.target_macs=0.3"]
    assert [t["admissible"] for t in table] == ["True", "True", "False"]
    assert float(table[0]["value"]) == 45.0 and float(table[2]["drop"]) == pytest.approx(5.0)


def test_callback_fails_a_trial_without_metrics_and_leaves_failed_jobs_alone(tmp_path):
    from hydra.core.utils import JobStatus

    callback = SearchObjective()
    job = finished_job(tmp_path / "0", None, 0, [])
    callback.on_job_end(None, job)
    assert job.status == JobStatus.FAILED  # the sweeper counts it against hydra.sweeper.max_failure_rate
    with pytest.raises(CompressError, match="metrics.csv: no such file"):
        _ = job.return_value

    failed = finished_job(tmp_path / "1", rows(90.0, 89.0), 1, [])
    failed.status, failed.return_value = JobStatus.FAILED, RuntimeError("boom")
    callback.on_job_end(None, failed)
    assert failed._return_value.args == ("boom",)
    callback.on_multirun_end(None)  # no finished trial: nothing to write
    assert not (tmp_path / SEARCH_CSV).exists()


def test_read_rows(tmp_path):
    made = rows(90.0, 89.0, 25.0, as_text=True)
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(made[0]))
        writer.writeheader()
        writer.writerows(made)
    assert read_rows(tmp_path / "metrics.csv") == made
    with pytest.raises(CompressError, match="no such file"):
        read_rows(tmp_path / "missing.csv")


# -- the presets -----------------------------------------------------------------------------------------
def test_presets_exist():
    assert {"reduction_within_drop", "params_within_drop", "rate_within_drop"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_into_an_optuna_search_of_a_checked_objective(preset):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from compress.config import to_config
    from compress.job.compose import register_configs

    register_configs()
    with initialize_config_module(config_module="compress.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hparams_search={preset}", "method=l1"],
                      return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
        assert sweeper.n_trials > 0 and sweeper.n_jobs == 1
        search = OmegaConf.to_container(cfg.hydra.callbacks.search)
        assert search.pop("_target_") == "compress.job.search.SearchObjective"
        SearchObjective(**search)  # the preset's settings pass the checks
        assert len(sweeper.params) == 1
        for key, spec in sweeper.params.items():  # each searched key exists for a structured method
            assert key.startswith("method.") and spec.startswith("interval(")
            low, high = (float(v) for v in spec[len("interval("):-1].split(","))
            for value in (low, high):
                to_config(compose(config_name="config", overrides=["method=l1", f"{key}={value}"]))
        # the task config itself is the default run's: a search adds only hydra settings
        plain = compose(config_name="config", overrides=["method=l1"])
        assert OmegaConf.to_container(compose(config_name="config", overrides=[f"hparams_search={preset}",
                                                                               "method=l1"])) == \
            OmegaConf.to_container(plain)


def test_a_preset_documents_its_usage():
    for preset in PRESETS:
        text = (REPO / "configs" / "hparams_search" / f"{preset}.yaml").read_text()
        assert f"hparams_search={preset}" in text and text.startswith("# @package _global_")


# -- the CLI's checks (before any trial) ------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["hparams_search=reduction_within_drop", "method=l1"], "hparams_search: a search is a multirun (a run per trial): use `compress run -m"),
    (["-m", "hparams_search=reduction_withn_drop", "method=l1"], "hparams_search: no option 'reduction_withn_drop' (did you mean: reduction_within_drop"),
    (["-m", "hparams_search=reduction_within_drop", "method=l1", "hydra.callbacks.search.max_drop=-1"],
     "hydra.callbacks.search.max_drop: must be a number of top-1 points in [0, 100], got -1"),
    (["-m", "hparams_search=reduction_within_drop", "method=l1", "hydra.callbacks.search.metric=top1"],
     "hydra.callbacks.search.metric: must be one of macs_reduction_pct, params_reduction_pct"),
    (["-m", "hparams_search=reduction_within_drop", "method=aup"],
     "hydra.sweeper.params: method.target_macs=interval(0.2, 0.95): method.target_macs: unknown config option"),
])
def test_cli_checks_a_search_before_it_starts(cli_in_process, argv, message):
    answer = cli_in_process.run(["run", *argv])
    assert answer["code"] == 2, answer
    assert answer["stderr"].startswith(f"error: {message}"), answer["stderr"]
    assert answer["stderr"].count("\n") == 1


# -- end to end ------------------------------------------------------------------------------------------
@pytest.mark.slow  # two trials through the CLI, ~15 s: make test-full
def test_search_end_to_end(tmp_path):
    """Two smoke trials of l1 on a random ResNet-20: each its own run directory with metrics.csv, the sweep
    directory with the sweeper's optimization_results.yaml and search.csv; the best value is the best trial's
    objective."""
    sweep = tmp_path / "sweep"
    compress_cli("run", "-m", "hparams_search=reduction_within_drop", "debug=smoke", "method=l1",
                 "method.compress_rate=0.3", "arch=resnet20", "threads=1", f"paths.cache={tmp_path / 'cache'}",
                 f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", "hydra.callbacks.search.max_drop=5",
                 timeout=300, env={"OMP_NUM_THREADS": "1"}, check=True)
    trials = sorted(p.parent for p in sweep.glob("*/metrics.csv"))
    assert [t.name for t in trials] == ["0_l1_resnet20", "1_l1_resnet20"]
    values = [objective(read_rows(t / "metrics.csv"), max_drop=5.0) for t in trials]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"method.target_macs"}
    assert 0.2 <= results["best_params"]["method.target_macs"] <= 0.95
    assert results["best_value"] == pytest.approx(max(values))
    table = list(csv.DictReader(open(sweep / SEARCH_CSV)))
    assert [float(t["value"]) for t in table] == pytest.approx(sorted(values, reverse=True))
    assert all(t["params"].startswith("method.target_macs=") for t in table)
    for trial in trials:  # the metrics rows say which target made them
        final = [r for r in read_rows(trial / "metrics.csv") if r["stage"] == "final"][-1]
        assert "method.target_macs=" in final["overrides"] and "hparams_search=reduction_within_drop" in final["overrides"]
