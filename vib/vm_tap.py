"""The write path of one protected VM.

Per guest write, in this order:

1. the activity log makes the touched extents hot (durably, only when they were cold);
2. the write goes to the source disk;
3. it gets the next number of the VM's sequence (one sequence for all its disks);
4. its record is appended to the publishing session, which frames and sends it later.

Steps 2 and 3 happen in one synchronous stretch of the event loop, with no await in
between, so two overlapping writes (even from different NBD connections or disks)
are numbered in the order they reached the disk. The guest's write completes after
step 2 (FUA and FLUSH also make the source disk durable); Kafka is never waited for,
except under the back-pressure policy.

Modes:
- `tracking`: no session takes writes (Kafka unreachable, not yet connected after a
  start, or the session's buffer overflowed and is draining). Writes mark the dirty
  bitmap instead of being published.
- `live`: writes are published.
- `resyncing`: live, and a resync bracket is being published as well (dirty regions
  read from the source disk, see `vib.resync`).

A session ends on the first publishing failure or on an acknowledgement overdue by
`outage_timeout_s`. Then every record not acknowledged has its region marked dirty, the
producer is dropped, and the tap reconnects: a new epoch, the sequence continuing from
the last frame in the topic, and a resync of everything dirty.

An overflow (policy `track`: more than `buffer_max_bytes` unacknowledged) does not end
the session: it stops taking writes (they mark the bitmap; an open resync bracket is
abandoned, to be superseded), what it holds is still sent and acknowledged, and once it
holds at most half the buffer and the guest writes slower than Kafka drained it
(`vib.resume_gate`), it takes writes again, behind a resync of what changed meanwhile.
Nothing that reached the session is sent twice.

Local generations: every data-changing guest write also gets a local generation number
`gen`. A write is *safe* once it is acknowledged by Kafka or durably marked in the bitmap;
`covered()` is the highest g such that every write with gen <= g is safe, and the
activity log reuses a slot only for extents whose last write is covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from datapath.journal import MarkerKind, RecordKind
from datapath.kafka import KafkaError, backoff_delay
from datapath.protection import ProtectedVM
from datapath.service import wait_ended
from datapath.storage import StorageBackend, StorageError, open_backend
from datapath.storage.fd import FdBackend
from vib._fast_writes import FastWrites
from vib.activity_log import ActivityLog
from vib.dirty_bitmap import DirtyBitmap
from vib.publisher import FrameSink, PublishSession, SessionFailed
from vib.resume_gate import ResumeGate
from vib.resync import ReadWindow, Resync
from vib.settings import OutagePolicy, TapSettings
from vib.tap_state import TapState

log = logging.getLogger(__name__)

_WRITE = RecordKind.WRITE
_ZERO = RecordKind.ZERO
_TRIM = RecordKind.TRIM
_FLUSH = RecordKind.FLUSH
_MARKER = RecordKind.MARKER
_HOUSEKEEPING_TICK_S = 0.25
# `number_past`: markers appended between two yields to the event loop, and the most it
# appends in all (about 52 MB of them): a larger jump is a number no tap gave.
_FILL_BATCH = 1024
_FILL_MAX = 1_000_000
_MAX_RANGE_PIECE = 256 << 20


class Mode(StrEnum):
    TRACKING = "tracking"
    LIVE = "live"
    RESYNCING = "resyncing"


class AckOverdue(SessionFailed):
    """A frame stayed unacknowledged longer than outage_timeout_s."""


class EpochNotSaved(Exception):
    """A publishing session could not begin: its epoch could not be made durable."""


class TopicSession(FrameSink, Protocol):
    last_seq: int
    last_epoch: int

    async def close(self, grace_s: float) -> None:
        """Stops after sending what is queued (up to grace_s), else like abort()."""

    async def abort(self) -> None:
        """Stops at once, dropping whatever is queued or being retried."""


class TopicConnector(Protocol):
    topic: str

    async def connect(self) -> TopicSession: ...


class TapDisk:
    """One protected disk of the VM: its source storage and its dirty bitmap."""

    __slots__ = ("backend", "bitmap", "fast", "flush_error", "index", "name", "write")

    def __init__(
        self,
        index: int,
        name: str,
        backend: StorageBackend,
        bitmap: DirtyBitmap,
        fast: FastWrites | None = None,
    ):
        self.index = index
        self.name = name
        self.backend = backend
        self.bitmap = bitmap
        self.write = _direct_writer(backend)
        # The C write path (vib/_fast_writes.c), for a file or block device.
        self.fast = fast
        # A write-back error the background flush met: the guest's next FLUSH or FUA
        # write gets it (the kernel reports one to the first fsync only).
        self.flush_error: OSError | None = None


def _direct_writer(backend: StorageBackend) -> Callable[[int, memoryview, int], None]:
    """`write(offset, data, length)` for the hot path.

    For a file or block device it is one pwrite: the NBD server has already checked the
    range, and the backend's generic checks cost as much as the system call itself.
    """
    if not isinstance(backend, FdBackend):

        def generic(offset: int, data: memoryview, length: int) -> None:
            backend.write(offset, data)

        return generic
    fd = backend.fileno()
    pwrite = os.pwrite

    def direct(offset: int, data: memoryview, length: int) -> None:
        try:
            done = pwrite(fd, data, offset)
        except OSError as exc:
            raise backend.io_error("write", offset, length, exc) from exc
        if done != length:  # a short write: the backend finishes (or reports) it
            backend.write(offset + done, data[done:])

    return direct


@dataclass
class VmStats:
    writes: int = 0
    write_bytes: int = 0
    zeroes: int = 0
    zero_bytes: int = 0
    trims: int = 0
    trim_bytes: int = 0
    flushes: int = 0
    frames: int = 0
    frame_bytes: int = 0
    outages: int = 0
    overflows: int = 0
    fast_writes: int = 0  # writes that took the C write path (of `writes`)
    resyncs_completed: int = 0
    resync_requests: int = 0  # the receiver's and the applier's, acted on (vib/resync_requests.py)
    heartbeats: int = 0
    writebacks: int = 0

    @property
    def changed_bytes(self) -> int:
        """Bytes of disk given new contents (written or zeroed) since the start."""
        return self.write_bytes + self.zero_bytes


class VmTap:
    """The tap of one VM: its disks, activity log, bitmaps, sequence and sessions."""

    def __init__(
        self,
        vm: ProtectedVM,
        settings: TapSettings,
        topic: TopicConnector,
        *,
        on_frame_acked: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.vm = vm
        self.vm_id = vm.id
        self.settings = settings
        self._topic = topic
        self._on_frame_acked = on_frame_acked
        self.state = TapState(settings.state_dir / vm.id)
        self.disks: list[TapDisk] = []
        self._al = ActivityLog(
            self.state.activity_log_path,
            extent_size=settings.extent_size,
            slots=settings.activity_log_slots,
            covered=self.covered,
            make_room=self._make_room,
        )
        self._policy = settings.outage_policy
        self._buffer_max = settings.buffer_max_bytes
        # An overflowed session takes writes again once it holds at most this much.
        self._resume_bytes = settings.buffer_max_bytes // 2
        # A frame (one Kafka message) must fit the topic's max.message.bytes; one record may
        # exceed the frame bound by its header: the bound leaves room.
        self._frame_max = min(settings.frame_max_bytes, vm.journal.max_message_bytes - (128 << 10))
        # A zero/trim range is split so that one piece pins at most half the log's slots,
        # and is at most _MAX_RANGE_PIECE: each piece is applied on the event loop, which
        # every VM's I/O shares (a block device without discard, or a file system that
        # cannot zero a range, writes the zeros).
        self._range_piece = min(
            _MAX_RANGE_PIECE, max(1, settings.activity_log_slots // 2) * settings.extent_size
        )
        self.stats = VmStats()
        self.epoch = 0
        self._next_seq = 1
        self._acked_seq = 0
        self._saved_seq = 0
        self._gen = 0
        self._unflushed_min = 0
        self._flushing_min = 0
        self._bitmap_lock = asyncio.Lock()
        # The session that takes writes; after an overflow, the one draining instead.
        self._session: PublishSession | None = None
        self._draining: PublishSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._session_ended: asyncio.Future[None] | None = None
        self._progress_waiters: list[asyncio.Future[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._resync_task: asyncio.Task[None] | None = None
        self._resume_after: asyncio.Task[None] | None = None
        self._resume_gate = ResumeGate()
        self._resume_deferred = False
        self.resync: Resync | None = None  # the current or last one
        self.window: ReadWindow | None = None
        # Between RESYNC_START and RESYNC_END: live writes also get transient marks.
        self.bracket_open = False
        self._stopping = False
        self._started = False
        self.last_error = ""
        self._full_sync_requests = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens disks and state; dirty regions from before (crash) are queued for resync.

        The VM serves writes right away (tracking) and publishes once Kafka is reached.
        """
        state = self.state
        state.open()
        first_protection = not state.existed
        # Durably "requested" before any bitmap is marked, so that a crash before the
        # marks are durable cannot lose the full sync.
        mark_all_disks = state.full_sync == "requested"
        new_disks = {d.name for d in self.vm.disks if not state.bitmap_path(d.name).exists()}
        if not first_protection or self.settings.full_sync_on_first_protect:
            if new_disks:
                state.set_full_sync("requested")
        else:
            new_disks = set()
        full_sync = state.full_sync_pending
        try:
            for index, disk in enumerate(self.vm.disks):
                backend = open_backend(disk.source, create_size=disk.size)
                if disk.size is not None and backend.size > disk.size:
                    # The guest may write the whole device; a target made at the plan's
                    # size would refuse what lies past it, and replication would stop.
                    log.warning(
                        "VM %s: source %s holds %d bytes, more than the plan's size %d: "
                        "set the disk's size in the plan to the device's",
                        self.vm_id,
                        disk.source,
                        backend.size,
                        disk.size,
                    )
                bitmap = DirtyBitmap(
                    state.bitmap_path(disk.name),
                    disk_size=backend.size,
                    granularity=self.settings.bitmap_granularity,
                )
                try:
                    bitmap.open()
                except BaseException:
                    backend.close()
                    raise
                fast = None
                if self.settings.fast_writes and isinstance(backend, FdBackend):
                    fast = self._al.fast_writes(index, backend.fileno(), backend.size)
                self.disks.append(TapDisk(index, disk.name, backend, bitmap, fast))
                if mark_all_disks or disk.name in new_disks:
                    # A disk the tap has never seen: everything on it must travel.
                    bitmap.mark_all()
            recovered = self._al.open()
            for extent in recovered:
                if extent.disk < len(self.disks):
                    self.disks[extent.disk].bitmap.mark(extent.offset, extent.length)
                else:
                    log.warning(
                        "VM %s: activity log names unknown disk %d", self.vm_id, extent.disk
                    )
            for tap_disk in self.disks:
                tap_disk.bitmap.flush()
            if full_sync:
                state.set_full_sync("marked")
            if recovered:
                log.warning(
                    "VM %s: %d extents were active when the tap stopped; they will be resynced",
                    self.vm_id,
                    len(recovered),
                )
                self._al.reset()
        except BaseException:
            await self._close_files()
            raise
        self.epoch = self.state.epoch
        self._saved_seq = self.state.last_seq
        self._started = True
        self._tasks = [
            asyncio.create_task(self._sessions(), name=f"tap-sessions-{self.vm_id}"),
            asyncio.create_task(self._housekeeping(), name=f"tap-housekeeping-{self.vm_id}"),
        ]
        if self.settings.writeback_interval_s:
            self._tasks.append(
                asyncio.create_task(self._write_back(), name=f"tap-writeback-{self.vm_id}")
            )
        log.info(
            "VM %s: tap started on %d disks%s",
            self.vm_id,
            len(self.disks),
            " (full sync pending)" if full_sync else "",
        )

    async def stop(self, *, drain_timeout: float = 10.0) -> None:
        """Publishes what is buffered (up to `drain_timeout`), then closes everything.

        What could not be published is marked dirty; when everything was acknowledged,
        the activity log is emptied, so a clean restart resyncs nothing.
        """
        if not self._started:
            return
        self._stopping = True
        await self._cancel_resync()
        session = self.publishing
        sessions_task, *others = self._tasks
        for task in others:
            task.cancel()
        if session is not None:
            deadline = time.monotonic() + drain_timeout
            while session.active and not session.all_acked() and time.monotonic() < deadline:
                await self._progress(0.2)
            session.fail(SessionFailed("the tap is stopping"))
            # The sessions loop closes its producer itself once the session ended; it is
            # cancelled only if that takes too long.
            done, _ = await asyncio.wait(
                [sessions_task], timeout=self.settings.kafka_request_timeout_s + 5
            )
            if not done:
                sessions_task.cancel()
        else:
            sessions_task.cancel()  # still trying to reach Kafka: nothing to hand over
        # Whatever they ended with, the bitmaps are flushed and the files closed below.
        await wait_ended(self._tasks, f"VM {self.vm_id}")
        self._tasks = []
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        try:
            await self._flush_bitmaps()
            if self.covered() >= self._gen:
                self._al.reset()
            await self._save_acked_seq()
        finally:
            await self._close_files()
            self._started = False
        log.info("VM %s: tap stopped at seq %d", self.vm_id, self._next_seq - 1)

    async def _save_acked_seq(self) -> None:
        """Saves the last number Kafka acknowledged when it went past the one saved (never
        lower: before a session, nothing is acknowledged yet). Off the event loop: on ext4
        a rename over an existing file starts writeback of the new one and took 8-9 ms
        under load."""
        if self._acked_seq > self._saved_seq:
            self._saved_seq = self._acked_seq
            await asyncio.to_thread(self.state.save_last_seq, self._acked_seq)

    async def _close_files(self) -> None:
        await self._al.close()
        for disk in self.disks:
            disk.bitmap.close()
            disk.backend.close()
        self.disks = []

    # -- modes and status ---------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        if self._session is None:
            return Mode.TRACKING
        task = self._resync_task
        if task is not None and not task.done():
            return Mode.RESYNCING
        return Mode.LIVE

    @property
    def session(self) -> PublishSession | None:
        """The session taking writes (None while tracking)."""
        return self._session

    @property
    def publishing(self) -> PublishSession | None:
        """The producer session, whether it takes writes or drains after an overflow."""
        return self._session or self._draining

    @property
    def last_seq_assigned(self) -> int:
        return self._next_seq - 1

    @property
    def last_seq_acked(self) -> int:
        session = self.publishing
        return session.acked_seq if session is not None else self._acked_seq

    @property
    def buffered_bytes(self) -> int:
        session = self.publishing
        return session.buffered_bytes if session is not None else 0

    @property
    def hot_extents(self) -> int:
        return self._al.hot_count

    @property
    def activity_log_commits(self) -> int:
        return self._al.commits

    @property
    def full_sync_pending(self) -> bool:
        return self._started and self.state.full_sync_pending

    def dirty_bytes(self) -> int:
        total = 0
        for disk in self.disks:
            total += min(disk.bitmap.dirty_count() * disk.bitmap.granularity, disk.backend.size)
        return total

    def status(self) -> dict[str, Any]:
        resync = self.resync
        return {
            "vm": self.vm_id,
            "topic": self._topic.topic,
            "epoch": self.epoch,
            "mode": self.mode.value,
            "last_seq_assigned": self.last_seq_assigned,
            "last_seq_acknowledged": self.last_seq_acked,
            "buffered_bytes": self.buffered_bytes,
            "dirty_bytes": self.dirty_bytes(),
            "hot_extents": self.hot_extents,
            "activity_log_commits": self.activity_log_commits,
            "outages": self.stats.outages,
            "overflows": self.stats.overflows,
            "overflowed": self._draining is not None,
            "fast_writes": self.stats.fast_writes,
            "full_sync_pending": self.full_sync_pending,
            "resync_requests": self.stats.resync_requests,
            "resync": resync.status() if resync is not None else None,
            "last_error": self.last_error,
            "disks": [
                {"index": d.index, "name": d.name, "size": d.backend.size} for d in self.disks
            ],
        }

    # -- the write path -----------------------------------------------------------------------

    async def write(self, disk: TapDisk, offset: int, data: memoryview, fua: bool) -> None:
        length = len(data)
        session = self._session
        if (
            session is not None
            and self._policy is OutagePolicy.BACKPRESSURE
            and session.buffered_bytes >= self._buffer_max
        ):
            await self._wait_for_room()
        index = disk.index
        al = self._al
        slot = al.hot_slot(index, offset, length)
        if slot is None:
            waiter = al.begin_write(index, offset, length)
            if waiter is not None:
                await self._await_hot(waiter, index, offset, length)
        try:
            disk.write(offset, data, length)
        except BaseException:
            self._change_failed(disk, offset, length, pinned=slot is None)
            raise
        # From the disk write to the end of the sequence assignment: no await.
        gen = self._gen = self._gen + 1
        session = self._session
        if session is not None:
            if length <= self._frame_max:
                seq = self._next_seq
                self._next_seq = seq + 1
                session.append(_WRITE, seq, index, offset, length, data, gen=gen)
            else:
                self._append_split_write(session, index, offset, data, gen)
            if self.bracket_open:
                self._mark_inside_bracket(disk, offset, length, gen)
            if session.buffered_bytes > self._buffer_max:
                self._overflow(session)
        else:
            self._mark_dirty(disk, offset, length, gen)
        if slot is None:
            al.end_write(index, offset, length, gen)
        else:
            slot.last_gen = gen
            slot.tick = al.tick
        window = self.window
        if window is not None:
            window.touch(index, offset, length)
        stats = self.stats
        stats.writes += 1
        stats.write_bytes += length
        if fua:
            await self._make_durable(disk)

    def write_run(
        self,
        disk: TapDisk,
        buf: bytearray,
        pos: int,
        end: int,
        replies: bytearray,
        max_length: int,
    ) -> tuple[int, int, int]:
        """The NBD server's fast path (vib.nbd.export.WriteRun): the writes from buf[pos]
        that `write` would take through its quickest branch (a session taking writes, no
        resync bracket or read window open, the extent hot, room in the buffer) go
        through the C write path in one call; the first one that would not is left."""
        fast = disk.fast
        session = self._session
        if fast is None or session is None or self.bracket_open or self.window is not None:
            return pos, 0, 0
        chunk = session.chunk
        used = chunk.used
        pos, count, data_bytes, chunk.used, self._next_seq, self._gen = fast.run(
            buf,
            pos,
            end,
            replies,
            chunk.body,
            used,
            chunk.meta,
            self._next_seq,
            self._gen,
            self._al.tick,
            self._buffer_max - session.buffered_bytes,
            min(max_length, self._frame_max),
        )
        if count:
            session.appended(chunk.used - used)
            stats = self.stats
            stats.writes += count
            stats.fast_writes += count
            stats.write_bytes += data_bytes
        return pos, count, data_bytes

    def _mark_inside_bracket(self, disk: TapDisk, offset: int, length: int, gen: int) -> None:
        # The write travels inside a resync bracket and reaches the target only when a
        # bracket completes (this one, or one superseding it that is applied with it as one
        # unit): until then, the bitmap must name the region too.
        self._mark_dirty(disk, offset, length, gen, transient=True)

    def _mark_dirty(
        self, disk: TapDisk, offset: int, length: int, gen: int, *, transient: bool = False
    ) -> None:
        """Marks the region in the bitmap; `gen` is safe once the marks are flushed."""
        disk.bitmap.mark(offset, length, transient=transient)
        if not self._unflushed_min:
            self._unflushed_min = gen

    def _append_split_write(
        self, session: PublishSession, index: int, offset: int, data: memoryview, gen: int
    ) -> None:
        step = self._frame_max
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            self._append(session, _WRITE, index, offset + start, len(piece), piece, gen=gen)

    async def write_zeroes(
        self, disk: TapDisk, offset: int, length: int, *, may_trim: bool, fua: bool
    ) -> None:
        backend = disk.backend

        def apply(start: int, size: int) -> None:
            backend.write_zeroes(start, size, punch_hole=may_trim)

        await self._change_range(disk, offset, length, _ZERO, apply)
        self.stats.zeroes += 1
        self.stats.zero_bytes += length
        if fua:
            await self._make_durable(disk)

    async def trim(self, disk: TapDisk, offset: int, length: int, fua: bool) -> None:
        await self._change_range(disk, offset, length, _TRIM, disk.backend.trim)
        self.stats.trims += 1
        self.stats.trim_bytes += length
        if fua:
            await self._make_durable(disk)

    async def _change_range(
        self,
        disk: TapDisk,
        offset: int,
        length: int,
        kind: RecordKind,
        apply: Callable[[int, int], None],
    ) -> None:
        """A zero or trim, in pieces small enough for the activity log."""
        index = disk.index
        end = offset + length
        pos = offset
        while pos < end:
            size = min(self._range_piece, end - pos)
            session = self._session
            if (
                session is not None
                and self._policy is OutagePolicy.BACKPRESSURE
                and session.buffered_bytes >= self._buffer_max
            ):
                await self._wait_for_room()
            waiter = self._al.begin_write(index, pos, size)
            if waiter is not None:
                await self._await_hot(waiter, index, pos, size)
            try:
                apply(pos, size)
            except BaseException:
                self._change_failed(disk, pos, size, pinned=True)
                raise
            gen = self._gen = self._gen + 1
            session = self._session
            if session is not None:
                self._append(session, kind, index, pos, size, gen=gen)
                if self.bracket_open:
                    self._mark_inside_bracket(disk, pos, size, gen)
                if session.buffered_bytes > self._buffer_max:
                    self._overflow(session)
            else:
                self._mark_dirty(disk, pos, size, gen)
            self._al.end_write(index, pos, size, gen)
            window = self.window
            if window is not None:
                window.touch(index, pos, size)
            pos += size
            if pos < end:
                # Between pieces the other connections are served (each piece is applied
                # and numbered in one stretch, so the order of overlapping writes holds).
                await asyncio.sleep(0)

    async def flush(self, disk: TapDisk) -> None:
        """The guest's FLUSH: a FLUSH record in the sequence, then local durability."""
        session = self._session
        if session is not None:
            self._append(session, _FLUSH, disk.index, 0, 0)
        self.stats.flushes += 1
        await self._make_durable(disk)

    async def _make_durable(self, disk: TapDisk) -> None:
        await asyncio.to_thread(disk.backend.flush)
        error, disk.flush_error = disk.flush_error, None
        if error is not None:
            # Written-back pages were lost since the last flush the guest asked for:
            # its writes are not all durable, and it must hear so.
            raise error
        if self._unflushed_min:
            await self._flush_bitmaps()

    async def _await_hot(self, waiter: Any, index: int, offset: int, length: int) -> None:
        try:
            await waiter
        except BaseException:
            self._al.abort_write(index, offset, length)
            raise

    def _change_failed(self, disk: TapDisk, offset: int, length: int, *, pinned: bool) -> None:
        # The storage may have applied part of it: resync the region to be sure.
        if pinned:
            self._al.abort_write(disk.index, offset, length)
        self._gen += 1
        self._mark_dirty(disk, offset, length, self._gen)
        self._resync_if_idle()  # while publishing, nothing else would start one for it

    # -- publishing helpers (also used by the resync) -------------------------------------------

    def emit(
        self,
        session: PublishSession,
        kind: RecordKind,
        disk: int,
        offset: int,
        length: int,
        data: bytes | memoryview = b"",
        *,
        marker: MarkerKind | None = None,
        marker_id: int = 0,
    ) -> int:
        """Appends one record with the next sequence number; returns that number."""
        seq = self._append(session, kind, disk, offset, length, data, marker, marker_id)
        if session.buffered_bytes > self._buffer_max:
            self._overflow(session)
        return seq

    def _append(
        self,
        session: PublishSession,
        kind: RecordKind,
        disk: int,
        offset: int,
        length: int,
        data: bytes | memoryview = b"",
        marker: MarkerKind | None = None,
        marker_id: int = 0,
        *,
        gen: int = 0,
    ) -> int:
        """Numbers one record and appends it to the session (the guest's own single-record
        writes do the same inline, on the hot path)."""
        seq = self._next_seq
        self._next_seq = seq + 1
        session.append(kind, seq, disk, offset, length, data, marker, marker_id, gen=gen)
        return seq

    def _heartbeat(self) -> None:
        """A HEARTBEAT marker, when publishing and not inside a resync bracket (a bracket
        is applied only whole, so a heartbeat in it would bound nothing)."""
        session = self._session
        if session is None or not session.active or self.bracket_open:
            return
        self.emit(session, _MARKER, 0, 0, 0, marker=MarkerKind.HEARTBEAT)
        self.stats.heartbeats += 1

    def _overflow(self, session: PublishSession) -> None:
        """More than buffer_max_bytes unacknowledged (policy `track`): the session stops
        taking writes until it has drained to half of that (see `_resume`)."""
        if self._policy is not OutagePolicy.TRACK or self._session is not session:
            return
        self._session = None
        self._draining = session
        stats = self.stats
        stats.overflows += 1
        self._resume_gate.paused(
            time.monotonic(),
            stats.frame_bytes,
            stats.write_bytes,
            abandoned_bracket=self.bracket_open,
        )
        self._resume_deferred = False
        if self.bracket_open:
            # Writes from now on are not in the sequence: the bracket must not complete
            # without them. Its records already sent stay in the sequence, and the resync
            # after the drain supersedes it (the target applies both as one unit).
            resync = self.resync
            if resync is not None:
                # Its records not framed yet are dropped (numbered again from the first
                # of them): every region they carry keeps its bit, and the next bracket
                # sends it again; draining them would only delay that one.
                first = session.discard_from(resync.marker_id)
                if first is not None:
                    self._next_seq = first
            self._abandon_resync()
        log.warning(
            "VM %s: more than %d bytes unacknowledged; tracking dirty regions until the "
            "buffer drains to %d",
            self.vm_id,
            self._buffer_max,
            self._resume_bytes,
        )
        self._wake_progress()

    def _resume(self) -> None:
        """The draining session takes writes again once it holds at most half the buffer
        and the guest writes slower than Kafka drained it (`vib.resume_gate`), behind a
        resync of what changed meanwhile, when the last resync has wound up."""
        session = self._draining
        if session is None or not session.active or session.buffered_bytes > self._resume_bytes:
            return
        gate = self._resume_gate
        stats = self.stats
        if not gate.may_resume(time.monotonic(), stats.frame_bytes, stats.write_bytes):
            if not self._resume_deferred:
                self._resume_deferred = True
                log.info(
                    "VM %s: the guest writes %.0f MB/s, Kafka took %.0f MB/s: tracking until "
                    "the guest slows down (or for %.0f s)",
                    self.vm_id,
                    gate.guest_rate / 1e6,
                    (gate.kafka_rate or 0) / 1e6,
                    gate.probe_after_s,
                )
            return
        task = self._resync_task
        if task is not None and not task.done():
            # An abandoned resync still unwinding, or one whose RESYNC_END awaits its
            # acknowledgement: its bookkeeping must be settled before the next one starts.
            if self._resume_after is not task:
                self._resume_after = task
                task.add_done_callback(lambda _: self._resume())
            return
        self._draining = None
        self._session = session
        log.info("VM %s: buffer drained; publishing again", self.vm_id)
        if any(disk.bitmap.any() for disk in self.disks):
            self._start_resync(session)
        self._wake_progress()

    async def number_past(self, seq: int) -> None:
        """Returns once the next record's number is above `seq` (or the tap stops),
        hurrying it with HEARTBEAT markers while publishing outside a resync bracket
        (inside one, the resync moves it on). A sequence regression makes the receiver
        drop this VM's records up to one past the numbers an older epoch reused: a full
        sync numbered among them would be lost with them (vib/resync_requests.py). Without
        a session it waits for the next one: that one numbers after the topic's last
        record, which may still lie among them (the regressed epoch's own)."""
        if seq - self._next_seq >= _FILL_MAX:
            log.error(
                "VM %s: asked to number past %d, but the next number is %d: not filling",
                self.vm_id,
                seq,
                self._next_seq,
            )
            return
        while self._next_seq <= seq and not self._stopping:
            session = self._session
            if session is None or not session.active or self.bracket_open:
                # No session (or draining after an overflow), or a resync running.
                await self._progress(0.5)
                continue
            for _ in range(min(_FILL_BATCH, seq + 1 - self._next_seq)):
                self.emit(session, _MARKER, 0, 0, 0, marker=MarkerKind.HEARTBEAT)
                if self._session is not session:
                    break  # overflowed
            await asyncio.sleep(0)

    async def wait_for_room(self, session: PublishSession, limit: int) -> bool:
        """Waits until the session buffers less than `limit` bytes; False if it ended."""
        while session.active and session.buffered_bytes >= limit:
            await self._progress(0.5)
        return session.active

    async def wait_acked(self, session: PublishSession, seq: int) -> bool:
        """Waits until Kafka acknowledged `seq`; False if the session ended first."""
        while session.active and session.acked_seq < seq:
            await self._progress(0.5)
        return session.active and session.acked_seq >= seq

    async def _wait_for_room(self) -> None:
        while True:
            session = self._session
            if session is None or session.buffered_bytes < self._buffer_max:
                return
            await self._progress(0.5)

    async def _progress(self, wait_s: float) -> None:
        """Returns on the next acknowledgement or session change, or after `wait_s`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress_waiters.append(fut)
        # Not asyncio.wait_for: it swallows a cancellation that meets the wake-up.
        await asyncio.wait((fut,), timeout=wait_s)
        if not fut.done():
            fut.cancel()
            self._progress_waiters.remove(fut)

    def _wake_progress(self) -> None:
        waiters, self._progress_waiters = self._progress_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- safety bookkeeping (activity log, bitmaps) -----------------------------------------

    def covered(self) -> int:
        """Every guest write with a generation <= this is safe (acked or in a durable bitmap)."""
        covered = self._gen
        for gen in (self._unflushed_min, self._flushing_min):
            if gen and gen - 1 < covered:
                covered = gen - 1
        session = self.publishing
        if session is not None:
            gen = session.oldest_unacked_gen()
            if gen and gen - 1 < covered:
                covered = gen - 1
        return covered

    async def _make_room(self) -> None:
        """The activity log is full of extents not yet safe: make some safe."""
        if self._unflushed_min:
            await self._flush_bitmaps()
        else:
            await self._progress(0.5)

    async def _flush_bitmaps(self) -> None:
        async with self._bitmap_lock:
            pending = self._unflushed_min
            self._unflushed_min = 0
            self._flushing_min = pending
            try:
                await asyncio.to_thread(self._flush_all_bitmaps)
            except BaseException:
                if pending and (not self._unflushed_min or pending < self._unflushed_min):
                    self._unflushed_min = pending
                raise
            finally:
                self._flushing_min = 0

    def _flush_all_bitmaps(self) -> None:
        for disk in self.disks:
            disk.bitmap.flush()

    # -- sessions -------------------------------------------------------------------------

    async def _sessions(self) -> None:
        """Reaches the tap topic, publishes until the session ends, and again.

        Attempts are `reconnect_interval_s` apart, doubling (up to 30 s) while they
        keep failing: a session that ends within a minute counts as a failure too, so a
        cluster that accepts connections but refuses every frame is not hammered.
        """
        interval = self.settings.reconnect_interval_s
        failures = 0
        while not self._stopping:
            try:
                conn = await self._topic.connect()
            except (KafkaError, OSError, ValueError) as exc:
                failures += 1
                self.last_error = f"cannot reach the tap topic: {exc}"
                level = logging.WARNING if failures == 1 or failures % 30 == 0 else logging.DEBUG
                log.log(level, "VM %s: %s (attempt %d)", self.vm_id, self.last_error, failures)
                await asyncio.sleep(backoff_delay(interval, failures))
                continue
            started = time.monotonic()
            clean = False
            try:
                if self._stopping:
                    clean = True
                    return
                clean = await self._publish(conn)
            except EpochNotSaved as exc:
                # This session never began; the next attempt may find room again.
                self.last_error = f"cannot start publishing: {exc}"
                log.error("VM %s: %s", self.vm_id, self.last_error)
            finally:
                # A producer that failed must not live on: its sender would keep retrying
                # and could land old frames after the next session read the topic's tail.
                if clean:
                    await conn.close(self.settings.kafka_request_timeout_s)
                else:
                    await conn.abort()
            failures = failures + 1 if time.monotonic() - started < 60 else 0
            if not self._stopping:
                await asyncio.sleep(backoff_delay(interval, failures))

    async def _publish(self, conn: TopicSession) -> bool:
        """Publishes through `conn` until the session ends; True if it ended with
        everything acknowledged."""
        try:
            epoch = self.state.next_epoch(after=conn.last_epoch)
        except OSError as exc:
            raise EpochNotSaved(f"the state directory refused the new epoch: {exc}") from exc
        last = conn.last_seq
        if last < self._saved_seq:
            # Retention emptied the topic (or a stale frame is its last): numbers up to
            # the saved one were given out, and must never be given again.
            log.warning(
                "VM %s: tap topic ends at seq %d; continuing after seq %d from the local state",
                self.vm_id,
                last,
                self._saved_seq,
            )
            last = self._saved_seq
        self.epoch = epoch
        self._next_seq = last + 1
        self._acked_seq = last
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._session_ended = ended
        session = PublishSession(
            conn,
            vm_id=self.vm_id,
            epoch=epoch,
            frame_max_bytes=self._frame_max,
            linger_s=self.settings.linger_ms / 1000,
            on_acked=self._acked,
            on_failed=lambda exc: self._session_failed(session, exc),
            on_frame=self._frame_acked,
        )
        session.acked_seq = last
        self._session = session
        session.start()
        self.emit(session, _MARKER, 0, 0, 0, marker=MarkerKind.EPOCH_START, marker_id=epoch)
        self.last_error = ""
        log.info("VM %s: publishing, epoch %d, from seq %d", self.vm_id, epoch, last + 1)
        if any(disk.bitmap.any() for disk in self.disks):
            self._start_resync(session)
        self._wake_progress()
        await ended
        return session.all_acked()

    def _acked(self, seq: int) -> None:
        self._acked_seq = seq
        if self._draining is not None:
            self._resume()
        if self._progress_waiters:
            self._wake_progress()

    def _frame_acked(self, size: int, latency: float) -> None:
        self.stats.frames += 1
        self.stats.frame_bytes += size
        if self._on_frame_acked is not None:
            self._on_frame_acked(self.vm_id, size, latency)

    def _session_failed(self, session: PublishSession, exc: BaseException) -> None:
        if self.publishing is not session:
            return
        self._session = None
        self._draining = None
        unacked_gen = session.oldest_unacked_gen()
        marked = 0
        for index, offset, length in session.unacked_regions():
            self.disks[index].bitmap.mark(offset, length)
            marked += 1
        if unacked_gen and (not self._unflushed_min or unacked_gen < self._unflushed_min):
            self._unflushed_min = unacked_gen
        self._abandon_resync()
        if not self._stopping:
            self.stats.outages += 1
            self.last_error = f"publishing stopped: {exc}"
            log.warning(
                "VM %s: publishing stopped (%s); tracking dirty regions (%d unacknowledged "
                "records marked dirty)",
                self.vm_id,
                exc,
                marked,
            )
        ended = self._session_ended
        if ended is not None and not ended.done():
            ended.set_result(None)
        self._wake_progress()
        self._in_background(session.close())

    # -- resync ---------------------------------------------------------------------------

    def _abandon_resync(self) -> None:
        """Stops the resync under way for good: its bracket never ends and every bit stays
        for the next one. Abandoned, not only cancelled: a cancellation can be lost
        (asyncio.wait_for swallows one that meets the wake-up it waits for). Also one
        whose task has not started yet (its RESYNC_START filled the buffer)."""
        resync = self.resync
        if resync is not None and not resync.finished:
            resync.abandon()
        task = self._resync_task
        if task is not None and not task.done():
            task.cancel()
        self.bracket_open = False
        for disk in self.disks:
            disk.bitmap.abandon_snapshot()

    def _resync_if_idle(self) -> None:
        """Starts a resync of what is marked when publishing and none is under way (one
        under way takes it on: marks made meanwhile survive it and start the next one)."""
        session = self._session
        task = self._resync_task
        if session is not None and (task is None or task.done()):
            self._start_resync(session)

    def _start_resync(self, session: PublishSession) -> None:
        if self._stopping:
            return  # a stop drains what is published; the marks wait for the next start
        full = self.state.full_sync_pending
        chunk = min(self.settings.resync_chunk_bytes, self._frame_max)
        resync = Resync(self, session, full=full, chunk_bytes=chunk)
        # Current before its RESYNC_START is numbered: an overflow on that very record
        # must abandon this bracket (and drop only its own records), not the last one.
        self.resync = resync
        resync.open()
        if resync.abandoned:
            return  # the resync after the drain takes its bits
        requests = self._full_sync_requests
        self._resync_task = asyncio.create_task(
            self._run_resync(resync, session, full, requests), name=f"resync-{self.vm_id}"
        )

    async def _run_resync(
        self, resync: Resync, session: PublishSession, full: bool, requests: int
    ) -> None:
        try:
            completed = await resync.run()
        except (StorageError, OSError) as exc:
            log.error("VM %s: resync failed reading the source: %s", self.vm_id, exc)
            session.fail(SessionFailed(f"resync failed: {exc}"))
            return
        if not completed or self.publishing is not session:
            return
        self.stats.resyncs_completed += 1
        self._resume_gate.resync_completed()
        if full and requests == self._full_sync_requests:
            self.state.set_full_sync(None)
        # While the session drains after an overflow, the next resync waits for `_resume`.
        if self._session is session and any(disk.bitmap.any() for disk in self.disks):
            self._start_resync(session)

    async def _cancel_resync(self) -> None:
        task = self._resync_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def request_full_sync(self) -> None:
        """Resends every allocated block of every disk, in one resync bracket."""
        self._full_sync_requests += 1
        self.state.set_full_sync("requested")
        for disk in self.disks:
            disk.bitmap.mark_all()
        await asyncio.to_thread(self._flush_all_bitmaps)
        self.state.set_full_sync("marked")
        self._resync_if_idle()
        log.info("VM %s: full sync requested", self.vm_id)

    # -- housekeeping ---------------------------------------------------------------------

    def _in_background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Runs `work` as a task that a stop waits for (up to 5 s) before closing."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _write_back(self) -> None:
        # Measured end to end at 20 MB/s: the first 30 s expiry wrote 600 MB of the
        # source disk back in 1.2 s, and the applier's fsyncs waited behind it (RPO 600 ms).
        # A burst is left to the kernel: flushing a gigabyte a second filled the disk's
        # queue, and the activity log's commits, which writes to cold extents wait for,
        # waited behind it (1 MiB sequential writes: 128 MB/s instead of 1242).
        interval = self.settings.writeback_interval_s
        limit = self.settings.writeback_max_bytes
        stats = self.stats
        flushed = stats.changed_bytes
        while True:
            await asyncio.sleep(interval)
            changed = stats.changed_bytes - flushed
            if not changed:
                continue
            flushed += changed
            if changed > limit:
                continue
            for disk in self.disks:
                # Shielded: a stop waits for a flush under way before it closes the disks.
                flush = self._in_background(asyncio.to_thread(disk.backend.flush))
                try:
                    await asyncio.shield(flush)
                except OSError as exc:
                    # Pages the guest wrote did not reach the disk, and the kernel reports
                    # that to one fsync only: this one. Kept for the guest's next flush.
                    disk.flush_error = exc
                    log.error(
                        "VM %s: writing disk %s back failed (the guest's next flush will fail): %s",
                        self.vm_id,
                        disk.name,
                        exc,
                    )
            stats.writebacks += 1

    async def _housekeeping(self) -> None:
        retire_every = self.settings.retire_interval_s
        outage_timeout = self.settings.outage_timeout_s
        heartbeat_every = self.settings.heartbeat_interval_s
        next_retire = time.monotonic() + retire_every
        quiet_since, seen_seq = time.monotonic(), self._next_seq
        while True:
            await asyncio.sleep(min(_HOUSEKEEPING_TICK_S, heartbeat_every or _HOUSEKEEPING_TICK_S))
            session = self.publishing
            if session is not None and session.oldest_unacked_age() > outage_timeout:
                session.fail(AckOverdue(f"no acknowledgement for {outage_timeout:.0f}s"))
            now = time.monotonic()
            self._resume_gate.sample(now, self.stats.write_bytes)
            if self._draining is not None:
                self._resume()
            if self._next_seq != seen_seq:
                quiet_since, seen_seq = now, self._next_seq
            elif heartbeat_every and now - quiet_since >= heartbeat_every:
                self._heartbeat()
                quiet_since, seen_seq = now, self._next_seq
            if now >= next_retire:
                next_retire = now + retire_every
                try:
                    if self._unflushed_min and self._session is not None:
                        # Marks made inside a resync bracket: durable, they let the
                        # activity log retire those extents.
                        await self._flush_bitmaps()
                    self._al.retire_idle()
                    await self._al.sync_retirements()
                    await self._save_acked_seq()
                except OSError as exc:
                    # Retiring is an optimisation: a failure costs a larger resync later.
                    log.error("VM %s: activity log housekeeping failed: %s", self.vm_id, exc)
