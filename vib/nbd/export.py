"""What the NBD server needs from a disk it exports, and how a failure is reported.

The server does all protocol checks (bounds, flags, read-only, advertised features)
before it calls an export, so an implementation only does the I/O. Methods are
coroutines; one that finishes without awaiting is run inline by the server, with no
task per request, which is what keeps small random I/O fast.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol

from vib.nbd import protocol as p

Buffer = bytes | bytearray | memoryview

# An export's optional fast path for runs of plain writes, an attribute `write_run`:
# `write_run(buf, pos, end, replies, max_length)` takes the complete NBD_CMD_WRITE
# requests without flags that follow one another from buf[pos] (before `end`), each of
# at most `max_length` bytes and inside the export, for as long as it can complete them
# at once; it appends their simple replies to `replies` and returns (the position of the
# first request it left to the server, the writes it did, their bytes). The server
# handles the request it stopped at as any other.
WriteRun = Callable[[bytearray, int, int, bytearray, int], tuple[int, int, int]]


class Export(Protocol):
    """One disk served over NBD. Sizes and offsets are bytes."""

    # Read-only properties, so plain attributes and computed properties both fit.
    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def size(self) -> int:
        """Bytes; read once per connection, when the client picks the export."""

    @property
    def read_only(self) -> bool: ...
    @property
    def can_trim(self) -> bool: ...
    @property
    def can_zero(self) -> bool: ...
    @property
    def can_flush(self) -> bool: ...
    @property
    def can_fua(self) -> bool: ...
    @property
    def can_multi_conn(self) -> bool:
        """Writes and flushes through one connection are seen by all the others."""

    @property
    def can_cache(self) -> bool: ...
    @property
    def supports_block_status(self) -> bool:
        """Offer the base:allocation metadata context (holes and zeros)."""

    async def read(self, offset: int, length: int) -> Buffer:
        """Exactly `length` bytes."""

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        """`data` belongs to the export once called (the server keeps no reference)."""

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        """Make the range read as zeros; `may_trim` False means keep it allocated."""

    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    async def flush(self) -> None:
        """Every write completed before this call is durable when it returns."""

    async def cache(self, offset: int, length: int) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs from `offset`, flags in base:allocation terms
        (protocol.STATE_HOLE, protocol.STATE_ZERO). May cover less than asked."""


class ExportError(Exception):
    """An export operation failed with a POSIX errno; the server turns it into the
    matching NBD error value and sends `message` (if any) to structured-reply clients."""

    def __init__(self, error: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(error, str(error)))
        self.errno = error
        self.message = message


# errno -> NBD error value. The spec fixes the values; anything else is an I/O error.
_NBD_ERRORS: dict[int, int] = {
    errno.EPERM: p.NBD_EPERM,
    errno.EROFS: p.NBD_EPERM,
    errno.EACCES: p.NBD_EPERM,
    errno.EIO: p.NBD_EIO,
    errno.ENOMEM: p.NBD_ENOMEM,
    errno.EINVAL: p.NBD_EINVAL,
    errno.ENOSPC: p.NBD_ENOSPC,
    errno.EDQUOT: p.NBD_ENOSPC,
    errno.EFBIG: p.NBD_ENOSPC,
    errno.EOVERFLOW: p.NBD_EOVERFLOW,
    errno.ENOTSUP: p.NBD_ENOTSUP,
    errno.EOPNOTSUPP: p.NBD_ENOTSUP,
    errno.ESHUTDOWN: p.NBD_ESHUTDOWN,
}


def nbd_error_for(error: int | None) -> int:
    """The NBD error value for a POSIX errno (EIO when unknown or missing)."""
    if error is None:
        return p.NBD_EIO
    return _NBD_ERRORS.get(error, p.NBD_EIO)
