"""glibc malloc settings for a process that moves megabytes per millisecond.

By default glibc serves allocations above a (dynamic) threshold with mmap and returns
them with munmap, so every 1 MiB frame, every fetched Kafka batch and every large guest
write is a fresh mapping whose pages fault in one by one: measured here, page faults
cost more than the copies themselves (16-23 % of the receiver's, transceiver's and
applier's CPU before they used these settings too). Serving them from the heap and
keeping freed memory for reuse removes that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 * 1024 * 1024
TRIM_THRESHOLD = 512 * 1024 * 1024


def tune_malloc() -> bool:
    """Applies the settings (glibc only); False where they do not apply."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    log.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok
