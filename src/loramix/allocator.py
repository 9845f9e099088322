"""Keep freed CPU memory inside the process, so large short-lived tensors stop page-faulting.

glibc's malloc serves big blocks with ``mmap`` and hands freed memory back to the kernel (``munmap`` and
heap trimming). A MixLoRA layer creates and frees several (token x expert-slot, intermediate) tensors per
forward and backward -- 6 MiB each at batch 4 x 128 with top-2 on SmolLM2 -- so every one of them is
mapped fresh and page-faulted in again, page by page. Raising the mmap and trim thresholds makes freed
blocks stay in the heap for the next tensor (docs/benchmarks.md; ``python -m bench.run_bench --no-tune-malloc``
measures the whole model without it).

It is the in-process form of PyTorch's CPU tuning advice (use an allocator that caches, e.g. jemalloc
through ``LD_PRELOAD``). The setting is process-wide and affects every later allocation; peak memory is
unchanged (freed blocks are reused), but the process keeps its high-water mark until ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 2**20  # blocks below this come from the heap (glibc accepts up to HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30  # give memory back only when this much is free at the top of the heap
ENV_SWITCH = "LORAMIX_TUNE_MALLOC"  # "0" leaves the allocator alone

_tuned: bool | None = None  # None: not tried yet


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are in effect.

    A no-op (False) off Linux/glibc or when ``LORAMIX_TUNE_MALLOC=0``. Later calls return the first result.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get(ENV_SWITCH, "1") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok_mmap = mallopt(M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1))) == 1
    ok_trim = mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1))) == 1
    _tuned = ok_mmap and ok_trim
    logger.debug("malloc tuning: mmap threshold %s, trim threshold %s", ok_mmap, ok_trim)
    return _tuned


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has put the thresholds in effect in this process."""
    return bool(_tuned)
