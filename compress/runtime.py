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
import sys

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
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt takes other parameters
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(
        mallopt(param, value) == 1
        for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    )
    return _applied
