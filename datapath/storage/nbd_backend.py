"""A disk reached over NBD (qemu-nbd, nbdkit, any NBD server) through libnbd."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from datapath.storage.backend import Extent, StorageBackend, StorageError

log = logging.getLogger(__name__)

ALLOCATION_CONTEXT = "base:allocation"
# libnbd refuses reads above 64 MiB; stay well under it unless the server asks for less.
_DEFAULT_MAX_REQUEST = 32 << 20
# Zero, trim and block status carry a 32-bit length in the protocol.
_MAX_RANGE_REQUEST = 1 << 30

NBD_URI_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://")


def is_nbd_uri(spec: str) -> bool:
    return spec.startswith(NBD_URI_SCHEMES)


class NbdBackend(StorageBackend):
    """An NBD export, given as an NBD URI such as nbd://host:10809/export or
    nbd+unix:///export?socket=/run/disk.sock.

    trim() and write_zeroes(punch_hole=True) send WRITE_ZEROES without NO_HOLE: the
    server may deallocate, and the range reads as zeros (a bare NBD TRIM promises nothing
    about what a later read returns). A server without WRITE_ZEROES gets zeros written.
    Extents come from block status on base:allocation; a server without it reports
    the whole disk as data.

    A server may ask for requests aligned to a minimum block size (libnbd then refuses
    others): reads are widened to whole blocks, writes and zeroes that start or end
    inside a block write that block whole (read, patch, write back).
    """

    def __init__(self, uri: str, *, readonly: bool = False) -> None:
        super().__init__(uri)
        self.uri = uri
        try:
            import nbd
        except ImportError as exc:
            self._closed = True
            raise self.error("open", "libnbd's Python binding (import nbd) is missing") from exc
        self._nbd: Any = nbd
        # libnbd serialises calls on a handle anyway; this lock also covers readinto's
        # wait for its own command, which another thread's call could otherwise complete
        # while this thread is about to block in poll().
        self._lock = threading.Lock()
        self._h: Any = nbd.NBD()
        try:
            self._h.add_meta_context(ALLOCATION_CONTEXT)
            self._h.connect_uri(uri)
            self._size: int = self._h.get_size()
            server_readonly = bool(self._h.is_read_only())
            self.readonly = readonly or server_readonly
            self.can_zero = bool(self._h.can_zero())
            self.can_trim = self.can_zero or bool(self._h.can_trim())
            self.can_multi_conn = bool(self._h.can_multi_conn())
            self._can_flush = bool(self._h.can_flush())
            self._has_allocation = bool(self._h.can_meta_context(ALLOCATION_CONTEXT))
            maximum = int(self._h.get_block_size(nbd.SIZE_MAXIMUM))
            minimum = int(self._h.get_block_size(nbd.SIZE_MINIMUM))
        except nbd.Error as exc:
            self._closed = True
            self._h = None
            raise self._nbd_error("open", exc) from exc
        self._max_request = min(maximum, _DEFAULT_MAX_REQUEST) if maximum else _DEFAULT_MAX_REQUEST
        # 0: the server did not say; 1: any alignment.
        self._block = max(1, minimum)
        if self._block > 1:
            self._max_request -= self._max_request % self._block
        if not readonly and server_readonly:
            log.info("%s: the server exports it read-only", uri)

    @property
    def size(self) -> int:
        return self._size

    # --- I/O -----------------------------------------------------------------------------

    def _unaligned(self, offset: int, length: int) -> bool:
        block = self._block
        return block > 1 and bool(offset % block or length % block)

    def _widened(self, offset: int, length: int) -> tuple[int, int]:
        """The smallest range of whole blocks holding offset..offset+length."""
        block = self._block
        start = offset - offset % block
        end = -(-(offset + length) // block) * block
        return start, end - start

    def _read(self, offset: int, length: int) -> bytes:
        if self._unaligned(offset, length):
            start, span = self._widened(offset, length)
            data = self._read(start, span)
            return data[offset - start : offset - start + length]
        if length <= self._max_request:
            try:
                with self._lock:
                    data = self._h.pread(length, offset)
                return bytes(data)
            except self._nbd.Error as exc:
                raise self._nbd_error("read", exc, offset, length) from exc
        buf = bytearray(length)
        self._readinto(offset, memoryview(buf))
        return bytes(buf)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        if self._unaligned(offset, len(buf)):
            buf[:] = self._read(offset, len(buf))
            return
        # aio_pread fills the caller's buffer directly; waiting on it makes it synchronous.
        h = self._h
        pos = 0
        total = len(buf)
        try:
            while pos < total:
                step = min(self._max_request, total - pos)
                target = self._nbd.Buffer.from_buffer(buf[pos : pos + step])
                with self._lock:
                    cookie = h.aio_pread(target, offset + pos)
                    while not h.aio_command_completed(cookie):
                        h.poll(-1)
                pos += step
        except self._nbd.Error as exc:
            raise self._nbd_error("read", exc, offset + pos, total - pos) from exc

    def _write(self, offset: int, data: memoryview) -> None:
        if self._unaligned(offset, len(data)):
            self._write_unaligned(offset, data)
            return
        pos = 0
        total = len(data)
        try:
            while pos < total:
                step = min(self._max_request, total - pos)
                with self._lock:
                    self._h.pwrite(data[pos : pos + step], offset + pos)
                pos += step
        except self._nbd.Error as exc:
            raise self._nbd_error("write", exc, offset + pos, total - pos) from exc

    def _block_pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """offset..offset+length cut at block boundaries, as (start, end, whole): the
        partial block at either end, and the whole blocks between them."""
        block = self._block
        end = offset + length
        head_end = min(end, -(-offset // block) * block)
        tail_start = max(head_end, end - end % block)
        if head_end > offset:
            yield offset, head_end, False
        if tail_start > head_end:
            yield head_end, tail_start, True
        if end > tail_start:
            yield tail_start, end, False

    def _write_unaligned(self, offset: int, data: memoryview) -> None:
        """The partial blocks at either end are read, patched and written back whole
        (under the handle's lock: no other thread's write lands in between); the whole
        blocks between them are written as they are."""
        for start, end, whole in self._block_pieces(offset, len(data)):
            piece = data[start - offset : end - offset]
            if whole:
                self._write(start, piece)
            else:
                self._patch_block(start, piece)

    def _patch_block(self, offset: int, data: memoryview) -> None:
        """Writes `data`, which lies within one block, by rewriting that block."""
        start = offset - offset % self._block
        try:
            with self._lock:
                content = bytearray(self._h.pread(self._block, start))
                content[offset - start : offset - start + len(data)] = data
                self._h.pwrite(content, start)
        except self._nbd.Error as exc:
            raise self._nbd_error("write", exc, offset, len(data)) from exc

    def _write_zeroes(self, offset: int, length: int, punch_hole: bool) -> None:
        if self._unaligned(offset, length):
            # Zeros written into the partial blocks at the ends, the whole ones zeroed.
            for start, end, whole in self._block_pieces(offset, length):
                if whole:
                    self._write_zeroes(start, end - start, punch_hole)
                else:
                    self._write_zeros_by_data(start, end - start)
            return
        if not self.can_zero:
            self._write_zeros_by_data(offset, length)
            return
        flags = 0 if punch_hole else self._nbd.CMD_FLAG_NO_HOLE
        self._ranged("write_zeroes", offset, length, lambda n, o: self._h.zero(n, o, flags))

    def _trim(self, offset: int, length: int) -> None:
        self._write_zeroes(offset, length, True)

    def _ranged(self, operation: str, offset: int, length: int, call: Any) -> None:
        end = offset + length
        pos = offset
        try:
            while pos < end:
                step = min(_MAX_RANGE_REQUEST, end - pos)
                with self._lock:
                    call(step, pos)
                pos += step
        except self._nbd.Error as exc:
            raise self._nbd_error(operation, exc, pos, end - pos) from exc

    def _flush(self) -> None:
        if not self._can_flush:
            return
        try:
            with self._lock:
                self._h.flush()
        except self._nbd.Error as exc:
            raise self._nbd_error("flush", exc) from exc

    # --- allocation ------------------------------------------------------------------

    def _status_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(offset, length, base:allocation flags) runs tiling the range."""
        if not self._has_allocation:
            yield offset, length, 0
            return
        if self._unaligned(offset, length):
            # Asked for whole blocks; a partial block's run is clipped to the range.
            start, span = self._widened(offset, length)
            for pos, run, flags in self._status_runs(start, span):
                clipped_start, clipped_end = max(pos, offset), min(pos + run, offset + length)
                if clipped_end > clipped_start:
                    yield clipped_start, clipped_end - clipped_start, flags
            return
        end = offset + length
        pos = offset
        entries: list[int] = []

        def collect(context: str, _offset: int, got: list[int], _error: Any) -> int:
            if context == ALLOCATION_CONTEXT:
                entries.extend(got)
            return 0

        while pos < end:
            entries.clear()
            try:
                with self._lock:
                    self._h.block_status(min(_MAX_RANGE_REQUEST, end - pos), pos, collect)
            except self._nbd.Error as exc:
                raise self._nbd_error("allocated_extents", exc, pos, end - pos) from exc
            if not entries:
                # The server said nothing about this range: all we may assume is data.
                yield pos, end - pos, 0
                return
            for i in range(0, len(entries) - 1, 2):
                run = min(entries[i], end - pos)
                if run <= 0:
                    break
                yield pos, run, entries[i + 1]
                pos += run
                if pos >= end:
                    return
            if entries[0] <= 0:  # a server answering with empty runs: stop asking
                yield pos, end - pos, 0
                return

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        zero_flag = self._nbd.STATE_ZERO
        for pos, run, flags in self._status_runs(offset, length):
            yield Extent(pos, run, bool(flags & zero_flag))

    def allocated_bytes(self) -> int:
        """Bytes not reported as holes by the server."""
        self._check_open("allocated_bytes")
        hole_flag = self._nbd.STATE_HOLE
        return sum(
            run for _, run, flags in self._status_runs(0, self._size) if not flags & hole_flag
        )

    def _close(self) -> None:
        h, self._h = self._h, None
        try:
            with self._lock:
                h.shutdown()
        except self._nbd.Error as exc:
            log.warning("%s: NBD shutdown failed: %s", self.name, exc)
        # Dropping the last reference closes the handle and its connection.
        del h

    def _nbd_error(
        self, operation: str, exc: Any, offset: int | None = None, length: int | None = None
    ) -> StorageError:
        where = "" if offset is None else f"offset={offset} length={length}: "
        return self.error(operation, f"{where}{exc}", errno=getattr(exc, "errnum", None) or None)
