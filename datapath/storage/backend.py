"""The storage backend interface: what the tap, the applier, full sync and verification
need from a disk, whatever holds it (sparse file, block device, NBD export)."""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

# Zeros are written in chunks of one shared buffer, never as one huge allocation.
ZERO_CHUNK = 1 << 20


@functools.cache
def zero_chunk() -> memoryview:
    """A read-only 1 MiB view of zeros, allocated on first use."""
    return memoryview(bytes(ZERO_CHUNK))


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the disk: `zero` means it reads as zeros (a hole); otherwise it holds data
    (which may itself happen to be zeros)."""

    offset: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


class StorageError(OSError):
    """A storage operation failed or was refused; the message names the disk and the
    operation. `errno` is set when the cause was a system or NBD error."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        operation: str | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.operation = operation
        # Set after construction: OSError's own (errno, strerror) form would reformat it.
        self.errno = errno


def as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat unsigned-byte view, so len() is the byte count whatever the caller passed."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def merge_extents(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join adjacent runs of the same kind and drop empty ones, so the result alternates
    data and zero extents."""
    pending: Extent | None = None
    for extent in extents:
        if extent.length <= 0:
            continue
        if pending is None:
            pending = extent
        elif pending.zero == extent.zero and pending.end == extent.offset:
            pending = Extent(pending.offset, pending.length + extent.length, pending.zero)
        else:
            yield pending
            pending = extent
    if pending is not None:
        yield pending


class StorageBackend(abc.ABC):
    """One disk. Synchronous: callers that must not block run it in a thread.

    Offsets and lengths are bytes; any range outside the disk raises StorageError.
    `can_multi_conn` is True when writes through one handle are visible to reads
    through any other handle on the same disk (safe for parallel workers).
    """

    name: str
    readonly: bool = False
    can_trim: bool = True
    can_zero: bool = True
    can_multi_conn: bool = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._closed = False

    # --- required by every backend -------------------------------------------------

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Bytes."""

    @abc.abstractmethod
    def _read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def _write(self, offset: int, data: memoryview) -> None:
        """data is a flat view of unsigned bytes."""

    @abc.abstractmethod
    def _write_zeroes(self, offset: int, length: int, punch_hole: bool) -> None: ...

    @abc.abstractmethod
    def _trim(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def _flush(self) -> None: ...

    @abc.abstractmethod
    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Runs covering [offset, offset+length); they need not be merged."""

    @abc.abstractmethod
    def allocated_bytes(self) -> int:
        """Bytes the disk really occupies (st_blocks*512 for a file)."""

    @abc.abstractmethod
    def _close(self) -> None: ...

    # --- public API: checks, then the backend's work ----------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check("read", offset, length)
        if length == 0:
            return b""
        return self._read(offset, length)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` (writable, buf.nbytes bytes) from `offset`."""
        view = as_bytes_view(buf)
        self._check("read", offset, len(view))
        if view.readonly:
            raise self.error("read", "the destination buffer is read-only")
        if len(view):
            self._readinto(offset, view)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        # Backends with a zero-copy path override this.
        buf[:] = self._read(offset, len(buf))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = as_bytes_view(data)
        self._check("write", offset, len(view), writes=True)
        if len(view):
            self._write(offset, view)

    def write_zeroes(self, offset: int, length: int, *, punch_hole: bool = True) -> None:
        """Make the range read as zeros. punch_hole=True deallocates it where the storage
        can (keeps thin disks thin); False allocates real zeros (NBD's NO_HOLE)."""
        self._check("write_zeroes", offset, length, writes=True)
        if length:
            self._write_zeroes(offset, length, punch_hole)

    def trim(self, offset: int, length: int) -> None:
        """Discard the range. Unlike a bare NBD/SCSI discard, it reads as zeros afterwards
        on every backend, so source and target stay equal."""
        self._check("trim", offset, length, writes=True)
        if length:
            self._trim(offset, length)

    def flush(self) -> None:
        """Make every completed write durable."""
        self._check_open("flush")
        if not self.readonly:
            self._flush()

    def allocated_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Extents tiling [offset, offset+length) exactly, merged, alternating data and
        zero runs. length=None means to the end of the disk."""
        if length is None:
            self._check_open("allocated_extents")
            length = self.size - offset
        self._check("allocated_extents", offset, length)
        if length == 0:
            return iter(())
        return merge_extents(self._extents(offset, length))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- helpers for implementations ---------------------------------------------------

    def error(self, operation: str, detail: str, *, errno: int | None = None) -> StorageError:
        return StorageError(
            f"{operation} on {self.name}: {detail}",
            path=self.name,
            operation=operation,
            errno=errno,
        )

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise self.error(operation, "the backend is closed")

    def _check(self, operation: str, offset: int, length: int, *, writes: bool = False) -> None:
        self._check_open(operation)
        if writes and self.readonly:
            raise self.error(operation, "the disk is open read-only")
        size = self.size
        if offset < 0 or length < 0 or offset + length > size:
            raise self.error(
                operation,
                f"range offset={offset} length={length} is outside the disk (size {size})",
            )

    def _write_zeros_by_data(self, offset: int, length: int) -> None:
        """Zero a range by writing zeros, 1 MiB at a time (for storage that cannot
        zero or deallocate by itself)."""
        zeros = zero_chunk()
        end = offset + length
        while offset < end:
            step = min(ZERO_CHUNK, end - offset)
            self._write(offset, zeros[:step])
            offset += step
