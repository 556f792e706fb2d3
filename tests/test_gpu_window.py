"""scripts/gpu_window.sh: its row sequence, run on this CPU in smoke mode (GPU_WINDOW_SMOKE=1), writes every
row's metrics and the half-precision GoogLeNet checkpoint into $OUT (slow: four smoke runs, about 4 minutes)."""
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_window_smoke_writes_every_row(tmp_path):
    env = dict(os.environ, GPU_WINDOW_SMOKE="1", OUT=str(tmp_path / "out"), GPU_WINDOW_DIR=str(tmp_path / "w"))
    done = subprocess.run(["bash", "scripts/gpu_window.sh", "run", "900"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for row in ("googlenet_pretrain", "cfdp_googlenet", "scap_vgg16", "cfdp_vgg16"):
        assert f"{row}: exit 0" in summary, summary
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        names = tar.getnames()
    for row in ("googlenet_pretrain", "cfdp_googlenet", "scap_vgg16", "cfdp_vgg16"):
        assert f"./{row}/metrics.csv" in names, names
    (weights,) = (tmp_path / "out").glob("googlenet-cifar10-*.pt")
    packed = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in packed["state_dict"].values() if v.is_floating_point())


def test_gpu_window_usage_is_one_line_and_exit_2():
    done = subprocess.run(["bash", "scripts/gpu_window.sh", "bogus"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "usage" in done.stderr
