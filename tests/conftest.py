"""Shared test helpers: where ../shared is, the `needs_shared` marker, the `threads` fixture, and running
`compress` as a user would.

Tiers: `make test` (CI) runs `pytest -m "not slow"`; `make test-full` runs everything. Mark a test
`@pytest.mark.slow` when it is a long end-to-end run (every experiment in smoke mode, the wheel build, a
sweep over real data); `make test` must stay within 5 minutes on a 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see compress/__init__.py

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR = SHARED / "cifar10"
PRETRAINED = SHARED / "pretrained"
RESNET20_CHECKPOINT = PRETRAINED / "resnet20-12fca82f.th"


def shared_missing() -> str | None:
    """Why ../shared cannot serve the integration tests, or None when it can."""
    if not (CIFAR / "test").is_dir() or not (CIFAR / "train").is_dir():
        return f"needs real CIFAR-10 (train/ and test/) in {CIFAR}"
    if not RESNET20_CHECKPOINT.is_file():
        return f"needs the published CIFAR ResNet checkpoints in {PRETRAINED}"
    return None


# The one marker for tests that need ../shared (real CIFAR-10 and the published checkpoints):
# `@needs_shared`. It is the `shared` marker (so `-m "not shared"` deselects them); the skip, with its
# reason, is added in one place below.
needs_shared = pytest.mark.shared


def pytest_collection_modifyitems(config, items):
    reason = shared_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("shared") is not None:
            item.add_marker(skip)


@pytest.fixture
def threads():
    """Torch intra-op threads pinned to 1 for the test (and restored after): results that depend on the
    order of floating-point reductions are then the same on every machine, and tests running beside
    other work on a small machine do not oversubscribe its cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


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
