"""Folding: the smallest list of records whose effect equals that of a batch's raw writes.

Inside one consistency batch only the final state of each byte matters, because the
applier applies a batch whole. So a block written many times travels once, with its last
data; a write partly overwritten travels as the pieces still visible; adjacent ranges of
the same kind (data, zero, trim) merge into one record. FLUSH records are barriers
between writes and carry nothing the target needs once the batch is atomic, so they are
dropped; markers travel unchanged.

The fold is a sweep over each disk's range boundaries with a max-heap of the records
covering the current point: the newest one (highest position in the batch) owns the
segment up to the next boundary. That is O(n log n) in the number of records, no per-byte
work, and the data pieces are memoryview slices of the input until they are joined.

A folded record keeps the sequence number and timestamp of the newest write it carries,
and the output is sorted by sequence number, as the batch format requires (equal numbers
may repeat: a write split in two keeps its number in both pieces).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from datapath.journal import DATA_KINDS, RANGE_KINDS, Record, RecordKind

# Coalescing joins adjacent data pieces into one record up to this size: large enough to
# make per-record overhead negligible, small enough that one record never dominates a chunk.
DEFAULT_MAX_RECORD_BYTES = 1 << 20

_U32_MAX = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class FoldStats:
    """What a fold saved; data bytes are WRITE/SYNC_BLOCK payload bytes."""

    records_in: int
    records_out: int
    data_bytes_in: int
    data_bytes_out: int


def fold_records(
    records: Iterable[Record], *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> list[Record]:
    """Folds ``records`` (in sequence order) into an equivalent, non-overlapping list.

    Applying the result in any order gives the same disk contents as applying
    ``records`` one by one in order; the result is sorted by sequence number.
    """
    if not 0 < max_record_bytes <= _U32_MAX:
        raise ValueError(f"max_record_bytes must be 1..{_U32_MAX}, got {max_record_bytes}")
    by_disk: dict[int, list[Record]] = {}
    out: list[Record] = []
    for rec in records:
        kind = rec.kind
        if kind in RANGE_KINDS:
            if rec.length:
                by_disk.setdefault(rec.disk, []).append(rec)
        elif kind is RecordKind.MARKER:
            out.append(rec)
        # FLUSH: a barrier between writes; the whole batch is applied atomically anyway.
    for disk_records in by_disk.values():
        out.extend(_fold_disk(disk_records, max_record_bytes))
    out.sort(key=_seq_key)
    return out


def fold_stats(raw: Sequence[Record], folded: Sequence[Record]) -> FoldStats:
    return FoldStats(
        records_in=len(raw),
        records_out=len(folded),
        data_bytes_in=sum(len(r.data) for r in raw if r.kind in DATA_KINDS),
        data_bytes_out=sum(len(r.data) for r in folded if r.kind in DATA_KINDS),
    )


def _seq_key(rec: Record) -> int:
    return rec.seq


# A segment of the folded disk: [start, end) owned by records[owner].
_Segment = tuple[int, int, int]


def _fold_disk(records: list[Record], max_record_bytes: int) -> list[Record]:
    if len(records) == 1:
        return records
    segments = _owned_segments(records)
    return _coalesce(records, segments, max_record_bytes)


def _owned_segments(records: list[Record]) -> list[_Segment]:
    """Non-overlapping segments in offset order, each owned by the newest record over it."""
    order = sorted(range(len(records)), key=lambda i: records[i].offset)
    # Fast path: no two records overlap, so every record owns its whole range.
    prev_end = -1
    for i in order:
        rec = records[i]
        if rec.offset < prev_end:
            break
        prev_end = rec.offset + rec.length
    else:
        return [(records[i].offset, records[i].offset + records[i].length, i) for i in order]

    bounds = sorted({r.offset for r in records} | {r.offset + r.length for r in records})
    heap: list[tuple[int, int]] = []  # (-index, end): the newest covering record on top
    segments: list[_Segment] = []
    next_rec = 0
    count = len(order)
    for k in range(len(bounds) - 1):
        pos = bounds[k]
        while next_rec < count and records[order[next_rec]].offset == pos:
            i = order[next_rec]
            heapq.heappush(heap, (-i, pos + records[i].length))
            next_rec += 1
        # Records that ended at or before pos are stale; they only matter once on top.
        while heap and heap[0][1] <= pos:
            heapq.heappop(heap)
        if not heap:
            continue
        owner = -heap[0][0]
        end = bounds[k + 1]
        if segments and segments[-1][2] == owner and segments[-1][1] == pos:
            segments[-1] = (segments[-1][0], end, owner)
        else:
            segments.append((pos, end, owner))
    return segments


def _coalesce(
    records: list[Record], segments: list[_Segment], max_record_bytes: int
) -> list[Record]:
    """Turns segments into records, merging adjacent ones of the same kind."""
    out: list[Record] = []
    run: list[_Segment] = []
    run_kind: RecordKind | None = None
    run_end = -1
    run_len = 0
    for seg in segments:
        start, end, owner = seg
        kind = records[owner].kind
        mergeable = (
            run_kind is kind
            and start == run_end
            and (kind not in DATA_KINDS or run_len + (end - start) <= max_record_bytes)
        )
        if not mergeable and run:
            out.append(_record_for_run(records, run))
            run = []
            run_len = 0
        run.append(seg)
        run_kind = kind
        run_end = end
        run_len += end - start
    if run:
        out.append(_record_for_run(records, run))
    return out


def _record_for_run(records: list[Record], run: list[_Segment]) -> Record:
    first_start, _, first_owner = run[0]
    end = run[-1][1]
    template = records[first_owner]
    if len(run) == 1 and first_start == template.offset and end - first_start == template.length:
        return template  # untouched by folding: travel as it came, no copy
    seq = max(records[owner].seq for _, _, owner in run)
    ts_ns = max(records[owner].ts_ns for _, _, owner in run)
    data: bytes | memoryview = b""
    if template.kind in DATA_KINDS:
        pieces = [_piece(records[owner], start, stop) for start, stop, owner in run]
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    return Record(
        kind=template.kind,
        seq=seq,
        disk=template.disk,
        offset=first_start,
        length=end - first_start,
        ts_ns=ts_ns,
        data=data,
    )


def _piece(rec: Record, start: int, stop: int) -> memoryview:
    base = rec.offset
    return memoryview(rec.data)[start - base : stop - base]
