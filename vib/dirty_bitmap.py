"""A persistent dirty bitmap for one disk: which regions must be resynced.

While Kafka is unreachable (or the tap's buffer is full) the tap stops publishing writes
and marks the regions they touch here instead; when Kafka is back, a resync reads the
dirty regions from the source disk and publishes them. The file is memory-mapped, so a
mark costs a few Python operations and survives a SIGKILL of the tap (the page cache
keeps it); `flush()` (msync) makes it survive a host crash, and the tap calls it before
a guest FLUSH or FUA write completes.

File: a 4096-byte header (magic, version, granularity, disk size, CRC32C of the
header), then one bit per `granularity` bytes of the disk, least significant bit first.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c

MAGIC = 0x4D42_4D44  # "DMBM" little-endian
VERSION = 1
HEADER_SIZE = 4096
_HEADER = struct.Struct("<IHxxIQI")  # magic, version, granularity, disk size, crc
_SCAN = 4096  # bytes of bitmap examined at a time when looking for dirty runs
_ZEROS = bytes(_SCAN)


class DirtyBitmapError(OSError):
    """The bitmap file cannot be used."""


class DirtyBitmap:
    """One bit per `granularity` bytes of a disk of `disk_size` bytes."""

    def __init__(self, path: Path, *, disk_size: int, granularity: int = 64 << 10) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"bitmap granularity must be a power of two, got {granularity}")
        self.path = path
        self.disk_size = disk_size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.nbits = (disk_size + granularity - 1) >> self._shift
        self._nbytes = max(1, (self.nbits + 7) // 8)
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._count: int | None = None
        # Marks made since the last snapshot(), re-applied after clear(snapshot).
        self._since_snapshot: list[tuple[int, int]] | None = None
        self.created = False  # the file did not exist (or was unusable) before open()

    def open(self) -> None:
        """Opens the file, creating it (all clean) if missing.

        A file written for another granularity or disk size is replaced by one with every
        bit set: the regions it described cannot be translated exactly, and resyncing
        everything is the safe answer.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        preexisting = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DirtyBitmapError(exc.errno, f"dirty bitmap {self.path}: {exc.strerror}") from exc
        try:
            header = os.pread(fd, _HEADER.size, 0)
            existing = os.fstat(fd).st_size
            valid = existing >= HEADER_SIZE + self._nbytes and self._header_matches(header)
            if not valid:
                # A file that was there but is not valid (another geometry, torn, even
                # empty) described regions it can no longer name: all of them are marked.
                # Its header is invalidated first and written last, so a crash half-way
                # leaves a file that is still invalid, never one of clean bits.
                self.created = not preexisting
                if preexisting:
                    os.pwrite(fd, bytes(_HEADER.size), 0)
                    os.fsync(fd)
                os.ftruncate(fd, HEADER_SIZE + self._nbytes)
                self._map = mmap.mmap(fd, HEADER_SIZE + self._nbytes)
                if preexisting:
                    self._set_bits(self._map, 0, self.nbits)
                    self._map.flush()
                os.pwrite(fd, self._header(), 0)
                os.fsync(fd)
            else:
                self._map = mmap.mmap(fd, HEADER_SIZE + self._nbytes)
        except OSError as exc:
            if self._map is not None:
                self._map.close()
                self._map = None
            os.close(fd)
            raise DirtyBitmapError(exc.errno, f"dirty bitmap {self.path}: {exc.strerror}") from exc
        self._fd = fd

    def _header(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, self.granularity, self.disk_size, 0)
        crc = crc32c.crc32c(body[:-4])
        return body[:-4] + struct.pack("<I", crc)

    def _header_matches(self, header: bytes) -> bool:
        if len(header) < _HEADER.size:
            return False
        return header == self._header()

    def close(self) -> None:
        if self._map is not None:
            self._map.flush()
            self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def _mm(self) -> mmap.mmap:
        if self._map is None:
            raise DirtyBitmapError(0, f"dirty bitmap {self.path} is not open")
        return self._map

    # -- marking -----------------------------------------------------------------------------

    def mark(self, offset: int, length: int, *, transient: bool = False) -> None:
        """Marks every region that [offset, offset+length) touches as dirty.

        `transient` marks are made on behalf of a resync in progress (live writes inside
        its bracket): `resynced()` clears them with the resync's own bits."""
        if length <= 0:
            return
        end = min(offset + length, self.disk_size)
        if end <= offset:
            return
        first = offset >> self._shift
        last = (end - 1) >> self._shift
        mm = self._mm
        self._count = None
        if self._since_snapshot is not None and not transient:
            self._since_snapshot.append((offset, length))
        if first == last:
            pos = HEADER_SIZE + (first >> 3)
            mm[pos] |= 1 << (first & 7)
            return
        self._set_bits(mm, first, last + 1)

    @staticmethod
    def _set_bits(
        buf: mmap.mmap | bytearray, start: int, stop: int, base: int = HEADER_SIZE
    ) -> None:
        """Sets bits start..stop-1 of the bits at buf[base:]."""
        # Head and tail bytes bit by bit, whole bytes in between by slice assignment.
        head_byte = start >> 3
        tail_byte = stop >> 3
        if head_byte == tail_byte:
            mask = ((1 << (stop - start)) - 1) << (start & 7)
            buf[base + head_byte] |= mask
            return
        if start & 7:
            buf[base + head_byte] |= (0xFF << (start & 7)) & 0xFF
            head_byte += 1
        if tail_byte > head_byte:
            ones = b"\xff" * (tail_byte - head_byte)
            buf[base + head_byte : base + tail_byte] = ones
        if stop & 7:
            buf[base + tail_byte] |= (1 << (stop & 7)) - 1

    def mark_all(self) -> None:
        self.mark(0, self.disk_size)

    def flush(self) -> None:
        """Makes the bitmap durable (msync)."""
        try:
            self._mm.flush()
        except OSError as exc:
            raise DirtyBitmapError(exc.errno, f"dirty bitmap {self.path}: {exc.strerror}") from exc

    # -- reading -----------------------------------------------------------------------------

    def bits(self) -> bytes:
        """A copy of the current bits."""
        return self._mm[HEADER_SIZE : HEADER_SIZE + self._nbytes]

    def snapshot(self) -> bytes:
        """The current bits, for a resync to cover; starts remembering later marks.

        Marks made after this call (other than transient ones) survive `resynced()`,
        even where they hit a bit the snapshot holds: that region changed again and
        must be resynced again.
        """
        self._since_snapshot = []
        return self.bits()

    def abandon_snapshot(self) -> None:
        """The resync of the last snapshot was abandoned: every bit stays."""
        self._since_snapshot = None

    def resynced(self) -> None:
        """The resync of the last snapshot completed: clears its bits and the transient
        marks made meanwhile, keeping every other mark made since the snapshot.

        Each byte goes straight from its old value to its new one: a bit kept never
        passes through 0, so a SIGKILL (or a write-back of the pages) in the middle
        leaves a superset of the new bits, never fewer."""
        remarks, self._since_snapshot = self._since_snapshot or [], None
        kept = bytearray(self._nbytes)
        shift = self._shift
        for offset, length in remarks:
            end = min(offset + length, self.disk_size)
            if end > offset:
                self._set_bits(kept, offset >> shift, ((end - 1) >> shift) + 1, base=0)
        mm = self._mm
        self._count = None
        for start in range(0, self._nbytes, _SCAN):
            stop = min(start + _SCAN, self._nbytes)
            new = kept[start:stop]
            if mm[HEADER_SIZE + start : HEADER_SIZE + stop] != new:
                mm[HEADER_SIZE + start : HEADER_SIZE + stop] = new

    def any(self) -> bool:
        mm = self._mm
        for start in range(HEADER_SIZE, HEADER_SIZE + self._nbytes, _SCAN):
            chunk = mm[start : min(start + _SCAN, HEADER_SIZE + self._nbytes)]
            if chunk != _ZEROS[: len(chunk)]:
                return True
        return False

    def dirty_count(self) -> int:
        """Number of dirty regions (cached until the next change)."""
        if self._count is None:
            bits = self._mm[HEADER_SIZE : HEADER_SIZE + self._nbytes]
            self._count = int.from_bytes(bits, "little").bit_count()
        return self._count

    def dirty_bytes(self) -> int:
        return sum(length for _, length in self.runs())

    def runs(self, snapshot: bytes | None = None) -> Iterator[tuple[int, int]]:
        """Dirty byte ranges (offset, length), ascending, clipped to the disk size."""
        bits = self.bits() if snapshot is None else snapshot
        shift = self._shift
        run_start = -1
        run_stop = -1
        for start in range(0, len(bits), _SCAN):
            chunk = bits[start : start + _SCAN]
            if chunk == _ZEROS[: len(chunk)]:
                continue
            value = int.from_bytes(chunk, "little")
            base = start * 8
            while value:
                low = (value & -value).bit_length() - 1
                shifted = value >> low
                ones = (~shifted & (shifted + 1)).bit_length() - 1
                first = base + low
                stop = first + ones
                if first == run_stop:
                    run_stop = stop
                else:
                    if run_start >= 0:
                        yield self._clip(run_start << shift, run_stop << shift)
                    run_start, run_stop = first, stop
                value = (shifted >> ones) << (low + ones)
        if run_start >= 0:
            yield self._clip(run_start << shift, run_stop << shift)

    def _clip(self, start: int, stop: int) -> tuple[int, int]:
        return start, min(stop, self.disk_size) - start
