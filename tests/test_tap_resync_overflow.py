"""A full buffer at the worst moments of a resync: on its RESYNC_START itself, and in the
middle of one chunk's records. Whatever the guest wrote and was told is written must
reach the topic or stay marked dirty, and no resync record may travel outside a bracket
(guarantees 3 and 4).

The tap topic here is in memory and its sends can be held (a broker that stopped
answering), so the buffer fills to the exact byte these races need; what the topic
received is then replayed onto a file, as the target would apply it, and compared with
the source disk."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tap_helpers import HELD_BUFFER, HeldTopic, MiB, held_tap, source_disk, wait_until

from datapath.journal import RECORD_HEADER_SIZE, MarkerKind, RecordKind, decode_frame
from vib.vm_tap import Mode, TapDisk, VmTap


async def fill_to_just_below(tap: VmTap, disk: TapDisk, offset: int, room: int) -> list[int]:
    """Guest writes (acknowledged, as the NBD server would) until the buffer is `room`
    bytes short of full; their offsets."""
    session = tap.session
    assert session is not None
    offsets = []
    piece = 32 * 1024
    while (left := HELD_BUFFER - session.buffered_bytes - room) > 0:
        size = min(piece, left - RECORD_HEADER_SIZE)
        if size <= 0:
            break
        await tap.write(disk, offset, memoryview(os.urandom(size)), False)
        offsets.append(offset)
        offset += piece
    return offsets


async def settle(tap: VmTap, topic: HeldTopic) -> None:
    topic.release()
    await wait_until(
        lambda: (
            tap.mode is Mode.LIVE
            and not tap.dirty_bytes()
            and tap.last_seq_acked == tap.last_seq_assigned
            and (tap.resync is None or tap.resync.state in ("complete", "abandoned"))
        ),
        what="drained, resynced and live",
    )


def resync_records_outside_brackets(topic: HeldTopic) -> list[int]:
    outside, bracket = [], 0
    for frame in topic.frames:
        for record in decode_frame(frame).records:
            if record.marker is MarkerKind.RESYNC_START:
                bracket = record.marker_id
            elif record.marker is MarkerKind.RESYNC_END:
                bracket = 0
            elif record.kind is RecordKind.SYNC_BLOCK and not bracket:
                outside.append(record.seq)
    return outside


async def test_a_resync_start_that_fills_the_buffer_loses_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    source = source_disk(tmp_path, os.urandom(4 * MiB))
    topic = HeldTopic()
    async with held_tap(tmp_path, source, 4 * MiB, topic) as tap:
        disk = tap.disks[0]
        # A resync that completes, so the tap's last one is a finished bracket.
        await tap.request_full_sync()
        await settle(tap, topic)
        topic.hold()
        # Live writes, outside any bracket, up to one marker short of a full buffer.
        written = await fill_to_just_below(tap, disk, 2 * MiB, RECORD_HEADER_SIZE - 10)
        assert written and tap.mode is Mode.LIVE
        # Bits left over when a resync ends start the next one at once (the end of
        # `_run_resync`); its RESYNC_START is the record that overflows the buffer.
        disk.bitmap.mark(3 * MiB, 4096)
        tap._start_resync(tap.session)  # type: ignore[arg-type]
        assert tap.mode is Mode.TRACKING
        # A guest write while the session drains: only the bitmap names it.
        await tap.write(disk, 0, memoryview(b"w" * 4096), False)
        await settle(tap, topic)
        result = topic.replay_onto(tmp_path / "target.img", 4 * MiB)
    assert result.gapless and not result.open_resyncs
    assert (tmp_path / "target.img").read_bytes() == source.read_bytes()
    assert resync_records_outside_brackets(topic) == []


async def test_a_resync_chunk_that_fills_the_buffer_stops_at_the_record_that_did(
    tmp_path: Path,
) -> None:
    # 4 KiB blocks of data and zeros in turn: every chunk of the resync is many records.
    block = 4096
    pattern = b"".join(os.urandom(block) if i % 2 else bytes(block) for i in range(16))
    source = source_disk(tmp_path, pattern * 32)  # 2 MiB
    topic = HeldTopic()
    async with held_tap(
        tmp_path,
        source,
        len(pattern) * 32,
        topic,
        bitmap_granularity=block,
        resync_max_bytes_per_s=256 * 1024,
    ) as tap:
        disk = tap.disks[0]
        topic.hold()
        # A frame whose send hangs: nothing is framed behind it, RESYNC_START included.
        await tap.write(disk, MiB - 4096, memoryview(os.urandom(block)), False)
        await asyncio.sleep(0.05)
        await tap.request_full_sync()
        # Paced, it waits 0.25 s before it reads its first chunk; it has room now.
        await wait_until(lambda: bool(tap.resync and tap.resync.marker_id), what="start")
        await asyncio.sleep(0.05)
        # Guest writes leave less room than that chunk's records take.
        await fill_to_just_below(tap, disk, MiB, 2 * RECORD_HEADER_SIZE + 16 * 1024)
        await wait_until(lambda: tap.mode is Mode.TRACKING, what="the resync's overflow")
        assert tap.stats.overflows == 1 and tap.stats.outages == 0
        await settle(tap, topic)
        result = topic.replay_onto(tmp_path / "target.img", len(pattern) * 32)
    assert result.gapless and not result.open_resyncs
    assert resync_records_outside_brackets(topic) == []
    assert (tmp_path / "target.img").read_bytes() == source.read_bytes()
