"""What the machine charges for fresh memory, printed beside every benchmark's figures.

On the 2-core VMs these benchmarks run on, the first write to a page-cache page the
guest had not used (or had handed back to its host) costs 2-3 ms of kernel time per MB,
against 0.1-0.3 ms for a page the host still backs: every MB a part writes to a new file
(a Kafka log segment, a disk image) pays that, and the same code measures up to half
slower in the first regime (docs/benchmarks.md, 2026-12-07). Reading this figure beside
a run says which regime it ran in.
"""

from __future__ import annotations

import os
import resource
import tempfile
from pathlib import Path

MiB = 1024 * 1024


def _kernel_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _write_file(path: Path, mb: int, block: bytes, *, truncate: bool) -> float:
    """Kernel seconds to write `mb` MiB to `path` (a new file, or over its cached pages)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags, 0o600)
    try:
        start = _kernel_s()
        for _ in range(mb):
            os.write(fd, block)
        return _kernel_s() - start
    finally:
        os.close(fd)


def page_cache_cost(directory: Path | None = None, mb: int = 64) -> dict[str, float]:
    """Kernel ms per MB for writing a new file of `mb` MiB (fresh page-cache pages) and
    for writing it once more (the same pages); the file is removed afterwards."""
    block = os.urandom(MiB)
    with tempfile.TemporaryDirectory(dir=directory, prefix="dm-bench-pages-") as tmp:
        path = Path(tmp) / "probe"
        fresh = _write_file(path, mb, block, truncate=True)
        again = _write_file(path, mb, block, truncate=False)
    return {
        "fresh_page_ms_per_mb": round(fresh * 1000 / mb, 3),
        "cached_page_ms_per_mb": round(again * 1000 / mb, 3),
    }
