"""Replaying a VM's tap topic onto disks: what the target gets, applied in order.

For tests, benchmarks and troubleshooting ("does the topic really describe the source?").
Every frame is decoded and verified; records are applied in sequence order as the
applier does: WRITE/SYNC_BLOCK write their data, ZERO punches a hole, TRIM discards
(reads as zeros), FLUSH and markers change nothing; everything from a RESYNC_START to
its RESYNC_END (live writes included) is applied as one unit when the RESYNC_END
arrives. A bracket superseded by another RESYNC_START before it ended is not dropped:
its records stay in the sequence and are applied together with the superseding
bracket's, as one unit, when that one completes, as the applier does (guarantee 4).
The result reports whether the sequence
is gapless, how many bytes of each kind travelled, and the resync brackets seen.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition

from datapath.journal import RANGE_KINDS, Frame, MarkerKind, Record, RecordKind, decode_frame
from datapath.kafka import Consumer, KafkaClusterSettings
from datapath.storage import StorageBackend
from datapath.storage.apply import apply_record
from datapath.topics import Stream, topic_name


@dataclass
class ReplayResult:
    frames: int = 0
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    epochs: list[int] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (expected, found)
    stale_frames: int = 0  # frames of an older epoch after a newer one
    counts: Counter[str] = field(default_factory=Counter)
    markers: Counter[str] = field(default_factory=Counter)  # MARKER records by marker kind
    bytes: Counter[str] = field(default_factory=Counter)
    resyncs_started: list[int] = field(default_factory=list)
    resyncs_completed: list[int] = field(default_factory=list)
    resyncs_abandoned: list[int] = field(default_factory=list)
    writes_inside_resyncs: int = 0  # live guest writes published inside a resync bracket

    @property
    def gapless(self) -> bool:
        return not self.gaps and self.stale_frames == 0

    @property
    def open_resyncs(self) -> list[int]:
        """Brackets neither completed nor superseded. Their records, and those of any
        bracket they superseded, were not applied."""
        closed = set(self.resyncs_completed) | set(self.resyncs_abandoned)
        return [m for m in self.resyncs_started if m not in closed]


def _apply(record: Record, disks: Sequence[StorageBackend]) -> None:
    if record.kind in RANGE_KINDS:  # FLUSH and markers change nothing
        apply_record(disks[record.disk], record)


def replay_frames(frames: Iterable[Frame], disks: Sequence[StorageBackend]) -> ReplayResult:
    """Applies the frames' records to `disks` (indexed like the VM's disks)."""
    result = ReplayResult()
    expected = 0
    newest_epoch = 0
    bracket = 0  # marker id of the open bracket
    # Its records, and those of the brackets it superseded, applied when it completes.
    held: list[Record] = []
    for frame in frames:
        result.frames += 1
        if frame.epoch < newest_epoch:
            result.stale_frames += 1
        newest_epoch = max(newest_epoch, frame.epoch)
        if not result.epochs or result.epochs[-1] != frame.epoch:
            result.epochs.append(frame.epoch)
        for record in frame.records:
            if expected and record.seq != expected:
                result.gaps.append((expected, record.seq))
            if not result.first_seq:
                result.first_seq = record.seq
            expected = record.seq + 1
            result.last_seq = record.seq
            result.records += 1
            kind = record.kind
            result.counts[kind.name] += 1
            result.bytes[kind.name] += record.length
            if record.marker is not None:
                result.markers[record.marker.name] += 1
            if kind is RecordKind.MARKER and record.marker is MarkerKind.RESYNC_START:
                result.resyncs_started.append(record.marker_id)
                if bracket:
                    # The superseded bracket's records are in the sequence: they stay held
                    # and are applied with this bracket's, as one unit, when it completes.
                    result.resyncs_abandoned.append(bracket)
                bracket = record.marker_id
                continue
            if bracket:
                held.append(record)
                if kind is RecordKind.WRITE:
                    result.writes_inside_resyncs += 1
                if (
                    kind is RecordKind.MARKER
                    and record.marker is MarkerKind.RESYNC_END
                    and record.marker_id == bracket
                ):
                    result.resyncs_completed.append(bracket)
                    for each in held:
                        _apply(each, disks)
                    bracket, held = 0, []
                continue
            _apply(record, disks)
    return result


async def read_tap_frames(
    cluster: KafkaClusterSettings, vm_id: str, *, timeout_s: float = 60.0
) -> list[Frame]:
    """Every frame of the VM's tap topic, from its start to its current end."""
    tp = TopicPartition(topic_name(Stream.TAP, vm_id), 0)
    frames: list[Frame] = []
    async with Consumer(cluster, fetch_max_wait_ms=100) as consumer:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        async with asyncio.timeout(timeout_s):
            while await consumer.position(tp) < end:
                batches = await consumer.getmany(tp, timeout_ms=500)
                for message in batches.get(tp, []):
                    frames.append(decode_frame(message.value))
    return frames


async def replay_tap_topic(
    cluster: KafkaClusterSettings,
    vm_id: str,
    disks: Sequence[StorageBackend],
    *,
    timeout_s: float = 60.0,
) -> ReplayResult:
    frames = await read_tap_frames(cluster, vm_id, timeout_s=timeout_s)
    return replay_frames(frames, disks)
