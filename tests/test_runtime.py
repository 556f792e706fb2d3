"""compress.runtime.tune_allocator: freed CPU tensors are reused instead of page-faulted in again."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt"
)

# Allocates ten 8 MB tensors (each a batch of 128 ResNet stage-1 maps; 80 MB live), frees them, 20 times
# over, and prints the page faults per tensor, after `tune_allocator()` when asked. (With fewer live bytes
# glibc's own moving thresholds sometimes keep the memory too, so the default case would not be reliable.)
PROBE = """
import resource, sys, torch
from compress.runtime import tune_allocator
applied = tune_allocator() if sys.argv[1] == "tuned" else False
x = torch.randn(128, 16, 32, 32)
for _ in range(3):
    [x * 2 for _ in range(10)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    temps = [x * 2 for _ in range(10)]
    del temps
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


def probe(mode: str, **env: str) -> tuple[bool, float]:
    # glibc's own threshold moves with the history of the heap (what importing torch freed, where small
    # objects landed), so whether its default reuses these blocks varies from run to run. The probe pins
    # it at its starting value (128 KiB, fixed) so that the untuned case is deterministic.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1])


@glibc_linux
def test_tuned_allocator_reuses_freed_tensors_without_page_faults():
    applied, tuned_faults = probe("tuned")
    _, default_faults = probe("default")
    assert applied
    # 8 MB = 2048 pages: untuned, each such tensor is faulted in afresh (2,045 per tensor here); tuned: at
    # most a few pages once (0-10 per tensor on average).
    assert default_faults > 1000
    assert tuned_faults < 50


class FakeLibc:
    """Stands in for ctypes.CDLL("libc.so.6"): records every mallopt call, answers `result`."""

    def __init__(self, result: int = 1, glibc: bool = True):
        self.calls: list[tuple[int, int]] = []
        self.result = result
        outer = self

        class Mallopt:
            argtypes = restype = None

            def __call__(self, param, value):
                outer.calls.append((param, value))
                return outer.result

        self.mallopt = Mallopt()
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.39"


@pytest.fixture
def fresh_runtime(monkeypatch):
    """compress.runtime as if `tune_allocator` had never run, with a fake libc (the real malloc of the
    test process is left alone). Yields a function installing a FakeLibc and returning it."""
    from compress import runtime

    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.delenv("COMPRESS_MALLOC_TUNING", raising=False)

    def install(**kwargs) -> FakeLibc:
        libc = FakeLibc(**kwargs)
        libc.loads = []

        def cdll(name):
            libc.loads.append(name)
            return libc

        monkeypatch.setattr(runtime.ctypes, "CDLL", cdll)
        return libc

    return install


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tune_allocator only acts on Linux")
def test_tune_allocator_sets_the_three_thresholds_once(fresh_runtime):
    from compress import runtime

    libc = fresh_runtime()
    assert runtime.tune_allocator() is True
    assert libc.calls == [(-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20)]  # M_MMAP_, M_TRIM_THRESHOLD, M_TOP_PAD
    # Idempotent: later calls answer from the first one without touching malloc again.
    assert runtime.tune_allocator() is True and runtime.tune_allocator() is True
    assert len(libc.calls) == 3 and len(libc.loads) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tune_allocator only acts on Linux")
def test_tune_allocator_reports_false_when_it_cannot_apply(fresh_runtime, monkeypatch):
    from compress import runtime

    refused = fresh_runtime(result=0)  # mallopt answers 0: the setting is not in effect
    assert runtime.tune_allocator() is False
    assert runtime.tune_allocator() is False and len(refused.loads) == 1  # the failure is remembered too

    monkeypatch.setattr(runtime, "_applied", None)
    other = fresh_runtime(glibc=False)  # musl & co: their mallopt takes other parameters; never called
    assert runtime.tune_allocator() is False and other.calls == []

    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv("COMPRESS_MALLOC_TUNING", "0")
    off = fresh_runtime()
    assert runtime.tune_allocator() is False and off.loads == [] and off.calls == []
