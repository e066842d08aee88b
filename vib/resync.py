"""A resync: one bracket that brings the target's view of the dirty regions up to date.

It publishes, in the VM's one sequence and interleaved with live writes:

    MARKER RESYNC_START (marker_id = its own seq)
    SYNC_BLOCK / ZERO records for every dirty region, read from the source disk
    MARKER RESYNC_END   (same marker_id)

and the applier applies the whole bracket as one unit (guarantee 4). Initial full sync
and resync after an outage or a crash are the same thing with more or fewer dirty bits.

Why the result equals the source: each SYNC_BLOCK carries the content of its region as
of the moment its sequence number is assigned, which happens in the same synchronous
stretch of the event loop as the check that no write touched the region while it was
read (`VmTap.window`; a read that raced a write is simply read again). Every live write
is numbered when it reaches the disk. So in sequence order, the target sees each region's
content exactly as the source had it at each point; a live write to a region not yet
resynced is published too, and the later SYNC_BLOCK (which already contains it) is
harmless.

Thin stays thin (guarantee 5): only allocated extents are read (SEEK_DATA/SEEK_HOLE
through `StorageBackend.allocated_extents`), holes travel as ZERO ranges, and blocks
read as all zeros travel as ZERO ranges too. A hole's ZERO is assigned its sequence in
the same synchronous stretch as the query that found the hole.

Live writes published inside the bracket reach the target only with it: a bracket cut
short (the tap dies or loses Kafka before RESYNC_END) is not applied on its own; its
records stay in the sequence and are applied together with the superseding bracket, as
one unit, when that one completes. Until a bracket holding them completes, the target
does not have them, so they are also marked in the bitmap (transient marks) and the next
resync covers them too if the bracket does not complete.

The bits of the dirty bitmap are cleared only once Kafka acknowledged RESYNC_END; marks
made during the resync for other reasons survive the clearing (`DirtyBitmap.snapshot`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from datapath.journal import MarkerKind, RecordKind

if TYPE_CHECKING:
    from vib.publisher import PublishSession
    from vib.vm_tap import TapDisk, VmTap

log = logging.getLogger(__name__)

# A ZERO record may cover a large hole, but not one so large that the receiver's
# bookkeeping of ranges gets unwieldy.
MAX_ZERO_RECORD = 1 << 30
_READ_ATTEMPTS = 3


class Resync:
    """One bracket over the regions dirty when it starts: `open()` snapshots their bits
    and numbers RESYNC_START in one synchronous stretch, `run()` publishes them."""

    def __init__(self, vm: VmTap, session: PublishSession, *, full: bool, chunk_bytes: int) -> None:
        self.vm = vm
        self.session = session
        self.full = full
        self.chunk_bytes = chunk_bytes
        self.granularity = vm.settings.bitmap_granularity
        self.snapshots: list[Any] = []
        self.total_bytes = 0
        self.done_bytes = 0
        self.data_bytes = 0  # sent as SYNC_BLOCK
        self.zero_bytes = 0  # sent as ZERO ranges
        self.reads_retried = 0
        self._paced_bytes = 0
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self.state = "running"
        self.abandoned = False
        self.marker_id = 0

    def open(self) -> None:
        """Snapshots the dirty bits and numbers RESYNC_START, with no await in between.

        The tap must already know this resync as its current one: RESYNC_START itself may
        fill the buffer, and the overflow then abandons this bracket (`abandoned` is set
        when this returns), not the one before it."""
        vm = self.vm
        self.snapshots = [disk.bitmap.snapshot() for disk in vm.disks]
        self.total_bytes = sum(
            length
            for disk, snap in zip(vm.disks, self.snapshots, strict=True)
            for _, length in disk.bitmap.runs(snap)
        )
        # The marker's id is its own sequence number: unique, and known before it is sent.
        # From here to RESYNC_END, live writes reach the target only with the bracket.
        vm.bracket_open = True
        self.marker_id = vm.last_seq_assigned + 1
        vm.emit(
            self.session,
            RecordKind.MARKER,
            0,
            0,
            0,
            marker=MarkerKind.RESYNC_START,
            marker_id=self.marker_id,
        )
        log.info(
            "VM %s: %s %s (marker %d, %d bytes dirty)",
            vm.vm_id,
            self.kind,
            "abandoned at its start: the buffer is full" if self.abandoned else "started",
            self.marker_id,
            self.total_bytes,
        )

    def abandon(self) -> None:
        """The bracket must never end (nor clear a bit): the tap stopped publishing, or
        stopped taking writes while it was open. Set synchronously, so it holds even where
        a cancellation of the task running it is lost, and checked before every record it
        numbers (a full buffer abandons it in the middle of a chunk's records)."""
        self.abandoned = True
        self.state = "abandoned"

    @property
    def finished(self) -> bool:
        """Complete, abandoned or failed: nothing left to abandon."""
        return self.state in ("complete", "abandoned", "failed")

    def _going_on(self) -> bool:
        return self.session.active and not self.abandoned

    @property
    def kind(self) -> str:
        return "full sync" if self.full else "resync"

    @property
    def rate(self) -> float:
        """Bytes of disk covered per second."""
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        elapsed = end - self.started_at
        return self.done_bytes / elapsed if elapsed > 0 else 0.0

    def status(self) -> dict[str, Any]:
        return {
            "kind": "full" if self.full else "resync",
            "state": self.state,
            "marker_id": self.marker_id,
            "bytes_done": self.done_bytes,
            "bytes_total": self.total_bytes,
            "data_bytes_sent": self.data_bytes,
            "zero_bytes_sent": self.zero_bytes,
            "rate_bytes_per_s": round(self.rate),
        }

    async def run(self) -> bool:
        """True once RESYNC_END is acknowledged and the resynced bits are cleared."""
        try:
            completed = await self._run()
        except asyncio.CancelledError:
            self.state = "abandoned"
            raise
        except BaseException:
            self.state = "failed"
            raise
        finally:
            self.finished_at = time.monotonic()
        return completed

    async def _run(self) -> bool:
        vm = self.vm
        session = self.session
        room = max(vm.settings.buffer_max_bytes // 2, 2 * vm.settings.frame_max_bytes)
        for disk, snap in zip(vm.disks, self.snapshots, strict=True):
            for offset, length in disk.bitmap.runs(snap):
                pos = offset
                end = offset + length
                while pos < end:
                    if not await vm.wait_for_room(session, room) or self.abandoned:
                        self.state = "abandoned"
                        return False
                    pos = await self._sync_step(disk, pos, end)
        if not self._going_on():
            self.state = "abandoned"
            return False
        end_seq = vm.emit(
            session,
            RecordKind.MARKER,
            0,
            0,
            0,
            marker=MarkerKind.RESYNC_END,
            marker_id=self.marker_id,
        )
        vm.bracket_open = False
        self.state = "waiting for acknowledgement"
        if not await vm.wait_acked(session, end_seq):
            self.state = "abandoned"
            return False
        if self.abandoned or vm.publishing is not session:
            self.state = "abandoned"
            return False
        for disk in vm.disks:
            disk.bitmap.resynced()
        self.state = "complete"
        log.info(
            "VM %s: %s complete: %d bytes covered, %d sent as data, %d as zero ranges, %.0f MB/s",
            vm.vm_id,
            self.kind,
            self.done_bytes,
            self.data_bytes,
            self.zero_bytes,
            self.rate / 1e6,
        )
        return True

    async def _sync_step(self, disk: TapDisk, pos: int, end: int) -> int:
        """Publishes the region from `pos` up to the end of its first extent (bounded);
        returns where the next step starts."""
        vm = self.vm
        session = self.session
        if not self._going_on():
            return end
        first = next(iter(disk.backend.allocated_extents(pos, end - pos)))
        if first.zero:
            size = min(first.length, MAX_ZERO_RECORD)
            vm.emit(session, RecordKind.ZERO, disk.index, pos, size)
            self.zero_bytes += size
            self.done_bytes += size
            return pos + size
        size = min(first.length, self.chunk_bytes)
        await self._pace(size)
        data = await self._stable_read(disk, pos, size)
        if self._going_on():
            self._publish_data(disk, pos, data)
        self.done_bytes += size
        return pos + size

    async def _pace(self, size: int) -> None:
        """Keeps the data read under resync_max_bytes_per_s, if set."""
        rate = self.vm.settings.resync_max_bytes_per_s
        if not rate:
            return
        self._paced_bytes += size
        ahead = self._paced_bytes / rate - (time.monotonic() - self.started_at)
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def _stable_read(self, disk: TapDisk, offset: int, length: int) -> bytes:
        """The region's content as of now: read in a thread, again if a write raced it."""
        vm = self.vm
        for _ in range(_READ_ATTEMPTS):
            window = ReadWindow(disk.index, offset, offset + length)
            vm.window = window
            try:
                data = await asyncio.to_thread(disk.backend.read, offset, length)
            finally:
                # Only its own: a resync abandoned mid-read unwinds after the next began.
                if vm.window is window:
                    vm.window = None
            if not window.conflict:
                return data
            self.reads_retried += 1
        # Hot region: read it inline, where no write can interleave.
        return disk.backend.read(offset, length)

    def _publish_data(self, disk: TapDisk, offset: int, data: bytes) -> None:
        """SYNC_BLOCK records for the data, ZERO ranges for its all-zero blocks."""
        granularity = self.granularity
        view = memoryview(data)
        zeros = _zeros(granularity)
        total = len(data)
        run_start = 0
        run_zero = False
        pos = 0
        while pos < total:
            step = min(granularity - (offset + pos) % granularity, total - pos)
            # bytes comparison is a memcmp; comparing memoryviews goes element by element.
            block = data[pos : pos + step]
            block_zero = block == zeros if step == granularity else block == zeros[:step]
            if pos == 0:
                run_zero = block_zero
            elif block_zero != run_zero:
                self._emit_run(disk, offset, view, run_start, pos, run_zero)
                run_start = pos
                run_zero = block_zero
            pos += step
        self._emit_run(disk, offset, view, run_start, total, run_zero)

    def _emit_run(
        self, disk: TapDisk, offset: int, view: memoryview, start: int, stop: int, zero: bool
    ) -> None:
        if stop <= start or not self._going_on():
            # Abandoned by the run before (it filled the buffer): the records of this
            # chunk would land in the draining session, numbered after the bracket's
            # dropped start, as plain records outside any bracket.
            return
        if zero:
            self.vm.emit(self.session, RecordKind.ZERO, disk.index, offset + start, stop - start)
            self.zero_bytes += stop - start
        else:
            self.vm.emit(
                self.session,
                RecordKind.SYNC_BLOCK,
                disk.index,
                offset + start,
                stop - start,
                view[start:stop],
            )
            self.data_bytes += stop - start


_ZERO_CACHE: dict[int, bytes] = {}


def _zeros(size: int) -> bytes:
    zeros = _ZERO_CACHE.get(size)
    if zeros is None:
        zeros = _ZERO_CACHE[size] = bytes(size)
    return zeros


class ReadWindow:
    """A region the resync is reading in a thread; writes into it flag a conflict."""

    __slots__ = ("conflict", "disk", "end", "start")

    def __init__(self, disk: int, start: int, end: int) -> None:
        self.disk = disk
        self.start = start
        self.end = end
        self.conflict = False

    def touch(self, disk: int, offset: int, length: int) -> None:
        """A change to `disk` at offset..offset+length: a conflict if it overlaps."""
        if disk == self.disk and offset < self.end and offset + length > self.start:
            self.conflict = True
