"""What a tap restart takes from the tap topic and from its state directory: numbers and
epochs that never go back (guarantee 1), and a tap that starts and keeps trying whatever
its state directory says (it serves every VM's guest); and a huge trim that does not
hold up the other writes.

The topic is in memory (tests/tap_helpers.HeldTopic): these are states the topic or the
directory can be in (emptied by retention, restored from a backup, unwritable), which a
broker cannot be put into on demand. The restarts against a real broker, killed with
SIGKILL, are in tests/test_tap_crash.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from tap_helpers import HeldTopic, MiB, held_tap, source_disk, wait_until

from datapath.journal import MarkerKind, decode_frame
from vib.tap_state import TapState
from vib.vm_tap import Mode


def epoch_starts(topic: HeldTopic) -> list[tuple[int, int]]:
    """(seq, epoch) of every EPOCH_START marker in the topic."""
    return [
        (record.seq, record.marker_id)
        for frame in map(decode_frame, topic.frames)
        for record in frame.records
        if record.marker is MarkerKind.EPOCH_START
    ]


async def write_some(tmp_path: Path, source: Path, topic: HeldTopic, count: int) -> int:
    """A tap session that writes `count` blocks and stops cleanly; its last seq."""
    async with held_tap(tmp_path, source, MiB, topic) as tap:
        for block in range(count):
            await tap.write(tap.disks[0], block * 4096, memoryview(os.urandom(4096)), False)
        await wait_until(lambda: tap.last_seq_acked == tap.last_seq_assigned, what="acked")
        return tap.last_seq_acked


async def test_a_topic_emptied_by_retention_goes_on_after_the_last_number_given(
    tmp_path: Path,
) -> None:
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    last = await write_some(tmp_path, source, topic, 5)
    assert TapState(tmp_path / "state" / "vm-held").last_seq == last  # saved by the stop
    topic.frames.clear()  # retention: the topic holds no frame any more
    await write_some(tmp_path, source, topic, 1)
    assert epoch_starts(topic)[0][0] == last + 1


async def test_a_new_epoch_is_above_the_last_one_in_the_topic(tmp_path: Path) -> None:
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    await write_some(tmp_path, source, topic, 1)
    await write_some(tmp_path, source, topic, 1)
    (_, first), (_, second) = epoch_starts(topic)
    assert second > first
    # The state directory restored from an old backup: its epoch file says less.
    (tmp_path / "state" / "vm-held" / "epoch").write_text("1\n")
    await write_some(tmp_path, source, topic, 1)
    assert epoch_starts(topic)[-1][1] > second


async def test_an_unreadable_saved_number_does_not_keep_the_tap_from_starting(
    tmp_path: Path,
) -> None:
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    last = await write_some(tmp_path, source, topic, 2)
    (tmp_path / "state" / "vm-held" / "last_seq").write_text("")  # torn by a power cut
    await write_some(tmp_path, source, topic, 1)
    assert epoch_starts(topic)[-1][0] == last + 1  # the topic's tail is the authority


async def test_a_state_directory_that_refuses_a_new_epoch_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    real_next_epoch = TapState.next_epoch
    refusals = [OSError(28, "No space left on device")]

    def next_epoch(state: TapState, *, after: int) -> int:
        if refusals:
            raise refusals.pop()
        return real_next_epoch(state, after=after)

    monkeypatch.setattr(TapState, "next_epoch", next_epoch)
    async with held_tap(tmp_path, source, MiB, topic, reconnect_interval_s=0.05) as tap:
        assert tap.mode is Mode.LIVE
        await tap.write(tap.disks[0], 0, memoryview(os.urandom(4096)), False)
        await wait_until(lambda: tap.last_seq_acked == tap.last_seq_assigned, what="acked")
    assert not refusals


async def test_a_huge_trim_goes_in_pieces_that_let_other_writes_through(tmp_path: Path) -> None:
    size = 1536 * MiB
    source = tmp_path / "big.img"
    with source.open("wb") as f:
        f.truncate(size)
    topic = HeldTopic()
    async with held_tap(tmp_path, source, size, topic, activity_log_slots=4096) as tap:
        disk = tap.disks[0]
        trims: list[int] = []
        real_trim = disk.backend.trim

        def counting_trim(offset: int, length: int) -> None:
            trims.append(length)
            real_trim(offset, length)

        disk.backend.trim = counting_trim  # type: ignore[method-assign]
        done: list[str] = []

        async def trim() -> None:
            await tap.trim(disk, 0, size, False)
            done.append("trim")

        async def write() -> None:
            await asyncio.sleep(0)
            await tap.write(disk, size - 4096, memoryview(os.urandom(4096)), False)
            done.append("write")

        await asyncio.gather(trim(), write())
    assert max(trims) <= 256 * MiB and sum(trims) == size
    assert done == ["write", "trim"], "the write waited for the whole trim"


async def test_a_write_that_failed_half_way_is_resynced_while_the_tap_is_live(
    tmp_path: Path,
) -> None:
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    async with held_tap(tmp_path, source, MiB, topic) as tap:
        disk = tap.disks[0]
        await tap.request_full_sync()  # the target starts equal to the source
        await wait_until(lambda: not tap.dirty_bytes(), what="full sync")
        real_write = disk.write

        def half_then_fail(offset: int, data: memoryview, length: int) -> None:
            real_write(offset, data[: length // 2], length // 2)
            raise OSError(5, "Input/output error")

        disk.write = half_then_fail  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await tap.write(disk, 64 * 1024, memoryview(b"\xee" * 8192), False)
        disk.write = real_write  # type: ignore[method-assign]
        # The source changed although the guest got an error: the target must follow.
        await wait_until(
            lambda: not tap.dirty_bytes() and tap.last_seq_acked == tap.last_seq_assigned,
            what="the resync of the failed write's region",
        )
    result = topic.replay_onto(tmp_path / "target.img", MiB)
    assert result.gapless and not result.open_resyncs
    assert (tmp_path / "target.img").read_bytes() == source.read_bytes()


async def test_a_write_back_error_fails_the_guests_next_flush(tmp_path: Path) -> None:
    source, topic = source_disk(tmp_path, os.urandom(MiB)), HeldTopic()
    async with held_tap(tmp_path, source, MiB, topic, writeback_interval_s=0.05) as tap:
        disk = tap.disks[0]
        real_flush = disk.backend.flush
        failures = [OSError(5, "Input/output error")]

        def flush() -> None:
            if failures:
                raise failures.pop()
            real_flush()

        disk.backend.flush = flush  # type: ignore[method-assign]
        await tap.write(disk, 0, memoryview(os.urandom(4096)), False)
        await wait_until(lambda: not failures, what="the background write-back")
        # The kernel told that fsync only; the guest's flush must hear it, once.
        with pytest.raises(OSError):
            await tap.flush(disk)
        await tap.flush(disk)
