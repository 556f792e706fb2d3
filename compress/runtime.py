"""Process-wide CPU settings that make PyTorch's CPU work faster, applied by `compress run` at start.

PyTorch's CPU tensors come straight from the C library's malloc, which (glibc) hands every block above a
moving threshold its own mmap and gives it back on free. A batch of 128 CIFAR feature maps is 8 MB, so each
activation, copy and temporary of a forward pass page-faults its memory in again, zero-filled: measured
on this project's 2-core machine, ResNet-56's forward passes spend 10-15 % of their time there, and
scoring every layer's feature maps (CFDP, HRank) 40 %. Keeping freed memory in the process heap for reuse
is what PyTorch's own caching allocators (CUDA) and the jemalloc/tcmalloc advice of its CPU tuning guide
do; with glibc, `mallopt` does it without preloading another allocator.

Opt out with COMPRESS_MALLOC_TUNING=0 (e.g. when an allocator is already preloaded).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

import torch

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit; larger blocks still get their own mmap
TRIM_THRESHOLD = 1 << 30   # keep up to 1 GiB of freed memory at the top of the heap for reuse
TOP_PAD = 64 << 20         # grow the heap in 64 MiB steps

_applied: bool | None = None


def tune_allocator() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse. Returns True when the settings are
    in effect; False on other C libraries / platforms or with COMPRESS_MALLOC_TUNING=0. Idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("COMPRESS_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        _ = libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt takes other parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    )
    return _applied


# -- training precision on the CPU ------------------------------------------------------------------------------
# bfloat16 autocast pays on a CPU only where the instructions are native: AMX-BF16 tiles (Intel Sapphire Rapids
# and later) or AVX512-BF16 dot products (Cooper Lake, Zen 4). Elsewhere oneDNN emulates bfloat16 with float32
# arithmetic plus conversions, slower than float32 itself, so training stays float32 there.
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
# The /proc/cpuinfo flags the start log names, in this order (what decides the CPU's fast paths).
_FEATURE_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", **NATIVE_BF16_FLAGS}
_CPUINFO = "/proc/cpuinfo"


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", set()) where it cannot be read. The
    one reader of it: the training precision here and the int8 export's reduce_range both decide from it."""
    name, flags = "", set()
    try:
        with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = " ".join(value.split())
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_description() -> str:
    """The CPU's model name and the SIMD features that decide its fast paths, e.g.
    "Intel(R) Xeon(R) Processor, AVX2 AVX-512 AVX-512 VNNI AMX-BF16 AVX512-BF16"."""
    name, flags = cpu_info()
    features = " ".join(label for flag, label in _FEATURE_FLAGS.items() if flag in flags) or "no AVX2"
    return f"{name or platform.processor() or platform.machine() or 'unknown CPU'}, {features}"


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo) and PyTorch's
    oneDNN can use it."""
    _, flags = cpu_info()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS) and _onednn_bf16()


def _onednn_bf16() -> bool:
    """Whether PyTorch's oneDNN (mkldnn) runs bfloat16 kernels here (it also says yes where it emulates them,
    so this is a second condition, not the test)."""
    if not torch.backends.mkldnn.is_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else True


def training_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of training steps (schedule.amp): bfloat16 on CUDA, and on a CPU with native
    bfloat16; None (float32) when amp is off or the CPU would emulate it. Evaluation is never autocast on
    the CPU (compress.training.train.evaluate)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and native_bf16():
        return torch.bfloat16
    return None


def training_precision(device: torch.device, amp: bool) -> str:
    """The start log line: what the training steps run in, and why (the CPU's features on the CPU)."""
    dtype = training_dtype(device, amp)
    if device.type != "cpu":
        return f"training precision: {'bf16 autocast' if dtype is not None else 'float32'} ({device.type})"
    cpu = cpu_description()
    if dtype is not None:
        return f"training precision: bf16 autocast (CPU: {cpu}); evaluation float32"
    if not amp:
        return f"training precision: float32, schedule.amp=false (CPU: {cpu})"
    return (f"training precision: float32; schedule.amp left off: this CPU has no native bfloat16 "
            f"(no AMX-BF16 or AVX512-BF16; emulated bf16 is slower) (CPU: {cpu})")
