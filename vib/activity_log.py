"""The activity log: which extents of a VM's disks may hold writes not yet safe elsewhere.

DRBD's idea. Before the tap writes a guest write to the source disk, the extents it
touches must be "hot" in a small persistent table. A write to an extent that is already
hot costs nothing; a write to a cold extent first makes the extent hot durably (pwrite of
one 4 KiB transaction plus fdatasync). An extent stops being needed once every write in
it is safe: acknowledged by Kafka, or recorded in the durable dirty bitmap. After a
SIGKILL or a host crash, the hot extents name every region that may differ from what
Kafka holds, and the tap resyncs them.

File layout: a ring of `RING_RECORDS` transaction records of 4096 bytes each. A record
carries up to 64 slot changes and, so that a ring of bounded size always describes the
whole table, one slice of 256 slots of the full table as it stands after the
transaction (DRBD's "context"). Replaying the valid records in transaction order
rebuilds the table. A torn record fails its CRC32C and is skipped; that is safe because a
record that makes an extent hot is durable before the guest's data is written.

Retirement is lazy: slots whose writes are covered are reused when a new extent needs a
slot, and idle covered slots are cleared by a periodic `retire_idle()` whose record is
written without fdatasync (losing it only means resyncing a little more after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import crc32c

from vib._fast_writes import FastWrites

log = logging.getLogger(__name__)

RECORD_SIZE = 4096
RING_RECORDS = 32
MAGIC = 0x4C41_4D44  # "DMAL" little-endian
VERSION = 1
MAX_UPDATES = 64
CONTEXT_SLOTS = 256
# The ring must always describe the whole table: each record carries one context slice,
# so the RING_RECORDS records on disk cover at most this many slots. With more, a hot
# slot's last update can be overwritten before its slice is written again, and a crash
# then forgets the extent (its writes would never be resynced).
MAX_SLOTS = RING_RECORDS * CONTEXT_SLOTS
# Records written without fdatasync (retirements) in a row before they are synced: more
# than a ring's worth could leave, after a host crash, a disk image where none names an
# extent still hot.
_MAX_UNSYNCED = RING_RECORDS // 2
EMPTY_DISK = 0xFFFF

# magic, version, n_updates, txn, context_start, n_context, total_slots, extent_size, crc
_HEADER = struct.Struct("<IHHQHHHxxIxxxxI")
_UPDATE = struct.Struct("<HHQ")  # slot, disk, extent index
_CONTEXT_ENTRY_SIZE = 10  # disk u16, extent index u64
assert _HEADER.size == 36
_BODY_SIZE = MAX_UPDATES * _UPDATE.size + CONTEXT_SLOTS * _CONTEXT_ENTRY_SIZE
assert _HEADER.size + _BODY_SIZE <= RECORD_SIZE

_DISK_SHIFT = 48
_INDEX_MASK = (1 << _DISK_SHIFT) - 1


class ActivityLogError(OSError):
    """The activity log file cannot be used (wrong format, I/O error)."""


@dataclass(frozen=True, slots=True)
class HotExtent:
    """An extent found hot when the log was opened: it must be resynced."""

    disk: int
    offset: int
    length: int


class Slot:
    """One hot extent. The write path sets `last_gen` and `tick` (see `hot_slot`)."""

    __slots__ = ("committed", "index", "last_gen", "pins", "tick", "waiters")

    def __init__(self) -> None:
        self.index = -1
        self.committed = False
        self.pins = 0
        self.last_gen = 0
        self.tick = 0
        self.waiters: list[asyncio.Future[None]] = []


class ActivityLog:
    """The hot-extent table of one VM, persisted in one small file.

    Writes call `begin_write` (returns None when every touched extent is already hot,
    otherwise an awaitable that completes once they are durably hot), then
    `end_write(..., gen)` after the write was applied and given its local generation
    number, or `abort_write` if it failed. `covered()` (from the caller) returns the
    highest generation g such that every write with generation <= g is safe; when no
    slot can be reused, `make_room()` (from the caller) is awaited: it waits for Kafka
    acknowledgements or makes the dirty bitmap durable.
    """

    def __init__(
        self,
        path: Path,
        *,
        extent_size: int = 4 << 20,
        slots: int = 1024,
        covered: Callable[[], int],
        make_room: Callable[[], Awaitable[None]],
    ) -> None:
        if extent_size <= 0 or extent_size & (extent_size - 1):
            raise ValueError(f"extent size must be a power of two, got {extent_size}")
        if not 0 < slots <= MAX_SLOTS:
            raise ValueError(f"activity log slots must be 1..{MAX_SLOTS}, got {slots}")
        self.path = path
        self.extent_size = extent_size
        self.slots = slots
        self._shift = extent_size.bit_length() - 1
        self._covered = covered
        self._make_room = make_room
        self._hot: dict[int, Slot] = {}
        self._table: list[int | None] = [None] * slots  # slot index -> key
        self._free: list[int] = []
        self._queue: list[int] = []
        self._commit_task: asyncio.Task[None] | None = None
        self._txn = 0
        self._next_record = 0
        self._context_cursor = 0
        self._unsynced = 0
        self.tick = 0  # advanced by retire_idle(); writes stamp their slot with it
        self._closed = False
        self.commits = 0  # transactions made durable with fdatasync
        self._fd = -1
        self.recovered: list[HotExtent] = []

    # -- opening -----------------------------------------------------------------------

    def open(self) -> list[HotExtent]:
        """Opens (or creates) the file; returns the extents that were hot in it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            raw = os.pread(self._fd, RECORD_SIZE * RING_RECORDS, 0)
        except OSError as exc:
            raise ActivityLogError(exc.errno, f"activity log {self.path}: {exc.strerror}") from exc
        self.recovered = self._recover(raw)
        self._free = list(range(self.slots - 1, -1, -1))
        if self.recovered:
            log.info("activity log %s: %d hot extents to resync", self.path, len(self.recovered))
        return self.recovered

    def reset(self) -> None:
        """Forgets every hot extent, durably (call once the recovered ones are safe)."""
        self._table = [None] * self.slots
        self._hot.clear()
        self._free = list(range(self.slots - 1, -1, -1))
        for _ in range(self._context_records()):
            self._store_record(*self._encode_record([]))
        self._sync()
        self.recovered = []

    def _recover(self, raw: bytes) -> list[HotExtent]:
        records: list[tuple[int, int, memoryview]] = []  # txn, record position, body
        view = memoryview(raw)
        for position in range(len(raw) // RECORD_SIZE):
            rec = view[position * RECORD_SIZE : (position + 1) * RECORD_SIZE]
            parsed = self._parse(rec)
            if parsed is not None:
                records.append((parsed, position, rec))
        if not records:
            return []
        records.sort()
        extent_size_on_disk = 0
        table: dict[int, tuple[int, int]] = {}
        for _, _, rec in records:
            (_, _, n_updates, _, ctx_start, n_ctx, _, extent_size, _) = _HEADER.unpack_from(rec)
            extent_size_on_disk = extent_size
            base = _HEADER.size + MAX_UPDATES * _UPDATE.size
            ctx = struct.unpack_from("<" + "HQ" * n_ctx, rec, base)
            for i in range(n_ctx):
                disk, index = ctx[2 * i], ctx[2 * i + 1]
                if disk == EMPTY_DISK:
                    table.pop(ctx_start + i, None)
                else:
                    table[ctx_start + i] = (disk, index)
            for i in range(n_updates):
                slot, disk, index = _UPDATE.unpack_from(rec, _HEADER.size + i * _UPDATE.size)
                if disk == EMPTY_DISK:
                    table.pop(slot, None)
                else:
                    table[slot] = (disk, index)
        last_txn, last_position, _ = records[-1]
        self._txn = last_txn + 1
        self._next_record = (last_position + 1) % RING_RECORDS
        hot = sorted(set(table.values()))
        return [HotExtent(d, i * extent_size_on_disk, extent_size_on_disk) for d, i in hot]

    @staticmethod
    def _parse(rec: memoryview) -> int | None:
        magic, version, n_updates, txn, _, n_ctx, _, extent_size, crc = _HEADER.unpack_from(rec)
        if magic != MAGIC:
            return None
        body_crc = crc32c.crc32c(rec[_HEADER.size :])
        header_crc = crc32c.crc32c(rec[: _HEADER.size - 4], body_crc)
        if header_crc != crc:
            log.warning("activity log record %d has a bad checksum; skipped", txn)
            return None
        if version != VERSION or n_updates > MAX_UPDATES or n_ctx > CONTEXT_SLOTS:
            raise ActivityLogError(0, f"activity log record {txn}: unsupported version {version}")
        if extent_size <= 0:
            return None
        return int(txn)

    # -- the write path ----------------------------------------------------------------

    def hot_slot(self, disk: int, offset: int, length: int) -> Slot | None:
        """The fast path: the slot of a write that stays inside one hot extent.

        A caller that gets a slot applies its write with no await in between (so the
        slot cannot be reused meanwhile), then sets `slot.last_gen = gen` and
        `slot.tick = log.tick`. Otherwise (None) it uses begin_write/end_write.
        """
        shift = self._shift
        first = offset >> shift
        if (offset + length - 1) >> shift != first:
            return None
        slot = self._hot.get((disk << _DISK_SHIFT) | first)
        if slot is not None and slot.committed:
            return slot
        return None

    def fast_writes(self, disk: int, fd: int, size: int) -> FastWrites:
        """The C write path of one disk (vib/_fast_writes.c), over this log's hot extents:
        it takes the way `hot_slot` offers and stamps the slot as its callers do."""
        return FastWrites(
            fd=fd,
            disk=disk,
            size=size,
            hot=self._hot,
            extent_shift=self._shift,
            disk_shift=_DISK_SHIFT,
        )

    def begin_write(self, disk: int, offset: int, length: int) -> Awaitable[None] | None:
        """Pins the extents of a write; returns an awaitable only if one must become hot."""
        shift = self._shift
        first = offset >> shift
        last = (offset + max(length, 1) - 1) >> shift
        hot = self._hot
        missing: list[Slot] = []
        for index in range(first, last + 1):
            key = (disk << _DISK_SHIFT) | index
            slot = hot.get(key)
            if slot is None:
                slot = Slot()
                hot[key] = slot
                self._queue.append(key)
            slot.pins += 1
            if not slot.committed:
                missing.append(slot)
        if not missing:
            return None
        return self._wait_hot(missing)

    async def _wait_hot(self, missing: list[Slot]) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for slot in missing:
            fut: asyncio.Future[None] = loop.create_future()
            slot.waiters.append(fut)
            futures.append(fut)
        if self._commit_task is None or self._commit_task.done():
            self._commit_task = asyncio.create_task(self._commit_loop(), name="activity-log")
        for fut in futures:
            await fut

    def end_write(self, disk: int, offset: int, length: int, gen: int) -> None:
        """Unpins the extents of a write applied with local generation `gen`."""
        shift = self._shift
        first = offset >> shift
        last = (offset + max(length, 1) - 1) >> shift
        tick = self.tick
        for index in range(first, last + 1):
            slot = self._hot[(disk << _DISK_SHIFT) | index]
            slot.pins -= 1
            slot.last_gen = gen
            slot.tick = tick

    def abort_write(self, disk: int, offset: int, length: int) -> None:
        """Unpins the extents of a write that did not happen (it failed)."""
        shift = self._shift
        first = offset >> shift
        last = (offset + max(length, 1) - 1) >> shift
        for index in range(first, last + 1):
            slot = self._hot.get((disk << _DISK_SHIFT) | index)
            if slot is not None:
                slot.pins -= 1

    # -- committing ----------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        try:
            while self._queue and not self._closed:
                batch = self._queue[:MAX_UPDATES]
                del self._queue[: len(batch)]
                while len(self._free) < len(batch):
                    if not self._evict(len(batch) - len(self._free)):
                        await self._make_room()
                        if self._closed:
                            raise ActivityLogError(0, "activity log closed")
                updates = []
                for key in batch:
                    index = self._free.pop()
                    self._table[index] = key
                    self._hot[key].index = index
                    updates.append((index, key))
                # Numbered and encoded here, on the loop (retire_idle writes records
                # too); only the I/O runs in the thread.
                record = self._encode_record(updates)
                unsynced = self._unsynced
                await asyncio.to_thread(self._store_record, *record, sync=True)
                self._unsynced -= unsynced  # those written before it are synced with it
                self.commits += 1
                for key in batch:
                    slot = self._hot[key]
                    slot.committed = True
                    for fut in slot.waiters:
                        if not fut.done():
                            fut.set_result(None)
                    slot.waiters.clear()
        except BaseException as exc:
            self._fail_waiters(exc)
            raise

    def _fail_waiters(self, exc: BaseException) -> None:
        # Extents that never became durably hot are forgotten, so that a later write to
        # them queues them again instead of waiting for a commit that will not come.
        error = exc if isinstance(exc, Exception) else ActivityLogError(0, "activity log stopped")
        for key in [k for k, slot in self._hot.items() if not slot.committed]:
            slot = self._hot.pop(key)
            for fut in slot.waiters:
                if not fut.done():
                    fut.set_exception(error)
            if slot.index >= 0:
                self._table[slot.index] = None
                self._free.append(slot.index)
        self._queue.clear()

    def _evict(self, wanted: int) -> bool:
        """Frees up to `wanted` slots holding covered, unpinned extents (least recently
        written first)."""
        covered = self._covered()
        candidates = [
            (slot.tick, key)
            for key, slot in self._hot.items()
            if slot.committed and slot.pins == 0 and slot.last_gen <= covered
        ]
        candidates.sort()
        for _, key in candidates[:wanted]:
            slot = self._hot.pop(key)
            self._table[slot.index] = None
            self._free.append(slot.index)
        return len(candidates) >= wanted

    def retire_idle(self) -> int:
        """Clears covered extents not written since the previous call (no fdatasync here:
        `sync_retirements` syncs them, off the event loop, before they could fill the ring)."""
        covered = self._covered()
        previous_tick = self.tick
        self.tick += 1
        victims = [
            key
            for key, slot in self._hot.items()
            if slot.committed
            and slot.pins == 0
            and slot.last_gen <= covered
            and slot.tick < previous_tick
        ]
        if not victims:
            return 0
        updates: list[tuple[int, int | None]] = []
        for key in victims:
            slot = self._hot.pop(key)
            self._table[slot.index] = None
            self._free.append(slot.index)
            updates.append((slot.index, None))
        for start in range(0, len(updates), MAX_UPDATES):
            self._store_record(*self._encode_record(updates[start : start + MAX_UPDATES]))
            self._unsynced += 1
        return len(victims)

    async def sync_retirements(self) -> None:
        """Once unsynced retirement records could make up half the ring, fdatasync them
        (in a thread: the event loop serves every VM's I/O)."""
        unsynced = self._unsynced
        if unsynced < _MAX_UNSYNCED:
            return
        await asyncio.to_thread(self._sync)
        self._unsynced -= unsynced

    # -- the file ------------------------------------------------------------------------

    def _context_records(self) -> int:
        return (self.slots + CONTEXT_SLOTS - 1) // CONTEXT_SLOTS

    def _encode_record(self, updates: Iterable[tuple[int, int | None]]) -> tuple[int, bytearray]:
        """The next transaction record (its ring position and bytes), with the context
        slice of the table as it stands now. On the event loop only: it advances the
        ring, the transaction number and the context cursor."""
        buf = bytearray(RECORD_SIZE)
        n_updates = 0
        for slot, key in updates:
            if key is None:
                _UPDATE.pack_into(buf, _HEADER.size + n_updates * _UPDATE.size, slot, EMPTY_DISK, 0)
            else:
                _UPDATE.pack_into(
                    buf,
                    _HEADER.size + n_updates * _UPDATE.size,
                    slot,
                    key >> _DISK_SHIFT,
                    key & _INDEX_MASK,
                )
            n_updates += 1
        ctx_start = self._context_cursor * CONTEXT_SLOTS
        ctx_keys = self._table[ctx_start : ctx_start + CONTEXT_SLOTS]
        self._context_cursor = (self._context_cursor + 1) % self._context_records()
        flat: list[int] = []
        for key in ctx_keys:
            if key is None:
                flat += (EMPTY_DISK, 0)
            else:
                flat += (key >> _DISK_SHIFT, key & _INDEX_MASK)
        struct.pack_into(
            "<" + "HQ" * len(ctx_keys), buf, _HEADER.size + MAX_UPDATES * _UPDATE.size, *flat
        )
        body_crc = crc32c.crc32c(memoryview(buf)[_HEADER.size :])
        _HEADER.pack_into(
            buf,
            0,
            MAGIC,
            VERSION,
            n_updates,
            self._txn,
            ctx_start,
            len(ctx_keys),
            self.slots,
            self.extent_size,
            0,
        )
        crc = crc32c.crc32c(memoryview(buf)[: _HEADER.size - 4], body_crc)
        struct.pack_into("<I", buf, _HEADER.size - 4, crc)
        position = self._next_record
        self._next_record = (position + 1) % RING_RECORDS
        self._txn += 1
        return position, buf

    def _store_record(self, position: int, buf: bytearray, *, sync: bool = False) -> None:
        """Writes an encoded record (in a thread, or inline for the unsynced ones)."""
        try:
            os.pwrite(self._fd, buf, position * RECORD_SIZE)
            if sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise ActivityLogError(exc.errno, f"activity log {self.path}: {exc.strerror}") from exc

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise ActivityLogError(exc.errno, f"activity log {self.path}: {exc.strerror}") from exc

    # -- introspection and shutdown --------------------------------------------------------

    @property
    def hot_count(self) -> int:
        return len(self._hot)

    async def close(self) -> None:
        self._closed = True
        task = self._commit_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ActivityLogError):
                await task
        self._fail_waiters(ActivityLogError(0, "activity log closed"))
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
