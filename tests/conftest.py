"""Shared test helpers: where ../shared is, and running `compress` as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see compress/__init__.py

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "cifar10"
PRETRAINED = SHARED / "pretrained"

needs_shared = pytest.mark.skipif(not (CIFAR / "test").is_dir() or not PRETRAINED.is_dir(),
                                  reason=f"needs real CIFAR-10 and pretrained weights in {SHARED}")


def compress_cli(*args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None, check: bool = False
                 ) -> subprocess.CompletedProcess:
    """Run the installed console script's code path (`python -m compress.cli`) in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "compress.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"compress {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def quick_args(tmp_path: Path) -> list[str]:
    """A fast run on the synthetic data set: random weights (pretraining 0 epochs, cached in tmp)."""
    return ["dataset=synthetic", "arch=resnet20", "method=none", "arch.checkpoint=null", "pretrain.epochs=0", f"paths.cache={tmp_path / 'cache'}",
            "measure.latency=false", "schedule.batch_size=64", "threads=1"]
