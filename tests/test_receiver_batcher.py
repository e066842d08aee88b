"""Cutting a tap stream into batches: contiguous, bracket-safe, gap-reporting (1, 2, 7)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.journal import MarkerKind, Record, RecordKind, encode_frame
from services.receiver.batcher import (
    BatcherLimits,
    BracketAbandoned,
    CutBatch,
    QuarantinedMessage,
    SequenceGap,
    SequenceRegression,
    VmBatcher,
)
from services.receiver.settings import ReceiverSettings
from services.receiver.worker import _IDLE_POLL_MS, Receiver

VM = "vm-a"


def write(seq: int, offset: int = 0, data: bytes = b"x" * 8, disk: int = 0) -> Record:
    return Record(RecordKind.WRITE, seq, disk, offset, len(data), 1_000 + seq, data)


def marker(seq: int, kind: MarkerKind, marker_id: int) -> Record:
    return Record(RecordKind.MARKER, seq, 0, 0, 0, 1_000 + seq, marker=kind, marker_id=marker_id)


def sync(seq: int, offset: int) -> Record:
    return Record(RecordKind.SYNC_BLOCK, seq, 0, offset, 8, 1_000 + seq, b"s" * 8)


def run(
    batcher: VmBatcher, frames: list[list[Record]], *, epoch: int = 1, first_offset: int = 0
) -> tuple[list[CutBatch], list[object], int]:
    """Feeds frames (one message each) and takes everything out, as the worker does."""
    for index, records in enumerate(frames):
        batcher.add_message(first_offset + index, encode_frame(VM, epoch, records), now=0.0)
    batcher.cut_due(now=1e9)
    outbox = batcher.take_outbox()
    if outbox is None:
        return [], [], batcher.commit_offset
    return outbox.batches, list(outbox.events), outbox.commit_offset


def apply(disk: bytearray, records: list[Record]) -> None:
    for rec in records:
        if rec.kind in (RecordKind.WRITE, RecordKind.SYNC_BLOCK):
            disk[rec.offset : rec.offset + rec.length] = bytes(rec.data)
        elif rec.kind in (RecordKind.ZERO, RecordKind.TRIM):
            disk[rec.offset : rec.offset + rec.length] = bytes(rec.length)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[list[Record]], list[float]]:
    """Frames of overlapping writes, with an arrival time per frame."""
    frames = []
    seq = 0
    for _ in range(draw(st.integers(1, 12))):
        records = []
        for _ in range(draw(st.integers(1, 6))):
            offset = draw(st.integers(0, 15)) * 8
            records.append(write(seq, offset, draw(st.binary(min_size=8, max_size=16))))
            seq += 1
        frames.append(records)
    times = sorted(draw(st.lists(st.floats(0, 2), min_size=len(frames), max_size=len(frames))))
    return frames, times


@given(streams(), st.integers(8, 200))
@settings(max_examples=150, deadline=None)
def test_batches_are_contiguous_and_unfold_to_the_raw_stream(
    stream: tuple[list[list[Record]], list[float]], max_batch_bytes: int
) -> None:
    frames, times = stream
    batcher = VmBatcher(
        VM, start_offset=0, limits=BatcherLimits(interval_s=0.5, max_batch_bytes=max_batch_bytes)
    )
    batches: list[CutBatch] = []
    for offset, (records, now) in enumerate(zip(frames, times, strict=True)):
        batcher.add_message(offset, encode_frame(VM, 1, records), now)
        batcher.cut_due(now)
        outbox = batcher.take_outbox()
        if outbox is not None:
            batches.extend(outbox.batches)
            assert not outbox.events
    batcher.cut_due(now=1e9)
    last = batcher.take_outbox()
    if last is not None:
        batches.extend(last.batches)
    assert batcher.commit_offset == len(frames)

    raw = [r for records in frames for r in records]
    seqs = [b.first_seq for b in batches] + [raw[-1].seq + 1]
    assert seqs[0] == 0
    for batch, next_first in zip(batches, seqs[1:], strict=True):
        assert batch.last_seq + 1 == next_first, "batches cover a gapless sequence"
    expected = bytearray(256)
    apply(expected, raw)
    folded = bytearray(256)
    for batch in batches:
        apply(folded, batch.folded(max_record_bytes=64).records)
    assert folded == expected


def test_a_resync_bracket_never_shares_a_batch_with_live_writes_outside_it() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    frames = [
        [write(0), write(1)],
        [write(2), marker(3, MarkerKind.RESYNC_START, 9), sync(4, 0)],  # bracket opens mid-frame
        [write(5, 8), sync(6, 16)],  # a live write inside the bracket belongs to it
        [marker(7, MarkerKind.RESYNC_END, 9), write(8)],  # and closes mid-frame
    ]
    batches, events, commit = run(batcher, frames)
    assert not events
    assert [(b.first_seq, b.last_seq, b.resync_id, b.resync_complete) for b in batches] == [
        (0, 2, 0, False),
        (3, 7, 9, True),
        (8, 8, 0, False),
    ]
    assert batches[1].records[0].marker is MarkerKind.RESYNC_START
    assert commit == 4


def test_a_bracket_larger_than_a_batch_is_marked_in_every_batch_and_closed_once() -> None:
    batcher = VmBatcher(VM, start_offset=0, limits=BatcherLimits(max_batch_bytes=16))
    frames = [[marker(0, MarkerKind.RESYNC_START, 4)]]
    frames += [[sync(seq, seq * 8)] for seq in range(1, 8)]
    frames += [[marker(8, MarkerKind.RESYNC_END, 4)]]
    batches, _, _ = run(batcher, frames)
    assert len(batches) > 2
    assert all(b.resync_id == 4 for b in batches)
    assert [b.resync_complete for b in batches] == [False] * (len(batches) - 1) + [True]


def test_the_interval_does_not_cut_inside_a_bracket() -> None:
    batcher = VmBatcher(VM, start_offset=0, limits=BatcherLimits(interval_s=0.1))
    batcher.add_message(0, encode_frame(VM, 1, [marker(0, MarkerKind.RESYNC_START, 2)]), 0.0)
    batcher.add_message(1, encode_frame(VM, 1, [sync(1, 0)]), 0.0)
    batcher.cut_due(now=100.0)
    assert batcher.take_outbox() is None
    assert batcher.commit_offset == 0, "nothing of the open bracket is committed"


def test_the_cut_deadline_is_one_interval_after_the_first_pending_record() -> None:
    batcher = VmBatcher(VM, start_offset=0, limits=BatcherLimits(interval_s=0.1))
    assert batcher.cut_deadline is None, "nothing pending, nothing to wake up for"
    batcher.add_message(0, encode_frame(VM, 1, [write(1)]), now=5.0)
    batcher.add_message(1, encode_frame(VM, 1, [write(2)]), now=5.05)
    assert batcher.cut_deadline == 5.1
    batcher.cut_due(now=5.099)
    assert not batcher.has_outbox
    batcher.cut_due(now=5.1)
    assert batcher.has_outbox and batcher.cut_deadline is None
    batcher.add_message(2, encode_frame(VM, 1, [marker(3, MarkerKind.RESYNC_START, 2)]), 5.2)
    assert batcher.cut_deadline is None, "an open bracket ends with its last record only"


def test_the_receiver_wakes_up_when_a_batch_is_due_not_at_its_next_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Binary fractions: the deadlines below are exact, not rounded floats.
    receiver = Receiver(ReceiverSettings(plan=tmp_path / "plan.yaml", batch_interval_s=0.125))
    batcher = VmBatcher(VM, start_offset=0, limits=BatcherLimits(interval_s=0.125))
    receiver._pipes = {TopicPartition("dm.tap.vm-a", 0): SimpleNamespace(batcher=batcher)}  # type: ignore[dict-item]
    monkeypatch.setattr(time, "monotonic", lambda: 10.0)
    assert receiver._poll_timeout_ms() == _IDLE_POLL_MS, "nothing pending: the usual poll"
    batcher.add_message(0, encode_frame(VM, 1, [write(1)]), now=9.90625)
    assert receiver._poll_timeout_ms() == 32, "woken when the batch is due (31.25 ms)"
    batcher.cut_due(now=10.03125)
    assert receiver._poll_timeout_ms() == 5, "a cut batch waiting to be published"
    batcher.take_outbox()
    batcher.add_message(1, encode_frame(VM, 1, [write(2)]), now=9.0)
    assert receiver._poll_timeout_ms() == 1, "overdue: at once"


def test_a_sequence_gap_is_reported_and_never_spanned_by_a_batch() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batches, events, _ = run(batcher, [[write(0), write(1)], [write(5), write(6)]])
    assert [(b.first_seq, b.last_seq) for b in batches] == [(0, 1), (5, 6)]
    assert events == [SequenceGap(VM, 1, 2, 4, offset=1)]


def test_records_already_batched_are_skipped_when_a_message_is_read_again() -> None:
    # A restart resumes at a message that was cut in the middle: seq 0..2 went out before.
    batcher = VmBatcher(VM, start_offset=10, next_seq=3)
    batches, events, commit = run(batcher, [[write(s) for s in range(5)]], first_offset=10)
    assert [(b.first_seq, b.last_seq) for b in batches] == [(3, 4)]
    assert not events
    assert batcher.counters.duplicates_skipped == 3
    assert commit == 11


def test_commit_offset_stays_on_a_message_whose_records_are_still_pending() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 1, [write(0)]), 0.0)
    batcher.add_message(
        1, encode_frame(VM, 1, [write(1), marker(2, MarkerKind.RESYNC_START, 3)]), 0.0
    )
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [(b.first_seq, b.last_seq) for b in outbox.batches] == [(0, 1)]
    assert outbox.commit_offset == 1, "message 1 still holds the pending RESYNC_START"


def test_a_corrupt_message_is_quarantined_with_its_range_and_the_stream_goes_on() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    good = encode_frame(VM, 1, [write(0)])
    bad = bytearray(encode_frame(VM, 1, [write(1), write(2)]))
    bad[-3] ^= 0xFF  # inside the last record's data: the header stays readable
    batcher.add_message(0, good, 0.0)
    batcher.add_message(1, bytes(bad), 0.0)
    batcher.add_message(2, encode_frame(VM, 1, [write(3)]), 0.0)
    batcher.cut_due(1e9)
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [(b.first_seq, b.last_seq) for b in outbox.batches] == [(0, 0), (3, 3)]
    (event,) = outbox.events
    assert isinstance(event, QuarantinedMessage)
    assert (event.offset, event.first_seq, event.last_seq) == (1, 1, 2)
    assert event.value == bytes(bad)
    assert "CRC32C" in event.error
    assert outbox.commit_offset == 3


def test_an_unreadable_message_is_quarantined_and_the_gap_reported() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 1, [write(0)]), 0.0)
    batcher.add_message(1, b"garbage", 0.0)
    batcher.add_message(2, encode_frame(VM, 1, [write(3)]), 0.0)
    outbox = batcher.take_outbox()
    assert outbox is not None
    kinds = [type(e) for e in outbox.events]
    assert kinds == [QuarantinedMessage, SequenceGap]
    gap = outbox.events[1]
    assert isinstance(gap, SequenceGap)
    assert (gap.first_seq, gap.last_seq) == (1, 2)


def test_an_epoch_change_cuts_the_batch() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 1, [write(0)]), 0.0)
    batcher.add_message(1, encode_frame(VM, 2, [write(1)]), 0.0)
    batcher.cut_due(1e9)
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [(b.epoch, b.first_seq) for b in outbox.batches] == [(1, 0), (2, 1)]


def test_a_superseded_bracket_is_left_incomplete_and_reported() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    frames = [
        [marker(0, MarkerKind.RESYNC_START, 1), sync(1, 0)],
        [marker(2, MarkerKind.RESYNC_START, 2), sync(3, 0), marker(4, MarkerKind.RESYNC_END, 2)],
    ]
    batches, events, _ = run(batcher, frames)
    assert [(b.resync_id, b.resync_complete) for b in batches] == [(1, False), (2, True)]
    assert events == [BracketAbandoned(VM, 1, 2, 2)]


def test_a_flush_only_batch_still_covers_its_range() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    flush = Record(RecordKind.FLUSH, 0, 0, 0, 0, 5)
    batches, _, _ = run(batcher, [[flush]])
    folded = batches[0].folded(max_record_bytes=1 << 20)
    assert (folded.first_seq, folded.last_seq, folded.records) == (0, 0, [])


def test_messages_fetched_before_a_seek_are_not_taken_twice() -> None:
    batcher = VmBatcher(VM, start_offset=5, next_seq=50)
    bad = b"garbage"
    for offset in range(3, 6):  # 3 and 4 lie behind the resume point
        batcher.add_message(offset, bad, 0.0)
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [e.offset for e in outbox.events if isinstance(e, QuarantinedMessage)] == [5]
    assert batcher.counters.stale_messages == 2


def test_a_newer_epoch_reusing_sequence_numbers_is_reported_and_leaves_a_hole() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 3, [write(s) for s in range(1, 6)]), 0.0)
    # The tap restarted (epoch 4) and numbered from 3 again: 3..5 were batched already,
    # so epoch 4's writes 3..5 cannot travel. Batching its 6 right after epoch 3's 5
    # would tell the applier nothing is missing: 6 is dropped too, and the batches go on
    # past a hole the applier stops at (a full resync repairs it).
    batcher.add_message(1, encode_frame(VM, 4, [write(s) for s in range(3, 9)]), 0.0)
    batcher.cut_due(1e9)
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [(b.epoch, b.first_seq, b.last_seq) for b in outbox.batches] == [(3, 1, 5), (4, 7, 8)]
    assert outbox.events == [SequenceRegression(VM, 4, 3, 3, 6, 1), SequenceGap(VM, 4, 6, 6, 1)]
    assert batcher.counters.regressed_records == 4


def test_a_regression_in_a_later_epoch_is_reported_again() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 1, [write(s) for s in range(1, 4)]), 0.0)
    batcher.add_message(1, encode_frame(VM, 2, [write(1)]), 0.0)
    batcher.add_message(2, encode_frame(VM, 3, [write(2)]), 0.0)
    outbox = batcher.take_outbox()
    assert outbox is not None
    regressions = [e for e in outbox.events if isinstance(e, SequenceRegression)]
    assert [e.epoch for e in regressions] == [2, 3]


def test_records_missing_before_a_quarantined_range_are_reported_as_a_gap() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 1, [write(1), write(2)]), 0.0)
    bad = bytearray(encode_frame(VM, 1, [write(5), write(6)]))
    bad[-3] ^= 0xFF  # its header stays readable: it says 5..6
    batcher.add_message(1, bytes(bad), 0.0)
    batcher.add_message(2, encode_frame(VM, 1, [write(7)]), 0.0)
    outbox = batcher.take_outbox()
    assert outbox is not None
    gaps = [(e.first_seq, e.last_seq) for e in outbox.events if isinstance(e, SequenceGap)]
    quarantined = [
        (e.first_seq, e.last_seq) for e in outbox.events if isinstance(e, QuarantinedMessage)
    ]
    assert gaps == [(3, 4)] and quarantined == [(5, 6)]


def test_an_older_epoch_read_again_is_a_plain_duplicate() -> None:
    batcher = VmBatcher(VM, start_offset=0, next_seq=8, epoch=4)
    batcher.add_message(0, encode_frame(VM, 3, [write(s) for s in range(1, 6)]), 0.0)
    batcher.add_message(1, encode_frame(VM, 4, [write(s) for s in range(6, 10)]), 0.0)
    batcher.cut_due(1e9)
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [(b.epoch, b.first_seq, b.last_seq) for b in outbox.batches] == [(4, 8, 9)]
    assert outbox.events == []


def test_batches_of_zeros_count_as_queued_records_though_they_carry_no_data() -> None:
    # What bounds reading while a transaction is slow: zeros and trims take memory too.
    batcher = VmBatcher(VM, start_offset=0)
    zeros = [Record(RecordKind.ZERO, seq, 0, seq * 4096, 4096, 1) for seq in range(1, 4)]
    batcher.add_message(0, encode_frame(VM, 1, zeros), 0.0)
    batcher.cut_due(1e9)
    assert (batcher.queued_bytes, batcher.queued_records) == (0, 3)


def test_a_gap_after_a_regression_is_the_hole_and_nothing_more_is_dropped() -> None:
    batcher = VmBatcher(VM, start_offset=0)
    batcher.add_message(0, encode_frame(VM, 1, [write(s) for s in range(1, 6)]), 0.0)
    # Epoch 2 numbers 3..4 again, then jumps to 8: the applier will stop at 6..7 already.
    batcher.add_message(1, encode_frame(VM, 2, [write(3), write(4), write(8), write(9)]), 0.0)
    batcher.cut_due(1e9)
    outbox = batcher.take_outbox()
    assert outbox is not None
    assert [(b.epoch, b.first_seq, b.last_seq) for b in outbox.batches] == [(1, 1, 5), (2, 8, 9)]
