"""Shared test helpers: where ../shared is, the `needs_shared` marker, the `threads` fixture, and running
`compress` as a user would.

Tiers: `make test` (CI) runs `pytest -m "not slow" -n 2` (pytest-xdist, one worker a core); `make test-full`
runs everything. Mark a test `@pytest.mark.slow` when it is a long end-to-end run (every experiment in smoke
mode, the wheel build, a sweep over real data); `make test` must stay within 5 minutes on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
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


def pytest_configure(config):
    # One intra-op thread for the whole session (the `threads` fixture below pins it for a test that needs
    # it whatever ran before): results that depend on the order of floating-point reductions are then the
    # same on every machine, and the suite beside other work on a small machine does not oversubscribe it.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    reason = shared_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("shared") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _drop_stale_log_handlers():
    """Hydra's logging set-up (a run through `cli.main()` in process) attaches a StreamHandler to the
    sys.stderr of that moment, which is pytest's capture of one test; a later test in the same worker would
    then log into a closed file and find "--- Logging error ---" in its stderr. Drop such handlers after each
    test (pytest's own capture handlers it removes itself)."""
    yield
    import logging

    for logger in (logging.getLogger(), logging.getLogger("compress")):
        for handler in list(logger.handlers):
            if (type(handler) is logging.StreamHandler
                    and getattr(handler, "stream", None) not in (sys.__stderr__, sys.__stdout__)):
                logger.removeHandler(handler)


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


def interrupt_after_first_epoch(args: list[str], run_dir: Path, timeout: float = 300) -> str:
    """Start `compress run ARGS`, SIGTERM it (as a user's ^C or kill would) once a fine-tune has saved an
    epoch into run_dir/state.pt; assert the clean interrupted exit (130) and return its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "run", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True)
        except Exception:  # not written yet (writes are atomic, so nothing else is expected)
            state = {}
        if state.get("train") and state["train"]["fit"]["epoch"] >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    return err


MEMORY_LIMIT = 6 << 30  # bytes of address space for a `compress` process under test (RLIMIT_AS)


def limit_memory() -> None:
    """preexec_fn: cap the child's address space, so that unbounded memory is a MemoryError, not a swap storm."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


# The real entry point, `compress.cli.main()`, called in a loop in one process with `Run.execute` stubbed
# out: parsing, composition, the typed config's checks, building the method and Run's own checks are the
# real code; the stages (data, model, training) are not run. One request per line on stdin (a JSON argv
# list), one JSON answer per line on stdout: exit code, stderr, stdout, the traceback of an escaped exception.
_IN_PROCESS_CLI = r'''
import io, json, sys, traceback
from pathlib import Path

out = sys.stdout
sys.stdout = io.StringIO()
import compress.cli as cli
import compress.job.pipeline as pipeline
from hydra.core.global_hydra import GlobalHydra

pipeline.Run.execute = lambda self: self.run_dir
work = Path(sys.argv[1])
for n, line in enumerate(sys.stdin):
    argv = json.loads(line)
    if argv and argv[0] == "run" and not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={work / str(n)}")
    GlobalHydra.instance().clear()
    err, sys.stderr, sys.stdout = sys.stderr, io.StringIO(), io.StringIO()
    sys.argv = ["compress", *argv]
    code, tb = 0, ""
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code, tb = -1, traceback.format_exc()
    captured, printed, sys.stderr, sys.stdout = sys.stderr.getvalue(), sys.stdout.getvalue(), err, io.StringIO()
    out.write(json.dumps({"code": code, "stderr": captured[:100000], "stdout": printed[:100000],
                          "traceback": tb[-4000:]}) + "\n")
    out.flush()
'''


class InProcessCLI:
    """`compress <argv>` answered by one long-lived, memory-capped process (see above): ~0.2 s a call
    instead of ~3 s of imports. A call that takes longer than `timeout` or kills the process (memory) is
    answered with code "timeout" / "died (...)", and the next call starts a fresh process."""

    def __init__(self, work: Path, timeout: float = 30.0):
        self.work, self.timeout = work, timeout
        self.proc: subprocess.Popen | None = None
        self.buffer, self.fresh = b"", False

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _IN_PROCESS_CLI, str(self.work)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     preexec_fn=limit_memory, env={**os.environ, "PYTHONPATH": str(REPO)})
        self.buffer, self.fresh = b"", True

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, argv: list[str]) -> dict:
        """{"code": exit status (or "timeout" / "died (...)"), "stderr", "stdout", "traceback", "seconds"}"""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        started = time.monotonic()
        budget = self.timeout + (60.0 if self.fresh else 0.0)  # a fresh process first imports torch and hydra
        self.fresh = False
        try:
            self.proc.stdin.write((json.dumps(argv) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, budget - (time.monotonic() - started)))
            if not ready:
                self.stop()
                return {"code": "timeout", "stderr": "", "traceback": f"no answer within {self.timeout:.0f} s"}
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.proc.wait()
                self.proc = None
                return {"code": f"died ({code})", "stderr": "", "traceback": "the process died (memory limit?)"}
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return {**json.loads(line), "seconds": time.monotonic() - started}


@pytest.fixture(scope="session")
def cli_in_process(tmp_path_factory):
    """An `InProcessCLI` for checks that end before the stages (config errors, Run's own checks)."""
    runner = InProcessCLI(tmp_path_factory.mktemp("cli_in_process"))
    yield runner
    runner.stop()


@pytest.fixture
def quick_args(tmp_path: Path) -> list[str]:
    """A fast run on the synthetic data set: random weights (pretraining 0 epochs, cached in tmp)."""
    return ["dataset=synthetic", "arch=resnet20", "method=none", "arch.checkpoint=null", "pretrain.epochs=0", f"paths.cache={tmp_path / 'cache'}",
            "measure.latency=false", "schedule.batch_size=64", "threads=1"]


# ---- helpers shared by the test modules ------------------------------------------------------------------
def metrics_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.csv as dicts of strings, in file order."""
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def noise_calibration(shape: tuple[int, ...] = (3, 32, 32), per_request: bool = False):
    """A `Context.calibration` of Gaussian-noise image batches, the same on every call: seeded with 0, or
    (`per_request`) with the batch count and size asked for, so two requests of one size agree."""
    def calibration(batches: int, batch_size: int, augment: bool = False):
        g = torch.Generator().manual_seed(batches * 1000 + batch_size if per_request else 0)
        return iter([torch.randn(batch_size, *shape, generator=g) for _ in range(batches)])

    return calibration
