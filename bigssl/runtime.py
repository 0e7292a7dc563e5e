"""Process-level settings that make CPU tensor work fast.

glibc serves every allocation above its mmap threshold (128 KiB at start, adapting up to 32 MiB)
with a fresh mapping and gives freed heap tops back to the OS, so a new activation or image
batch pays page faults and kernel zeroing, often more than the op that fills it: on these
machines a 2 MB out-of-place add costs ~0.5 ms against ~0.02 ms in place. Keeping freed memory
in the heap makes the batched photometric ops ~1.6× faster (tools/bench_views.py) and helps
every CPU forward and backward. The cost is that the process keeps its peak heap, as PyTorch's
CUDA caching allocator does for device memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's malloc.h
_tuned = False


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed memory instead of returning it; True if applied. No-op on other
    C libraries, or with BIGSSL_KEEP_FREED_MEMORY=0 (for jemalloc/tcmalloc users, say)."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("BIGSSL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    _tuned = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _tuned


def memory_gib(device) -> dict[str, float]:
    """This process's resident memory now and, on a GPU, the peak of allocated device memory."""
    values: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        values["memory/rss_gib"] = resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # no procfs (macOS)
        pass
    if getattr(device, "type", None) == "cuda":
        import torch

        values["memory/gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return values
