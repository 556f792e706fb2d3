"""Data-parallel runs under torchrun on the CPU (gloo): two processes give the rows one process gives for the
same global batch, rank 0 alone writes, and a run stopped in one process resumes data-parallel."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from compress.training import distributed
from tests.conftest import REPO, interrupt_after_first_epoch, metrics_rows

ARGS = ["dataset=synthetic", "arch=resnet20", "method=l1", "method.compress_rate=0.5", "arch.checkpoint=null",
        "pretrain.epochs=0", "measure.latency=false", "schedule.epochs=2", "schedule.max_batches=4", "threads=1"]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "compress", "run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})


rows = metrics_rows


def test_two_processes_give_one_process_rows_for_the_same_global_batch(tmp_path):
    from compress.job.compose import compose
    from compress.job.pipeline import Run

    cache = f"paths.cache={tmp_path / 'cache'}"
    Run(compose([*ARGS, cache]), tmp_path / "one").execute()
    two = torchrun(*ARGS, cache, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one_rows, two_rows = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["stage"] for r in two_rows] == ["baseline", "compressed", "final"]  # rank 0 alone wrote them
    for a, b in zip(one_rows[:2], two_rows[:2]):  # before training: the same numbers
        assert (a["top1"], a["loss"], a["params"], a["macs"]) == (b["top1"], b["loss"], b["params"], b["macs"])
    # after 2 epochs on sharded batches (BatchNorm sees half a batch per rank): the same within noise
    assert two_rows[2]["params"] == one_rows[2]["params"]
    assert abs(float(two_rows[2]["loss"]) - float(one_rows[2]["loss"])) < 0.02 * float(one_rows[2]["loss"])
    logged = (tmp_path / "two" / "compress.log").read_text()
    assert logged.count("final epoch 2/2") == 1 and "(from train)" in logged  # rank 0's log only
    packed = torch.load(tmp_path / "two" / "model.pt", map_location="cpu", weights_only=True)
    assert packed["state_dict"]["conv1.weight"].shape[0] == 8


@pytest.mark.slow
def test_a_run_stopped_in_one_process_resumes_data_parallel(tmp_path):
    cache = f"paths.cache={tmp_path / 'cache'}"
    run_dir = tmp_path / "run"
    args = [*ARGS, "schedule.epochs=3", "schedule.max_batches=20", cache, f"hydra.run.dir={run_dir}"]
    interrupt_after_first_epoch(args, run_dir)
    assert [r["stage"] for r in rows(run_dir)] == ["baseline", "compressed"]
    resumed = torchrun(*args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["stage"] for r in rows(run_dir)] == ["baseline", "compressed", "final"]  # no row twice
    logged = (run_dir / "compress.log").read_text()
    assert "final: resuming after epoch" in logged and "final epoch 1/3" not in logged.split("resuming")[-1]


def test_data_parallel_runs_name_their_run_dir_and_are_not_sweeps(tmp_path, monkeypatch, capsys):
    from compress import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, message in ((["dataset=synthetic"], "hydra.run.dir: a data-parallel run (torchrun) needs the run dir"),
                          (["-m", "seed=0,1", f"hydra.run.dir={tmp_path}"], "-m: a data-parallel run (torchrun) is one run")):
        with pytest.raises(SystemExit) as e:
            cli._data_parallel_argv(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_rank_takes_every_nth_image_of_the_global_batch(monkeypatch):
    x, y = torch.arange(10).float().view(5, 2), torch.arange(5)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(x, y)[1].tolist() == [1, 3]
    assert distributed.shard(x[:1], y[:1])[1].tolist() == [0]  # fewer images than ranks: every rank steps
