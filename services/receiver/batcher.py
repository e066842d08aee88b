"""Cutting one VM's tap stream into consistency batches (pure: no Kafka, no clock).

The batcher takes the VM's tap messages in offset order and accumulates their records
in a pending batch. A batch covers a contiguous sequence range, so the pending batch is
cut:

* when it is older than the interval, or larger than the size or record bound;
* before a sequence gap, an epoch change, or a corrupt message, so that no batch spans one;
* at the edges of a resync bracket (MARKER RESYNC_START .. RESYNC_END).

Inside a bracket the interval does not cut (a partial resync is useless to the target
until it is complete); only the size bound does, and every batch cut inside a bracket
carries its ``resync_id``, the closing one also ``resync_complete``. Live writes sequenced
inside the bracket belong to it.

Exactly-once bookkeeping: every pending record remembers the Kafka offset of its message.
``commit_offset`` is where a restarted receiver must resume so that nothing is lost: the
message holding the oldest record not yet in an emitted batch. A message cut in the middle
is read again after a crash, and its records already emitted are skipped by sequence
number (``next_seq``, restored from the last batch in the batch topic).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from datapath.journal import (
    DATA_KINDS,
    Batch,
    JournalError,
    MarkerKind,
    Record,
    RecordKind,
    decode_frame,
    peek_frame_header,
)

from .folding import fold_records
from .settings import ReceiverSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CutBatch:
    """A batch as cut from the stream: raw records, not yet folded or encoded."""

    vm_id: str
    epoch: int
    records: list[Record]
    resync_id: int
    resync_complete: bool
    data_bytes: int  # WRITE/SYNC_BLOCK payload bytes of the raw records

    @property
    def first_seq(self) -> int:
        return self.records[0].seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq

    def folded(self, *, max_record_bytes: int) -> Batch:
        """The batch to publish: overwrites folded (see :mod:`.folding`)."""
        return self._batch(fold_records(self.records, max_record_bytes=max_record_bytes))

    def unfolded(self) -> Batch:
        """The batch with every raw record (for baselines and diagnosis)."""
        return self._batch(list(self.records))

    def _batch(self, records: list[Record]) -> Batch:
        return Batch(
            vm_id=self.vm_id,
            epoch=self.epoch,
            first_seq=self.first_seq,
            last_seq=self.last_seq,
            min_ts_ns=min(r.ts_ns for r in self.records),
            max_ts_ns=max(r.ts_ns for r in self.records),
            records=records,
            resync_id=self.resync_id,
            resync_complete=self.resync_complete,
        )


@dataclass(frozen=True, slots=True)
class SequenceGap:
    """Sequence numbers the tap stream skipped: ``first_seq..last_seq`` never arrived."""

    vm_id: str
    epoch: int
    first_seq: int
    last_seq: int
    offset: int  # the tap message that revealed the gap


@dataclass(frozen=True, slots=True)
class QuarantinedMessage:
    """A tap message that failed to decode; it goes to the dead-letter topic as-is."""

    vm_id: str
    offset: int
    value: bytes
    error: str
    # From the frame header when it is intact (its CRC checked); None when unreadable.
    epoch: int | None
    first_seq: int | None
    last_seq: int | None


@dataclass(frozen=True, slots=True)
class BracketAbandoned:
    """A resync bracket was superseded by another before its RESYNC_END arrived."""

    vm_id: str
    resync_id: int
    superseded_by: int
    seq: int


@dataclass(frozen=True, slots=True)
class SequenceRegression:
    """A newer epoch reused sequence numbers already batched from an older one.

    Its records with those numbers cannot travel (the target has applied the numbers
    already), so they are dropped and a resync is requested.
    """

    vm_id: str
    epoch: int  # the newer epoch
    previous_epoch: int
    first_seq: int  # the first reused number seen
    next_seq: int  # the number the stream should have continued with
    offset: int


Event = SequenceGap | QuarantinedMessage | BracketAbandoned | SequenceRegression


@dataclass(slots=True)
class Outbox:
    """Everything to publish in one transaction, and the tap offset to commit with it."""

    batches: list[CutBatch] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    commit_offset: int = 0

    def __bool__(self) -> bool:
        return bool(self.batches or self.events)


def _setting_default(name: str) -> Any:
    return ReceiverSettings.model_fields[name].default


@dataclass(frozen=True, slots=True)
class BatcherLimits:
    """When to cut; the defaults are the receiver settings' (one place for each number)."""

    interval_s: float = _setting_default("batch_interval_s")
    max_batch_bytes: int = _setting_default("max_batch_bytes")
    max_batch_records: int = _setting_default("max_batch_records")


