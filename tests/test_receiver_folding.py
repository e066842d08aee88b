"""Folding a batch must not change what applying it does (guarantees 1 and 2)."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.journal import MarkerKind, Record, RecordKind
from services.receiver.folding import fold_records, fold_stats

DISK_SIZE = 512
ZEROED = 256  # model values beside the 256 byte values: zeroed and trimmed are distinct
TRIMMED = 257


def apply(disks: dict[int, list[int]], records: list[Record]) -> None:
    """The reference model: apply records one by one, in order."""
    for rec in records:
        disk = disks.setdefault(rec.disk, [0] * DISK_SIZE)
        end = rec.offset + rec.length
        if rec.kind in (RecordKind.WRITE, RecordKind.SYNC_BLOCK):
            assert len(rec.data) == rec.length
            disk[rec.offset : end] = bytes(rec.data)
        elif rec.kind is RecordKind.ZERO:
            disk[rec.offset : end] = [ZEROED] * rec.length
        elif rec.kind is RecordKind.TRIM:
            disk[rec.offset : end] = [TRIMMED] * rec.length


@st.composite
def raw_batches(draw: st.DrawFn) -> list[Record]:
    count = draw(st.integers(min_value=0, max_value=60))
    records = []
    for seq in range(100, 100 + count):
        kind = draw(
            st.sampled_from(
                [RecordKind.WRITE] * 4
                + [RecordKind.SYNC_BLOCK, RecordKind.ZERO, RecordKind.TRIM, RecordKind.FLUSH]
                + [RecordKind.MARKER]
            )
        )
        ts = 1_000 + seq * 7
        if kind is RecordKind.FLUSH:
            records.append(Record(kind, seq, 0, 0, 0, ts))
            continue
        if kind is RecordKind.MARKER:
            records.append(
                Record(kind, seq, 0, 0, 0, ts, marker=MarkerKind.RESYNC_START, marker_id=5)
            )
            continue
        disk = draw(st.integers(min_value=0, max_value=2))
        # Offsets on a coarse grid plus a fine jitter: many exact, partial and nested overlaps.
        offset = draw(st.integers(min_value=0, max_value=DISK_SIZE // 16 - 1)) * 16
        offset += draw(st.sampled_from([0, 0, 0, 1, 5]))
        length = draw(st.integers(min_value=0, max_value=min(96, DISK_SIZE - offset)))
        data: bytes = b""
        if kind in (RecordKind.WRITE, RecordKind.SYNC_BLOCK):
            data = draw(st.binary(min_size=length, max_size=length))
        records.append(Record(kind, seq, disk, offset, length, ts, data))
    return records


@given(raw_batches(), st.sampled_from([1, 7, 64, 1 << 20]))
@settings(max_examples=300, deadline=None)
def test_folded_batch_applies_like_its_raw_writes_in_order(
    raw: list[Record], max_record_bytes: int
) -> None:
    folded = fold_records(raw, max_record_bytes=max_record_bytes)

    expected: dict[int, list[int]] = {}
    apply(expected, raw)
    # Folded records do not overlap, so any order must give the same result.
    forward: dict[int, list[int]] = {}
    apply(forward, folded)
    backward: dict[int, list[int]] = {}
    apply(backward, list(reversed(folded)))
    for disk in expected:
        assert forward.get(disk, [0] * DISK_SIZE) == expected[disk]
        assert backward.get(disk, [0] * DISK_SIZE) == expected[disk]

    seqs = [r.seq for r in folded]
    assert seqs == sorted(seqs), "a batch carries records in non-decreasing seq order"
    raw_seqs = {r.seq for r in raw}
    assert set(seqs) <= raw_seqs
    for rec in folded:
        assert rec.kind is not RecordKind.FLUSH
        if rec.kind in (RecordKind.WRITE, RecordKind.SYNC_BLOCK):
            assert rec.length <= max(max_record_bytes, 96)
    stats = fold_stats(raw, folded)
    assert stats.data_bytes_out <= stats.data_bytes_in


@given(raw_batches())
@settings(max_examples=100, deadline=None)
def test_folded_ranges_never_overlap(raw: list[Record]) -> None:
    folded = fold_records(raw)
    by_disk: dict[int, list[tuple[int, int]]] = {}
    for rec in folded:
        if rec.kind is not RecordKind.MARKER:
            by_disk.setdefault(rec.disk, []).append((rec.offset, rec.offset + rec.length))
    for ranges in by_disk.values():
        ranges.sort()
        for (_, end), (start, _) in itertools.pairwise(ranges):
            assert end <= start


def test_hot_block_travels_once_with_its_last_data() -> None:
    raw = [
        Record(RecordKind.WRITE, seq, 0, 4096, 4096, seq, bytes([seq]) * 4096)
        for seq in range(1, 101)
    ]
    folded = fold_records(raw)
    assert len(folded) == 1
    assert folded[0].seq == 100
    assert bytes(folded[0].data) == bytes([100]) * 4096


def test_zero_and_trim_ranges_merge_but_stay_distinct() -> None:
    raw = [
        Record(RecordKind.ZERO, 1, 0, 0, 100, 1),
        Record(RecordKind.ZERO, 2, 0, 100, 100, 2),
        Record(RecordKind.TRIM, 3, 0, 200, 50, 3),
        Record(RecordKind.TRIM, 4, 0, 250, 50, 4),
        Record(RecordKind.ZERO, 5, 0, 50, 100, 5),
    ]
    folded = sorted(fold_records(raw), key=lambda r: r.offset)
    assert [(r.kind, r.offset, r.length) for r in folded] == [
        (RecordKind.ZERO, 0, 200),
        (RecordKind.TRIM, 200, 100),
    ]


def test_partial_overlap_splits_the_older_write() -> None:
    old = Record(RecordKind.WRITE, 1, 0, 0, 30, 1, b"a" * 30)
    new = Record(RecordKind.ZERO, 2, 0, 10, 10, 2)
    folded = fold_records([old, new], max_record_bytes=1 << 20)
    assert [(r.kind, r.seq, r.offset, r.length, bytes(r.data)) for r in folded] == [
        (RecordKind.WRITE, 1, 0, 10, b"a" * 10),
        (RecordKind.WRITE, 1, 20, 10, b"a" * 10),
        (RecordKind.ZERO, 2, 10, 10, b""),
    ]


def test_fold_of_many_random_writes_is_fast_enough_to_finish() -> None:
    # A smoke test of the O(n log n) path on a realistic batch (no timing assertion).
    rng = random.Random(7)
    block = bytes(4096)
    raw = [
        Record(RecordKind.WRITE, seq, 0, rng.randrange(4096) * 4096, 4096, seq, block)
        for seq in range(20_000)
    ]
    folded = fold_records(raw)
    covered = {r.offset for r in raw}
    assert sum(r.length for r in folded) == len(covered) * 4096
