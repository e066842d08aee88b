"""A disk that is a block device (/dev/sdX, /dev/vgN/lv, /dev/loopN, ...)."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from datapath.storage.backend import Extent
from datapath.storage.fd import FdBackend
from datapath.storage.linux import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    UNSUPPORTED_ERRNOS,
    fallocate,
)

# <linux/fs.h>
BLKSSZGET = 0x1268  # _IO(0x12, 104): logical sector size, int
BLKDISCARD = 0x1277  # _IO(0x12, 119): uint64[2] {start, length}
BLKZEROOUT = 0x127F  # _IO(0x12, 127): uint64[2] {start, length}
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): size in bytes, uint64

_RANGE = struct.Struct("=QQ")


def is_block_device(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


class BlockDeviceBackend(FdBackend):
    """A block device. It cannot tell which blocks are allocated, so its extents are one
    data extent covering the device and allocated_bytes() is its size.

    Zeroing and trimming go through the kernel's zero-out (fallocate on the device, then
    the BLKZEROOUT ioctl): a device that can unmap does so, and the range reads as zeros
    afterwards on every device. Plain BLKDISCARD is available as discard() for callers
    that know their device returns zeros after a discard; it promises nothing about what
    a later read returns, so trim() does not use it.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        super().__init__(os.fspath(path))
        self.path = Path(path)
        self.readonly = readonly
        self._open_fd(self.path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            if not stat.S_ISBLK(os.fstat(self._fd).st_mode):
                raise self.error("open", "not a block device")
            self._size = self._ioctl_u64(BLKGETSIZE64)
            self.sector_size = self._ioctl_int(BLKSSZGET)
        except BaseException:
            self._abandon_open()
            raise

    def _ioctl_u64(self, request: int) -> int:
        try:
            raw = fcntl.ioctl(self._fd, request, bytes(8))
        except OSError as exc:
            raise self.error(
                "open", f"ioctl {request:#x}: {exc.strerror}", errno=exc.errno
            ) from exc
        value: int = struct.unpack("=Q", raw)[0]
        return value

    def _ioctl_int(self, request: int) -> int:
        try:
            raw = fcntl.ioctl(self._fd, request, bytes(4))
        except OSError as exc:
            raise self.error(
                "open", f"ioctl {request:#x}: {exc.strerror}", errno=exc.errno
            ) from exc
        value: int = struct.unpack("=i", raw)[0]
        return value

    @property
    def size(self) -> int:
        return self._size

    # --- I/O -----------------------------------------------------------------------------

    def _write_zeroes(self, offset: int, length: int, punch_hole: bool) -> None:
        self._zero_out(offset, length, unmap=punch_hole, operation="write_zeroes")

    def _trim(self, offset: int, length: int) -> None:
        self._zero_out(offset, length, unmap=True, operation="trim")

    def discard(self, offset: int, length: int) -> None:
        """BLKDISCARD: the device may deallocate the range; what it reads afterwards is
        up to the device. Sector-aligned ranges only."""
        self._check("discard", offset, length, writes=True)
        if offset % self.sector_size or length % self.sector_size:
            raise self.error(
                "discard",
                f"offset={offset} length={length} not aligned to {self.sector_size}-byte sectors",
            )
        if length:
            self._range_ioctl(BLKDISCARD, offset, length, "discard")

    def _zero_out(self, offset: int, length: int, *, unmap: bool, operation: str) -> None:
        # The device zeroes whole logical sectors; the ragged ends are written as data.
        sector = self.sector_size
        end = offset + length
        aligned_start = -(-offset // sector) * sector
        aligned_end = end // sector * sector
        if aligned_start >= aligned_end:
            self._write_zeros_by_data(offset, length)
            return
        if offset < aligned_start:
            self._write_zeros_by_data(offset, aligned_start - offset)
        if aligned_end < end:
            self._write_zeros_by_data(aligned_end, end - aligned_end)
        start, count = aligned_start, aligned_end - aligned_start
        # On a block device, PUNCH_HOLE is a zero-out that may unmap and never falls
        # back to writing; ZERO_RANGE is a zero-out that must not unmap.
        mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
        try:
            fallocate(self._fd, mode | FALLOC_FL_KEEP_SIZE, start, count)
            return
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise self.io_error(operation, start, count, exc) from exc
        # The kernel writes zeros itself here when the device has no zeroing command.
        self._range_ioctl(BLKZEROOUT, start, count, operation)

    def _range_ioctl(self, request: int, offset: int, length: int, operation: str) -> None:
        try:
            fcntl.ioctl(self._fd, request, _RANGE.pack(offset, length))
        except OSError as exc:
            raise self.io_error(operation, offset, length, exc) from exc

    # --- allocation ------------------------------------------------------------------

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        yield Extent(offset, length, False)

    def allocated_bytes(self) -> int:
        self._check_open("allocated_bytes")
        return self._size