@dataclass(slots=True)
class BatcherCounters:
    """Monotonic counts for metrics and status."""

    messages: int = 0
    stale_messages: int = 0
    records: int = 0
    data_bytes: int = 0
    duplicates_skipped: int = 0
    gaps: int = 0
    regressions: int = 0
    regressed_records: int = 0  # dropped: a newer epoch re-used their numbers
    quarantined: int = 0
    batches_cut: int = 0


class VmBatcher:
    """Cuts the tap stream of one VM into batches; see the module docstring."""

    def __init__(
        self,
        vm_id: str,
        *,
        start_offset: int,
        next_seq: int | None = None,
        epoch: int | None = None,
        open_resync: int = 0,
        limits: BatcherLimits | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.limits = limits or BatcherLimits()
        self.next_seq = next_seq
        self.epoch = epoch
        self.open_resync = open_resync
        self.counters = BatcherCounters()
        # The epoch of the last record taken: a newer epoch re-using older numbers is a
        # regression, not a harmless re-read.
        self._taken_epoch = epoch
        # The epoch whose regression was reported (once per epoch), and whether the
        # batches still owe the applier the hole that makes it stop (see _regression).
        self._regression_epoch: int | None = None
        self._hole_owed = False
        self._consumed_through = start_offset
        self._pending: list[Record] = []
        self._pending_offset = start_offset
        self._pending_since = 0.0
        self._pending_bytes = 0
        self._outbox = Outbox(commit_offset=start_offset)

    # -- input

    def add_message(self, offset: int, value: bytes | memoryview | None, now: float) -> None:
        """Takes the tap message at ``offset``; messages below the resume point are ignored.
        A message that is not a frame of this VM (corrupt, another VM's, or without a
        value at all) is quarantined.

        The consumer may still hand out records it fetched before a rebalance or a seek;
        they are behind this batcher's position, and taking them again would duplicate
        their dead letters and events (their records would be skipped by sequence anyway).
        """
        if offset < self._consumed_through:
            self.counters.stale_messages += 1
            return
        self.counters.messages += 1
        try:
            if value is None:
                raise JournalError("a message without a value (a tombstone) on a tap topic")
            frame = decode_frame(value)
            if frame.vm_id != self.vm_id:
                raise JournalError(
                    f"frame of VM {frame.vm_id!r} on the tap topic of {self.vm_id!r}"
                )
        except JournalError as exc:
            self._quarantine(offset, value if value is not None else b"", exc)
            self._consumed_through = offset + 1
            return
        if self.epoch is not None and frame.epoch != self.epoch and self._pending:
            self._cut(complete=False)
        self.epoch = frame.epoch
        for rec in frame.records:
            self._add_record(offset, rec, now)
        self._consumed_through = offset + 1

    @property
    def cut_deadline(self) -> float | None:
        """When the pending batch's interval ends (None: nothing pending, or a resync
        bracket is open and ends only with its last record)."""
        if not self._pending or self.open_resync:
            return None
        return self._pending_since + self.limits.interval_s

    def cut_due(self, now: float) -> None:
        """Cuts the pending batch when its interval has passed (never inside a bracket)."""
        deadline = self.cut_deadline
        if deadline is not None and now >= deadline:
            self._cut(complete=False)

    # -- output

    @property
    def commit_offset(self) -> int:
        """The tap offset to resume from: nothing before it is still needed."""
        return self._pending_offset if self._pending else self._consumed_through

    @property
    def queued_bytes(self) -> int:
        """Raw guest bytes of the batches cut and waiting in the outbox."""
        return sum(batch.data_bytes for batch in self._outbox.batches)

    @property
    def queued_records(self) -> int:
        """Records of the batches cut and waiting in the outbox (zeros, trims and markers
        carry no data but take memory all the same)."""
        return sum(len(batch.records) for batch in self._outbox.batches)

    @property
    def has_outbox(self) -> bool:
        return bool(self._outbox)

    @property
    def pending_records(self) -> int:
        return len(self._pending)

    @property
    def oldest_pending_ts_ns(self) -> int | None:
        """Source timestamp of the oldest record not yet in a cut batch."""
        return self._pending[0].ts_ns if self._pending else None

    def take_outbox(self) -> Outbox | None:
        """What is ready to publish, with the offset to commit with it; None if nothing."""
        outbox = self._outbox
        if not outbox:
            return None
        outbox.commit_offset = self.commit_offset
        self._outbox = Outbox()
        return outbox

    # -- internals

    def _add_record(self, offset: int, rec: Record, now: float) -> None:
        expected = self.next_seq
        if expected is not None:
            if rec.seq < expected:
                assert self.epoch is not None
                if self._taken_epoch is not None and self.epoch > self._taken_epoch:
                    self._regression(offset, rec, expected)
                    self.counters.regressed_records += 1
                else:
                    # Already in an emitted batch: a message re-read after a crash or
                    # rebalance.
                    self.counters.duplicates_skipped += 1
                return
            if rec.seq == expected and self._hole_owed:
                # The first record after a regression's dropped ones is dropped too: the
                # next batch then starts past a hole, which stops the applier until a
                # full resync (the records dropped before it are lost to the target).
                self._hole_owed = False
                self.counters.regressed_records += 1
                return
            if rec.seq > expected:
                self._hole_owed = False  # there is one now
                self._cut(complete=False)
                self.counters.gaps += 1
                assert self.epoch is not None
                gap = SequenceGap(self.vm_id, self.epoch, expected, rec.seq - 1, offset)
                log.error(
                    "VM %s: tap sequence gap, records %d..%d never arrived (seen at tap offset "
                    "%d); batches continue from %d and a resync is requested",
                    self.vm_id,
                    gap.first_seq,
                    gap.last_seq,
                    offset,
                    rec.seq,
                )
                self._outbox.events.append(gap)
        self.next_seq = rec.seq + 1
        self._taken_epoch = self.epoch
        self.counters.records += 1

        closes_bracket = False
        if rec.kind is RecordKind.MARKER:
            if rec.marker is MarkerKind.RESYNC_START:
                self._open_bracket(rec)
            elif rec.marker is MarkerKind.RESYNC_END:
                if rec.marker_id == self.open_resync:
                    closes_bracket = True
                else:
                    log.warning(
                        "VM %s: RESYNC_END %d at seq %d does not close the open bracket %d; "
                        "it travels as a plain marker",
                        self.vm_id,
                        rec.marker_id,
                        rec.seq,
                        self.open_resync,
                    )

        if not self._pending:
            self._pending_offset = offset
            self._pending_since = now
        self._pending.append(rec)
        if rec.kind in DATA_KINDS:
            self._pending_bytes += rec.length
            self.counters.data_bytes += rec.length

        if closes_bracket:
            self._cut(complete=True)
        elif (
            self._pending_bytes >= self.limits.max_batch_bytes
            or len(self._pending) >= self.limits.max_batch_records
        ):
            self._cut(complete=False)

    def _regression(self, offset: int, rec: Record, expected: int) -> None:
        """A newer epoch numbers again what an older one numbered. Its records up to the
        last number batched cannot travel (the target has those numbers), so the target
        will lack them; batching its later records right after would tell the applier
        nothing is missing. So a hole is left where they would join (see _add_record):
        the applier stops there, as at any gap, until a full resync repairs it."""
        self._hole_owed = True
        if self._regression_epoch == self.epoch:
            return  # reported for this epoch already
        self._regression_epoch = self.epoch
        assert self.epoch is not None and self._taken_epoch is not None
        self.counters.regressions += 1
        self._outbox.events.append(
            SequenceRegression(self.vm_id, self.epoch, self._taken_epoch, rec.seq, expected, offset)
        )
        log.error(
            "VM %s: epoch %d restarted the sequence at %d, but epoch %d already reached %d; "
            "its records up to %d are dropped and a resync is requested",
            self.vm_id,
            self.epoch,
            rec.seq,
            self._taken_epoch,
            expected - 1,
            expected - 1,
        )

    def _open_bracket(self, start: Record) -> None:
        if self.open_resync:
            # The tap started over (e.g. it restarted mid-resync): the old bracket will never
            # complete. Its batches stay in the sequence; the applier applies them together
            # with the superseding bracket, as one unit, when that one completes.
            self._outbox.events.append(
                BracketAbandoned(self.vm_id, self.open_resync, start.marker_id, start.seq)
            )
            log.warning(
                "VM %s: resync %d superseded by resync %d at seq %d before it completed",
                self.vm_id,
                self.open_resync,
                start.marker_id,
                start.seq,
            )
        # The bracket starts a batch of its own, so no batch mixes bracket and live records.
        self._cut(complete=False)
        self.open_resync = start.marker_id

    def _cut(self, *, complete: bool) -> None:
        if not self._pending:
            return
        assert self.epoch is not None
        batch = CutBatch(
            vm_id=self.vm_id,
            epoch=self.epoch,
            records=self._pending,
            resync_id=self.open_resync,
            resync_complete=complete,
            data_bytes=self._pending_bytes,
        )
        self._outbox.batches.append(batch)
        self.counters.batches_cut += 1
        if complete:
            self.open_resync = 0
        self._pending = []
        self._pending_bytes = 0

    def _quarantine(self, offset: int, value: bytes | memoryview, exc: JournalError) -> None:
        # Cut first: the commit offset then moves past the bad message in the same
        # transaction that quarantines it, so it is never quarantined twice.
        self._cut(complete=False)
        self.counters.quarantined += 1
        epoch = first_seq = last_seq = None
        try:
            header = peek_frame_header(value)
        except JournalError:
            pass  # the header itself is damaged: the gap will show the range later
        else:
            if header.vm_id == self.vm_id:
                epoch, first_seq, last_seq = header.epoch, header.first_seq, header.last_seq
        item = QuarantinedMessage(
            self.vm_id, offset, bytes(value), str(exc), epoch, first_seq, last_seq
        )
        log.error(
            "VM %s: corrupt tap message at offset %d quarantined to the dead-letter topic "
            "(seq %s..%s): %s",
            self.vm_id,
            offset,
            first_seq,
            last_seq,
            exc,
        )
        if first_seq is not None and self.next_seq is not None and first_seq > self.next_seq:
            # Records before the quarantined range never arrived either: a gap of its own.
            assert epoch is not None
            self.counters.gaps += 1
            self._outbox.events.append(
                SequenceGap(self.vm_id, epoch, self.next_seq, first_seq - 1, offset)
            )
        self._outbox.events.append(item)
        if last_seq is not None and (self.next_seq is None or last_seq >= self.next_seq):
            # The range is known and reported with the quarantine; do not report it again
            # as a gap when the next good message arrives. Its records never travel: the
            # applier stops at the hole they leave (so none is owed after a regression).
            self.next_seq = last_seq + 1
            self._hole_owed = False
