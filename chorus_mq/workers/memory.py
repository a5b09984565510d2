"""Process-wide allocator tuning for aggregation.

Aggregating a module allocates and frees the same few 1-30 MB temporaries (float64 factor
copies, Grams' inputs, residual factors). glibc returns such blocks to the kernel (an
unmapped chunk, a trimmed heap top) and the next module faults every page in again; on
llama-3.2-3b shapes that is a fifth of an svd round. Keeping freed memory for reuse costs
nothing but RSS that stays at its peak, which the worker reaches every round anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit; bigger blocks are always mapped
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 512 * 2**20

_lock = threading.Lock()
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MB (and up to 512 MB of free heap top) for reuse.

    Idempotent; returns whether the tuning is in effect (False on a libc without ``mallopt``).
    """
    global _applied
    with _lock:
        if _applied is None:
            _applied = _mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and _mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        return _applied


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(param, value) == 1)
