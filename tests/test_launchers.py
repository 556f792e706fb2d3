"""Sweeps past one process: the joblib launcher runs a sweep's runs in parallel processes (each with its
own thread count), and the SLURM launcher config composes for submitit."""
from __future__ import annotations

import csv
import re
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import compress_cli

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


@pytest.mark.slow  # ~20 s: two worker processes importing torch
def test_a_parallel_sweep_runs_each_job_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    result = compress_cli(
        "run", "-m", "hydra/launcher=parallel", "dataset=synthetic", "arch=resnet20", "method=l1",
        "method.compress_rate=0.5", "arch.checkpoint=null", "pretrain.epochs=0", f"paths.cache={tmp_path / 'cache'}",
        "measure.latency=false", "schedule.epochs=1", "schedule.max_batches=2", "threads=1", "seed=0,1",
        f"hydra.sweep.dir={sweep}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.csv"))
    assert [p.name for p in runs] == ["0_l1_resnet20", "1_l1_resnet20"]
    finals = []
    for run in runs:
        with (run / "metrics.csv").open() as f:
            table = list(csv.DictReader(f))
        assert [r["stage"] for r in table] == ["baseline", "compressed", "final"] and (run / "model.pt").is_file()
        finals.append(table[-1])
    assert [r["seed"] for r in finals] == ["0", "1"]
    assert finals[0]["params"] == finals[1]["params"] == "68050"  # both pruned at rate 0.5
    assert finals[0]["top1"] != finals[1]["top1"] or finals[0]["loss"] != finals[1]["loss"]  # two seeds, two runs
    # Hydra's basic launcher runs a sweep's jobs one after the other in its own process; here each run's log
    # spans the other's: they ran at the same time, so in two processes.
    spans = [_log_span(run / "compress.log") for run in runs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans


def _log_span(log: Path) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f")
              for m in re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", log.read_text(), re.M)]
    assert len(stamps) >= 2, log
    return stamps[0], stamps[-1]


def test_a_parallel_sweep_without_a_thread_count_is_refused(cli_in_process, tmp_path):
    answer = cli_in_process.run(["run", "-m", "hydra/launcher=parallel", "dataset=synthetic", "seed=0,1",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert answer["code"] == 2 and answer["stderr"].startswith("error: threads: hydra/launcher=parallel runs several")
    assert not (tmp_path / "sweep").exists()


def test_the_slurm_launcher_config_composes_for_submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    from compress.job.compose import register_configs

    register_configs()
    with initialize_config_module(config_module="compress.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
