"""The activity log (guarantee 3 after a crash): every extent a write may have touched
is durably hot before the write proceeds, and stays hot until its writes are safe."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vib import activity_log
from vib.activity_log import MAX_SLOTS, RECORD_SIZE, RING_RECORDS, ActivityLog, HotExtent
from vib.settings import TapSettings

EXTENT = 1 << 20


class Coverage:
    """What the tap tells the log: up to which write generation everything is safe."""

    def __init__(self) -> None:
        self.covered = 0
        self.room_requests = 0

    def __call__(self) -> int:
        return self.covered

    async def make_room(self) -> None:
        self.room_requests += 1
        await asyncio.sleep(0.01)


def open_log(path: Path, coverage: Coverage, slots: int = 64) -> ActivityLog:
    log = ActivityLog(
        path, extent_size=EXTENT, slots=slots, covered=coverage, make_room=coverage.make_room
    )
    log.open()
    return log


async def write(log: ActivityLog, disk: int, offset: int, length: int, gen: int) -> None:
    waiter = log.begin_write(disk, offset, length)
    if waiter is not None:
        await waiter
    log.end_write(disk, offset, length, gen)


def recovered(path: Path, slots: int = 4096) -> set[HotExtent]:
    """What a tap restarted after a crash finds (the old instance is never closed)."""
    return set(open_log(path, Coverage(), slots=slots).recovered)


async def test_a_cold_extent_is_durably_hot_before_the_write_proceeds(tmp_path: Path) -> None:
    path = tmp_path / "al"
    log = open_log(path, Coverage())
    waiter = log.begin_write(1, 3 * EXTENT + 100, 2 * EXTENT)  # spans three extents
    assert waiter is not None
    await waiter
    log.end_write(1, 3 * EXTENT + 100, 2 * EXTENT, 1)
    assert recovered(path) == {HotExtent(1, i * EXTENT, EXTENT) for i in (3, 4, 5)}


async def test_writes_to_hot_extents_do_not_touch_the_log(tmp_path: Path) -> None:
    path = tmp_path / "al"
    log = open_log(path, Coverage())
    await write(log, 0, 0, 4096, 1)
    commits = log.commits
    before = path.read_bytes()
    for gen in range(2, 2000):
        assert log.begin_write(0, (gen % 256) * 4096, 4096) is None
        log.end_write(0, (gen % 256) * 4096, 4096, gen)
    assert log.commits == commits
    assert path.read_bytes() == before


async def test_every_hot_extent_is_recovered_after_the_ring_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "al"
    log = open_log(path, Coverage(), slots=1000)
    extents = range(0, 900)
    for start in range(0, 900, 9):  # about a hundred transactions: the ring wraps often
        await asyncio.gather(*(write(log, 2, i * EXTENT, 4096, 1) for i in extents[start:][:9]))
    assert log.commits > RING_RECORDS
    assert recovered(path) == {HotExtent(2, i * EXTENT, EXTENT) for i in extents}


async def test_covered_idle_extents_retire_and_are_not_resynced(tmp_path: Path) -> None:
    path = tmp_path / "al"
    coverage = Coverage()
    log = open_log(path, coverage)
    for gen, extent in enumerate((1, 2, 3), start=1):
        await write(log, 0, extent * EXTENT, 4096, gen)
    coverage.covered = 2  # the write to extent 3 is not safe yet
    log.retire_idle()
    log.retire_idle()
    assert recovered(path) == {HotExtent(0, 3 * EXTENT, EXTENT)}


async def test_a_full_log_reuses_a_slot_only_once_its_writes_are_safe(tmp_path: Path) -> None:
    path = tmp_path / "al"
    coverage = Coverage()
    log = open_log(path, coverage, slots=2)
    await write(log, 0, 0, 4096, 1)
    await write(log, 0, EXTENT, 4096, 2)
    third = asyncio.create_task(write(log, 0, 2 * EXTENT, 4096, 3))
    await asyncio.sleep(0.2)
    assert not third.done(), "a slot was reused while its writes were not safe"
    assert coverage.room_requests > 0
    assert recovered(path) == {HotExtent(0, 0, EXTENT), HotExtent(0, EXTENT, EXTENT)}
    coverage.covered = 1
    await asyncio.wait_for(third, 5)
    assert recovered(path) == {HotExtent(0, EXTENT, EXTENT), HotExtent(0, 2 * EXTENT, EXTENT)}


async def test_a_torn_last_record_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "al"
    log = open_log(path, Coverage())
    await write(log, 0, 0, 4096, 1)
    await write(log, 0, 7 * EXTENT, 4096, 2)
    # The second transaction is the last record written: tear it in the middle.
    fd = os.open(path, os.O_RDWR)
    try:
        last = max(
            range(RING_RECORDS),
            key=lambda i: int.from_bytes(os.pread(fd, 8, i * RECORD_SIZE + 8), "little"),
        )
        os.pwrite(fd, os.urandom(512), last * RECORD_SIZE + 1024)
    finally:
        os.close(fd)
    assert recovered(path) == {HotExtent(0, 0, EXTENT)}


async def test_reset_forgets_everything_durably(tmp_path: Path) -> None:
    path = tmp_path / "al"
    log = open_log(path, Coverage())
    await write(log, 0, 0, 4096, 1)
    log.reset()
    assert recovered(path) == set()


def test_bad_geometry_is_refused(tmp_path: Path) -> None:
    coverage = Coverage()
    with pytest.raises(ValueError, match="power of two"):
        ActivityLog(
            tmp_path / "al", extent_size=3 << 20, covered=coverage, make_room=coverage.make_room
        )


async def test_the_largest_table_is_recovered_whole_after_the_ring_wrapped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "al"
    log = open_log(path, Coverage(), slots=MAX_SLOTS)
    for extent in range(RING_RECORDS + 9):  # one transaction each: the ring wraps
        await write(log, 0, extent * EXTENT, 4096, extent + 1)
    # Nothing is safe yet: every extent, the first one included, must come back.
    assert recovered(path, MAX_SLOTS) == {
        HotExtent(0, extent * EXTENT, EXTENT) for extent in range(RING_RECORDS + 9)
    }


def test_a_table_the_ring_cannot_describe_is_refused(tmp_path: Path) -> None:
    coverage = Coverage()
    with pytest.raises(ValueError, match="slots"):
        ActivityLog(
            tmp_path / "al", slots=MAX_SLOTS + 1, covered=coverage, make_room=coverage.make_room
        )
    with pytest.raises(ValueError, match="activity_log_slots"):
        TapSettings(plan=tmp_path / "plan.yaml", activity_log_slots=MAX_SLOTS + 1)


async def test_retirements_are_synced_before_they_could_wrap_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "al"
    coverage = Coverage()
    log = open_log(path, coverage, slots=2048)
    hot = 1100  # retiring them all takes more records than half the ring
    await asyncio.gather(*(write(log, 0, i * EXTENT, 4096, 1) for i in range(hot)))
    coverage.covered = 1
    syncs = []
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        syncs.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(activity_log.os, "fdatasync", counting_fdatasync)
    log.retire_idle()
    assert log.retire_idle() == hot
    assert not syncs  # none on the event loop
    await log.sync_retirements()  # what the tap's housekeeping does next
    assert syncs, "a ring's worth of retirements went unsynced"
    syncs.clear()
    await log.sync_retirements()
    assert not syncs, "synced again with nothing new to sync"
    assert recovered(path, 2048) == set()
