"""An Export over a datapath storage backend (sparse file, block device, NBD).

Reads and writes run inline on the event loop: the backend is synchronous, and a
page-cache pwrite costs less than handing it to a thread. Flushes (fsync) can take
milliseconds, so they run in a worker thread unless told otherwise.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

from vib.nbd import protocol as p
from vib.nbd.export import Buffer

if TYPE_CHECKING:
    from datapath.storage.backend import StorageBackend

# Extents reported per block status request; the client asks again for the rest.
_MAX_EXTENTS = 1 << 16
_HOLE = p.STATE_HOLE | p.STATE_ZERO


class StorageExport:
    """Serves one StorageBackend under an export name."""

    can_flush = True
    can_fua = True
    can_cache = False
    supports_block_status = True

    def __init__(
        self,
        name: str,
        backend: StorageBackend,
        *,
        description: str = "",
        read_only: bool = False,
        flush_in_thread: bool = True,
    ) -> None:
        self.name = name
        self.description = description
        self._backend = backend
        self.read_only = bool(read_only) or backend.readonly
        self.can_trim = backend.can_trim
        self.can_zero = backend.can_zero
        self.can_multi_conn = backend.can_multi_conn
        self._flush_in_thread = flush_in_thread

    @property
    def size(self) -> int:
        return self._backend.size

    async def read(self, offset: int, length: int) -> Buffer:
        return self._backend.read(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._backend.write(offset, data)
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        self._backend.write_zeroes(offset, length, punch_hole=may_trim)
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._backend.trim(offset, length)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self._flush_in_thread:
            await asyncio.to_thread(self._backend.flush)
        else:
            self._backend.flush()

    async def cache(self, offset: int, length: int) -> None:
        return None

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return backend_block_status(self._backend, offset, length)


def backend_block_status(
    backend: StorageBackend, offset: int, length: int
) -> list[tuple[int, int]]:
    """NBD base:allocation runs (length, flags) of a storage backend's range, at most
    _MAX_EXTENTS of them (the client asks again for the rest)."""
    extents = backend.allocated_extents(offset, length)
    return [
        (extent.length, _HOLE if extent.zero else 0)
        for extent in itertools.islice(extents, _MAX_EXTENTS)
    ]
