"""One VM's apply loop: read its target journal, check every batch, apply whole units in
sequence order, make each durable before recording it as applied.

The rules (docs/applier.md):

* a batch whose range is already applied is a duplicate: refused silently (counted);
* a batch that starts after applied + 1 is a gap: the VM stops, its state becomes
  needs-resync, a status report asks for a resync; nothing past the hole is applied;
* a corrupt batch, a batch of another VM or of an older epoch stops the VM the same way;
* contiguous normal batches are applied in units (one or more whole batches): intent
  written durably, records applied, touched disks fsynced, position written durably;
* a resync bracket (resync_id != 0 until resync_complete on the newest resync) is only
  staged while it arrives: its checksums and sequence are verified and its data dropped.
  Once complete it is re-read from Kafka and applied as one unit, so the target never
  holds a half-synced state;
* a VM waiting for a resync ignores everything until a bracket starts after the problem;
  that bracket, once complete, brings it back.

Any other error (storage, Kafka, state file) ends `run()`; the worker restarts it from
the durable state after a pause, which re-applies an interrupted unit first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from datapath.journal import (
    Batch,
    BatchAssembler,
    ChunkOrderError,
    JournalError,
    MarkerKind,
    RecordKind,
    peek_header,
)
from datapath.protection import ProtectedVM
from services.applier.coverage import Coverage
from services.applier.disks import ApplyStats, TargetDisks
from services.applier.journal_source import JournalMessage, JournalSource, StatusSink
from services.applier.metrics import ApplierMetrics
from services.applier.state import ApplyIntent, Health, StateStore, VmState

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a resume checks whether the loop applies again (or a newer pause came).
_CONTROL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class ApplyTuning:
    fetch_timeout_s: float = 0.5
    # A unit of normal batches is cut at this many encoded bytes (bounds memory too).
    max_unit_bytes: int = 64 << 20
    end_offset_interval_s: float = 1.0
    pause_timeout_s: float = 60.0


class PauseTimeout(TimeoutError):
    """The VM did not reach a consistent, paused state in time (it may be recovering)."""


class _Verdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    GAP = "gap"
    STALE_EPOCH = "stale-epoch"
    FOREIGN = "foreign-batch"
    BRACKET = "bracket"
    HEAL = "heal"  # a bracket that brings a VM waiting for a resync back
    SKIP = "skip"  # waiting for a resync


@dataclass(slots=True)
class _Pending:
    """A batch read from the journal and not yet applied, or the error that stopped
    reading (a corrupt chunk)."""

    start_offset: int
    end_offset: int
    nbytes: int  # decompressed (its encoded size where that is larger)
    batch: Batch | None = None
    error: str = ""


@dataclass(slots=True)
class _Bracket:
    resync_id: int
    first_seq: int
    last_seq: int
    start_offset: int
    end_offset: int
    min_ts_ns: int
    max_ts_ns: int
    epoch: int
    heals: bool
    coverage: Coverage | None = None  # for a healing bracket: what it sets
    batches: int = 0
    nbytes: int = 0
    complete: bool = False


class _UnitBroken(Exception):
    """A unit could not be re-read whole from the journal."""


def starts_resync(batch: Batch) -> bool:
    """The batch opens a resync bracket: RESYNC_START is numbered before the bracket's
    records, so it is among the records of the batch's first seq."""
    if not batch.resync_id:
        return False
    for record in batch.records:
        if record.seq != batch.first_seq:
            return False
        if record.kind is RecordKind.MARKER and record.marker is MarkerKind.RESYNC_START:
            return True
    return False


def ends_resync(batch: Batch, resync_id: int) -> bool:
    """The batch holds the RESYNC_END of `resync_id` (numbered last, so among the records
    of the batch's last seq)."""
    for record in reversed(batch.records):
        if record.seq != batch.last_seq:
            return False
        if (
            record.kind is RecordKind.MARKER
            and record.marker is MarkerKind.RESYNC_END
            and record.marker_id == resync_id
        ):
            return True
    return False


class VmApplier:
    def __init__(
        self,
        vm: ProtectedVM,
        source: JournalSource,
        store: StateStore,
        status_sink: StatusSink | None,
        metrics: ApplierMetrics,
        tuning: ApplyTuning,
    ) -> None:
        self.vm = vm
        self.vm_id = vm.id
        self.source = source
        self.store = store
        self.status_sink = status_sink
        self.metrics = metrics
        self.tuning = tuning
        self.state = VmState(vm_id=vm.id)
        self.phase = "starting"
        self.last_error = ""
        self.started = False
        self._disks: TargetDisks | None = None
        self._pending: deque[_Pending] = deque()
        self._pending_bytes = 0
        # Fetched past the unit bound: taken before the next fetch (a seek back to them
        # would make the consumer drop, and fetch again, all it holds).
        self._held: list[JournalMessage] = []
        self._bracket: _Bracket | None = None
        self._assembler = BatchAssembler()
        self._chunk_start = 0
        self._chunk_bytes = 0
        self._read_offset = 0
        self._end_offset: int | None = None
        self._end_checked = 0.0
        self._last_fetch_empty = False
        self._state_loaded = False
        self._pause_requested = False
        self._pause_decided = False
        self._paused = asyncio.Event()
        self._running = asyncio.Event()
        self._wake = asyncio.Event()
        self._reports: set[asyncio.Task[None]] = set()
        label = {"vm": vm.id}
        metrics.rpo.labels(**label).set_function(self.rpo_seconds)
        metrics.lag_messages.labels(**label).set_function(self._lag_messages)
        metrics.lag_batches.labels(**label).set_function(self._lag_batches)
        metrics.lag_bytes.labels(**label).set_function(self._lag_bytes)
        metrics.staged_resync_seconds.labels(**label).set_function(self._staged_resync_age)
        metrics.staged_resync_bytes.labels(**label).set_function(
            lambda: float(self._bracket.nbytes if self._bracket is not None else 0)
        )

    # --- control -----------------------------------------------------------------------

    async def pause(self) -> VmState:
        """Returns once the current unit is finished and durable and no more will be
        applied. Survives a restart of the applier (the state file remembers it).

        Never while the target disks may hold part of a unit (`dirty`): a redo under
        way finishes first; disks that no redo can repair (the unit is gone from the
        journal) wait for a full resync, and the pause times out meanwhile."""
        self._pause_requested = self._pause_decided = True
        self._running.clear()
        self._wake.set()
        try:
            await asyncio.wait_for(self._paused.wait(), self.tuning.pause_timeout_s)
        except TimeoutError as exc:
            intent = self.state.intent
            dirty = (
                f"; its target disks are dirty (they may hold part of seq "
                f"{intent.first_seq}..{intent.last_seq}) until "
                + ("the redo completes" if self.state.health is Health.OK else "a full resync")
                if intent is not None
                else ""
            )
            raise PauseTimeout(
                f"VM {self.vm_id} did not pause within {self.tuning.pause_timeout_s}s "
                f"(phase {self.phase}{': ' + self.last_error if self.last_error else ''}"
                f"{dirty})"
            ) from exc
        return self.state

    async def resume(self) -> VmState:
        """Returns once the loop applies again, or a newer pause was asked for. The
        pause flag stays set until the loop has left the pause: a pause asked for
        meanwhile finds the loop still holding it."""
        self._pause_requested, self._pause_decided = False, True
        self._wake.set()
        deadline = time.monotonic() + self.tuning.pause_timeout_s
        while not self._running.is_set() and not self._pause_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Not running (recovering from an error): it resumes when it comes back.
                log.warning("VM %s: resume recorded, the apply loop is not running", self.vm_id)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._running.wait(), min(remaining, _CONTROL_POLL_S))
        return self.state

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    # --- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        self.phase = "starting"
        state = await asyncio.to_thread(self.store.load, self.vm_id)
        if not self._state_loaded:
            # The durable pause, unless an operator asked for something since we started.
            if not self._pause_decided:
                self._pause_requested = state.paused
            self._state_loaded = True
        self._set_state(state)
        self._reset_reading()
        self._disks = await _blocking(TargetDisks, self.vm)
        try:
            await self.source.start()
            self.started = True
            if state.intent is not None:
                # Whatever the health: the disks may hold part of the unit, and only
                # applying it whole (or a full resync, if it cannot be read) repairs them.
                await self._redo(state.intent)
            if self.state.health is Health.NEEDS_RESYNC:
                self._report("needs-resync")
            await self._seek(self.state.next_offset)
            self.last_error = ""
            while True:
                if self._pause_requested and self.state.intent is None:
                    await self._hold_paused()
                    continue
                if not self._pause_requested and self.state.paused:
                    # Resumed while the loop was not holding the pause (starting,
                    # recovering from an error): the state file must say so too.
                    await self._save(self.state.with_changes(paused=False))
                self._running.set()
                self.phase = self._idle_phase()
                await self._fill()
                await self._drain()
        finally:
            # Not ready while the worker waits to run it again (/ready says so).
            self.started = False
            self._running.clear()
            self._paused.clear()
            disks, self._disks = self._disks, None
            if disks is not None:
                await _blocking(disks.close)
            await self.source.stop()

    def _idle_phase(self) -> str:
        if self.state.health is Health.NEEDS_RESYNC:
            return "needs-resync"
        if self._bracket is not None:
            return "staging-resync"
        return "applying" if self._pending else "idle"

    async def _hold_paused(self) -> None:
        if not self.state.paused:
            await self._save(self.state.with_changes(paused=True))
        self.phase = "paused"
        self._paused.set()
        self.metrics.paused.labels(vm=self.vm_id).set(1)
        while self._pause_requested:
            if not self._pending and self._bracket is None:
                # Read ahead (without applying) so the RPO stays measured while paused.
                await self._fill()
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.tuning.end_offset_interval_s)
            except TimeoutError:
                await self._refresh_end_offset(force=True)
        # Cleared before the state file says so: a pause asked for meanwhile waits for
        # the loop to hold it again (and save it), never for a file that says unpaused.
        self._paused.clear()
        self.metrics.paused.labels(vm=self.vm_id).set(0)
        await self._save(self.state.with_changes(paused=False))

    def _reset_reading(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._held = []
        self._bracket = None
        self._assembler = BatchAssembler()
        self._chunk_bytes = 0

    async def _seek(self, offset: int) -> None:
        self._reset_reading()
        await self.source.seek(offset)
        self._read_offset = offset
        self._last_fetch_empty = False

    async def _fill(self) -> None:
        """Reads what the journal has (up to the unit size, counted in decompressed bytes:
        a batch of zeros takes a kilobyte on the wire and its size in memory) into the
        pending batches."""
        limit = self.tuning.max_unit_bytes
        if self._pending_bytes >= limit:
            return
        if self._held:
            messages, self._held = self._held, []
        else:
            messages = await self.source.fetch(self.tuning.fetch_timeout_s)
            self._last_fetch_empty = not messages
        for index, message in enumerate(messages):
            if self._pending_bytes >= limit:
                # The rest waits until the pending batches are applied.
                self._held = messages[index:]
                return
            # Past a corrupt message too: what follows it may be the resync that repairs it.
            self._take(message)
        # The consumer's position also steps over transaction markers: without it the
        # last commit marker would look like one more message to read, forever.
        self._read_offset = max(self._read_offset, await self.source.position())
        await self._refresh_end_offset(force=not messages)

    def _take(self, message: JournalMessage) -> None:
        self._read_offset = message.offset + 1
        try:
            header = peek_header(message.value)
            batch = self._assembler.add(message.value)
            if header.chunk_index == 0 and (
                batch is not None or self._assembler.pending_chunks == 1
            ):
                # A batch starts here. Not at a duplicate of a first chunk the assembler
                # ignored: a redo from there would miss the chunks between.
                self._chunk_start = message.offset
                self._chunk_bytes = 0
            self._chunk_bytes += len(message.value)
        except ChunkOrderError as exc:
            # A writer that died mid-batch and re-sent it, or a lost chunk: if data is
            # really missing, the sequence check sees the gap.
            log.warning("VM %s: journal offset %d: %s", self.vm_id, message.offset, exc)
            return
        except JournalError as exc:
            self._append(
                _Pending(message.offset, message.offset, len(message.value), error=str(exc))
            )
            return
        if batch is not None:
            # What it holds in memory: its records decompressed.
            size = max(self._chunk_bytes, header.payload_len)
            self._append(_Pending(self._chunk_start, message.offset, size, batch))

    def _append(self, item: _Pending) -> None:
        self._pending.append(item)
        self._pending_bytes += item.nbytes

    def _pop(self) -> _Pending:
        item = self._pending.popleft()
        self._pending_bytes -= item.nbytes
        return item

    async def _refresh_end_offset(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._end_checked < self.tuning.end_offset_interval_s:
            return
        self._end_checked = now
        end = self._end_offset = await self.source.end_offset()
        if end < self.state.next_offset and not self.last_error:
            # Committed data never disappears below the applied position on its own.
            self.last_error = (
                f"the journal ends at offset {end}, before the applied position "
                f"{self.state.next_offset}: was the topic recreated?"
            )
            log.error("VM %s: %s", self.vm_id, self.last_error)

    # --- deciding -------------------------------------------------------------------------

    def _classify(self, item: _Pending, cursor: int | None, epoch: int) -> _Verdict:
        """cursor: the last sequence number applied or already taken into the unit being
        built (None: nothing ever applied)."""
        batch = item.batch
        assert batch is not None
        if batch.vm_id != self.vm_id:
            return _Verdict.FOREIGN
        bracket = self._bracket
        if bracket is None and self.state.health is Health.NEEDS_RESYNC:
            # Only a resync that started after the problem can repair it.
            after = int(self.state.extra.get("resync_after_offset", -1))
            if starts_resync(batch) and item.start_offset > after:
                return _Verdict.HEAL
            return _Verdict.SKIP
        if bracket is not None:
            expected = bracket.last_seq + 1
        elif cursor is None:
            # A target that never applied anything starts at the beginning of the
            # sequence, or with a resync (the initial full sync).
            if batch.first_seq <= 1:
                return _Verdict.BRACKET if batch.resync_id else _Verdict.APPLY
            return _Verdict.HEAL if starts_resync(batch) else _Verdict.GAP
        else:
            expected = cursor + 1
        if batch.last_seq < expected:
            return _Verdict.DUPLICATE
        if batch.first_seq > expected:
            return _Verdict.GAP
        if batch.epoch < (epoch if bracket is None else max(epoch, bracket.epoch)):
            return _Verdict.STALE_EPOCH
        # Contiguous, possibly overlapping the applied range: a folded batch holds the
        # final data of its whole range, so applying it whole is still exact.
        if bracket is not None or batch.resync_id:
            return _Verdict.BRACKET
        return _Verdict.APPLY

    async def _drain(self) -> None:
        """Applies or refuses what has been read, in journal order."""
        unit: list[_Pending] = []
        unit_bytes = 0
        cursor = self.state.applied_seq
        epoch = self.state.epoch
        while self._pending and not (self._pause_requested and self.state.intent is None):
            # (Dirty disks wait for a resync even while a pause is asked for: only
            # applying one makes them pausable.)
            item = self._pending[0]
            if item.batch is None:
                await self._apply_unit(unit)
                unit, unit_bytes = [], 0
                self._pop()
                await self._stop_for_resync("corrupt", item.error, item.start_offset)
                continue
            batch = item.batch
            verdict = self._classify(item, cursor, epoch)
            if verdict is _Verdict.APPLY:
                self._pop()
                unit.append(item)
                unit_bytes += item.nbytes
                cursor, epoch = batch.last_seq, max(epoch, batch.epoch)
                if unit_bytes >= self.tuning.max_unit_bytes:
                    await self._apply_unit(unit)
                    unit, unit_bytes = [], 0
                continue
            if verdict is _Verdict.DUPLICATE:
                self._pop()
                self.metrics.duplicates.labels(vm=self.vm_id).inc()
                log.debug(
                    "VM %s: duplicate batch %s..%s", self.vm_id, batch.first_seq, batch.last_seq
                )
                continue
            if verdict is _Verdict.SKIP:
                self._pop()
                self.metrics.skipped.labels(vm=self.vm_id).inc()
                continue
            # Everything else ends the unit being built: apply it first.
            await self._apply_unit(unit)
            unit, unit_bytes = [], 0
            self._pop()
            if verdict in (_Verdict.BRACKET, _Verdict.HEAL):
                if self._stage(item, heals=verdict is _Verdict.HEAL):
                    if await self._finish_bracket():
                        return
                    cursor, epoch = self.state.applied_seq, self.state.epoch
                continue
            await self._stop_for_resync(
                verdict.value,
                self._describe(verdict, batch, cursor),
                item.start_offset,
                seen_ts_ns=batch.min_ts_ns,
                seen_last_seq=batch.last_seq,
            )
            cursor, epoch = self.state.applied_seq, self.state.epoch
        await self._apply_unit(unit)

    def _describe(self, verdict: _Verdict, batch: Batch, cursor: int | None) -> str:
        seen = (
            f"batch {batch.first_seq}..{batch.last_seq} (vm {batch.vm_id!r}, epoch "
            f"{batch.epoch}) after applied seq {cursor} (epoch {self.state.epoch})"
        )
        if verdict is _Verdict.GAP:
            missing = 1 if cursor is None else cursor + 1
            return f"{seen}: seq {missing}..{batch.first_seq - 1} missing"
        if verdict is _Verdict.STALE_EPOCH:
            return f"{seen}: its epoch is older than the applied one"
        if verdict is _Verdict.FOREIGN:
            return f"{seen}: it belongs to another VM"
        return seen

    # --- applying ----------------------------------------------------------------------

    async def _apply_unit(self, unit: list[_Pending]) -> None:
        if not unit:
            return
        disks = self._require_disks()
        batches = [item.batch for item in unit if item.batch is not None]
        disks.check(batches)
        intent = ApplyIntent(
            batches[0].first_seq, batches[-1].last_seq, unit[0].start_offset, unit[-1].end_offset
        )
        started = time.monotonic()
        applied = self._applied_state(intent, batches[-1].max_ts_ns, max(b.epoch for b in batches))
        with_intent = self.state.with_changes(intent=intent)
        # Shown while the unit is applied (its writes are missing on the target until it
        # is done: the RPO counts from the last applied one); the disk has it before any
        # write. One trip off the event loop for the three steps, in this order: under
        # load each trip cost milliseconds of waiting for a core.
        self._set_state(with_intent)
        stats = await _blocking(self._apply_durably, disks, with_intent, batches, applied)
        self._set_state(applied)
        self._account(stats, batches, min(b.min_ts_ns for b in batches), started)

    def _apply_durably(
        self, disks: TargetDisks, with_intent: VmState, batches: list[Batch], applied: VmState
    ) -> ApplyStats:
        """Blocking: the intent made durable, the batches applied and flushed, then the
        new position made durable. A crash in between leaves the intent: redo."""
        self.store.save(with_intent)
        stats = disks.apply(batches)
        self.store.save(applied)
        return stats

    def _stage(self, item: _Pending, *, heals: bool) -> bool:
        """Takes a batch of a resync bracket; True once the bracket is complete."""
        batch = item.batch
        assert batch is not None
        # Checked as it arrives, so that a bracket the disks cannot take is refused
        # before any of it is written (it is applied only once complete).
        self._require_disks().check([batch])
        bracket = self._bracket
        if bracket is None:
            bracket = self._bracket = _Bracket(
                resync_id=batch.resync_id,
                first_seq=batch.first_seq,
                last_seq=batch.last_seq,
                start_offset=item.start_offset,
                end_offset=item.end_offset,
                min_ts_ns=batch.min_ts_ns,
                max_ts_ns=batch.max_ts_ns,
                epoch=batch.epoch,
                heals=heals,
                coverage=Coverage(self._require_disks().source_sizes) if heals else None,
            )
            log.info(
                "VM %s: resync %d starts at seq %d; staging it until complete",
                self.vm_id,
                batch.resync_id,
                batch.first_seq,
            )
        elif batch.resync_id and batch.resync_id != bracket.resync_id:
            # The resync restarted: everything staged so far stays part of the unit (it
            # is in the sequence) and the unit now ends with the newer resync.
            log.info(
                "VM %s: resync %d superseded by resync %d",
                self.vm_id,
                bracket.resync_id,
                batch.resync_id,
            )
            bracket.resync_id = batch.resync_id
        bracket.last_seq = batch.last_seq
        bracket.end_offset = item.end_offset
        bracket.min_ts_ns = min(bracket.min_ts_ns, batch.min_ts_ns)
        bracket.max_ts_ns = max(bracket.max_ts_ns, batch.max_ts_ns)
        bracket.epoch = max(bracket.epoch, batch.epoch)
        bracket.batches += 1
        bracket.nbytes += item.nbytes
        if bracket.coverage is not None:
            bracket.coverage.add_records(batch.records)
        # The RESYNC_END marker closes the bracket even if the batch's flag says otherwise
        # (a receiver that lost track of the open bracket across a restart).
        bracket.complete = (
            batch.resync_complete and batch.resync_id == bracket.resync_id
        ) or ends_resync(batch, bracket.resync_id)
        return bracket.complete

    async def _finish_bracket(self) -> bool:
        """Applies a complete bracket (True), or refuses a healing one that does not set
        every byte of every disk (False: the VM keeps waiting for a full resync)."""
        bracket = self._bracket
        assert bracket is not None and bracket.complete
        coverage = bracket.coverage
        if coverage is not None and not coverage.complete():
            self._bracket = None
            detail = (
                f"resync {bracket.resync_id} (seq {bracket.first_seq}..{bracket.last_seq}) "
                f"sets {coverage.covered_bytes()} of {coverage.total_bytes} bytes; only a full "
                "resync repairs lost writes"
            )
            log.error("VM %s: %s", self.vm_id, detail)
            extra = {
                **self.state.extra,
                "resync_after_offset": bracket.end_offset,
                "refused_resync": detail,
            }
            await self._save(self.state.with_changes(extra=extra))
            self._report("needs-resync", refused_resync=detail)
            return False
        await self._apply_bracket()
        return True

    async def _apply_bracket(self) -> None:
        bracket = self._bracket
        assert bracket is not None and bracket.complete
        intent = ApplyIntent(
            bracket.first_seq,
            bracket.last_seq,
            bracket.start_offset,
            bracket.end_offset,
            bracket.resync_id,
        )
        log.info(
            "VM %s: resync %d complete (%d batches, seq %d..%d); applying it as one unit",
            self.vm_id,
            bracket.resync_id,
            bracket.batches,
            bracket.first_seq,
            bracket.last_seq,
        )
        await self._apply_from_journal(intent, heals=bracket.heals)
        await self._seek(self.state.next_offset)

    async def _redo(self, intent: ApplyIntent) -> None:
        """Re-applies a unit interrupted by a crash, before anything else."""
        log.warning(
            "VM %s: re-applying seq %d..%d (journal offsets %d..%d) interrupted by a crash",
            self.vm_id,
            intent.first_seq,
            intent.last_seq,
            intent.start_offset,
            intent.end_offset,
        )
        self.metrics.redos.labels(vm=self.vm_id).inc()
        await self._apply_from_journal(intent, heals=False)

    async def _apply_from_journal(self, intent: ApplyIntent, *, heals: bool) -> None:
        """Reads a unit back from Kafka and applies it, one batch in memory at a time;
        fsyncs once and records it as applied once."""
        self.phase = "applying-resync" if intent.resync_id else "redo"
        disks = self._require_disks()
        started = time.monotonic()
        # A redo, or a resync repairing disks a failed redo left torn: the disks are
        # dirty before this unit writes anything.
        dirty = self.state.intent is not None
        await self._save(self.state.with_changes(intent=intent))
        await self._seek(intent.start_offset)
        assembler = BatchAssembler()
        cursor: int | None = None
        written = False
        total = ApplyStats()
        touched: set[int] = set()
        first_ts: int | None = None
        last_ts, epoch = self.state.source_ts_ns, self.state.epoch
        try:
            done = False
            while not done:
                messages = await self.source.fetch(self.tuning.fetch_timeout_s)
                if not messages:
                    if await self.source.end_offset() <= intent.end_offset:
                        raise _UnitBroken(
                            f"the journal ends before offset {intent.end_offset} (topic recreated?)"
                        )
                    if cursor is None and await self.source.position() > intent.end_offset:
                        raise _UnitBroken(
                            f"the journal no longer holds offsets {intent.start_offset}.."
                            f"{intent.end_offset} (removed by retention?)"
                        )
                for message in messages:
                    if message.offset >= intent.end_offset:
                        done = True
                        if message.offset > intent.end_offset:
                            break
                    try:
                        batch = assembler.add(message.value)
                    except ChunkOrderError as exc:
                        log.warning("VM %s: journal offset %d: %s", self.vm_id, message.offset, exc)
                        continue
                    except JournalError as exc:
                        raise _UnitBroken(f"offset {message.offset}: {exc}") from exc
                    if batch is None:
                        continue
                    if cursor is None:
                        if batch.first_seq != intent.first_seq:
                            raise _UnitBroken(
                                f"the journal at offset {intent.start_offset} holds seq "
                                f"{batch.first_seq}..{batch.last_seq}, not the unit's start "
                                f"{intent.first_seq} (removed by retention?)"
                            )
                    elif batch.last_seq <= cursor:
                        continue
                    elif batch.first_seq > cursor + 1:
                        raise _UnitBroken(f"gap after seq {cursor} at offset {message.offset}")
                    disks.check([batch])
                    written = True
                    stats, disk_set = await _blocking(disks.apply_unflushed, [batch])
                    total.data_bytes += stats.data_bytes
                    total.zero_bytes += stats.zero_bytes
                    total.records += stats.records
                    touched |= disk_set
                    cursor = batch.last_seq
                    first_ts = batch.min_ts_ns if first_ts is None else first_ts
                    last_ts, epoch = batch.max_ts_ns, max(epoch, batch.epoch)
                    self.metrics.batches.labels(vm=self.vm_id).inc()
            if cursor != intent.last_seq:
                raise _UnitBroken(f"the unit ends at seq {cursor}, expected {intent.last_seq}")
        except _UnitBroken as exc:
            detail = f"cannot apply seq {intent.first_seq}..{intent.last_seq} whole: {exc}"
            # Nothing written, now or by an attempt before: the target is still
            # consistent, drop the intent. Otherwise keep it: the disks are dirty until a
            # full resync repairs them.
            await self._stop_for_resync(
                "unit-unreadable", detail, intent.end_offset, keep_intent=written or dirty
            )
            return
        await _blocking(disks.flush, touched)
        await self._save(self._applied_state(intent, last_ts, epoch))
        self._account(total, [], first_ts or last_ts, started)
        if intent.resync_id or heals:
            self._report("resync-applied", resync_id=intent.resync_id)

    def _applied_state(self, intent: ApplyIntent, source_ts_ns: int, epoch: int) -> VmState:
        return self.state.with_changes(
            applied_seq=intent.last_seq,
            applied_offset=intent.end_offset,
            source_ts_ns=source_ts_ns,
            epoch=epoch,
            health=Health.OK,
            reason="",
            intent=None,
            extra={},
        )

    def _account(
        self, stats: ApplyStats, batches: list[Batch], oldest_ts_ns: int, started: float
    ) -> None:
        label = self.vm_id
        m = self.metrics
        m.units.labels(vm=label).inc()
        if batches:
            m.batches.labels(vm=label).inc(len(batches))
        m.data_bytes.labels(vm=label).inc(stats.data_bytes)
        m.zero_bytes.labels(vm=label).inc(stats.zero_bytes)
        m.apply_seconds.labels(vm=label).observe(time.monotonic() - started)
        m.apply_age.labels(vm=label).observe(max(0.0, (time.time_ns() - oldest_ts_ns) / 1e9))

    async def _stop_for_resync(
        self,
        reason: str,
        detail: str,
        offset: int,
        *,
        keep_intent: bool = False,
        seen_ts_ns: int | None = None,
        seen_last_seq: int | None = None,
    ) -> None:
        """seen_ts_ns: the source time of the oldest write seen and not applied (the
        RPO counts from it when nothing was ever applied); seen_last_seq: the last sequence
        number of the batch the VM stopped at, when it could be read (the report gives
        it: a resync numbered after it repairs the VM, see vib/resync_requests.py)."""
        log.error("VM %s stops: %s: %s; a resync is needed", self.vm_id, reason, detail)
        self.metrics.gaps.labels(vm=self.vm_id, reason=reason).inc()
        self._bracket = None
        missing_since = int(self.state.extra.get("missing_since_ns") or 0) or seen_ts_ns
        await self._save(
            self.state.with_changes(
                health=Health.NEEDS_RESYNC,
                reason=f"{reason}: {detail}",
                intent=self.state.intent if keep_intent else None,
                extra={
                    "resync_after_offset": offset,
                    "problem": reason,
                    "problem_last_seq": seen_last_seq,
                    "missing_since_ns": missing_since or time.time_ns(),
                },
            )
        )
        self._report("needs-resync")

    # --- state --------------------------------------------------------------------------

    def _require_disks(self) -> TargetDisks:
        if self._disks is None:
            raise RuntimeError(f"VM {self.vm_id}: target disks are not open")
        return self._disks

    async def _save(self, state: VmState) -> None:
        await _blocking(self.store.save, state)
        self._set_state(state)

    def _set_state(self, state: VmState) -> None:
        self.state = state
        label = self.vm_id
        if state.applied_seq is not None:
            self.metrics.applied_seq.labels(vm=label).set(state.applied_seq)
        self.metrics.applied_source_ts.labels(vm=label).set(state.source_ts_ns / 1e9)
        needs = 1 if state.health is Health.NEEDS_RESYNC else 0
        self.metrics.needs_resync.labels(vm=label).set(needs)

    # --- reporting ----------------------------------------------------------------------

    def rpo_seconds(self) -> float:
        now = time.time_ns()
        state = self.state
        if state.health is Health.NEEDS_RESYNC or state.intent is not None:
            # Stuck: every write since the last applied one is missing on the target.
            # With nothing ever applied, every write is: count from the oldest seen.
            base = (
                state.source_ts_ns
                or int(state.extra.get("missing_since_ns") or 0)
                or self._oldest_known_ts()
            )
            return max(0.0, (now - base) / 1e9) if base else 0.0
        oldest = self._oldest_known_ts()
        if oldest is not None:
            return max(0.0, (now - oldest) / 1e9)
        # Nothing read is waiting. Writes may still be on their way (in the tap, the
        # receiver's batch window, a transaction): any of them is newer than the newest
        # record applied, so its age bounds the RPO from above. The tap's heartbeats keep
        # that record recent while the guest is idle, and let it age when the pipeline
        # stalls.
        return max(0.0, (now - state.source_ts_ns) / 1e9) if state.source_ts_ns else 0.0

    def _oldest_known_ts(self) -> int | None:
        if self._bracket is not None:
            return self._bracket.min_ts_ns
        applied = self.state.applied_seq
        for item in self._pending:
            batch = item.batch
            if batch is None:
                return None
            if applied is None or batch.last_seq > applied:
                return batch.min_ts_ns
        return None

    def _caught_up(self) -> bool:
        if self._pending or self._held or self._bracket is not None:
            return False
        if self._last_fetch_empty:
            return True
        return self._end_offset is not None and self._read_offset >= self._end_offset

    def _lag_messages(self) -> float:
        if self._end_offset is None or self._caught_up():
            return 0.0
        return float(max(0, self._end_offset - self.state.next_offset))

    def _staged_resync_age(self) -> float:
        bracket = self._bracket
        if bracket is None:
            return 0.0
        return max(0.0, (time.time_ns() - bracket.min_ts_ns) / 1e9)

    def _lag_batches(self) -> float:
        staged = self._bracket.batches if self._bracket is not None else 0
        return float(len(self._pending) + staged)

    def _lag_bytes(self) -> float:
        staged = self._bracket.nbytes if self._bracket is not None else 0
        return float(self._pending_bytes + staged)

    def _position(self) -> dict[str, Any]:
        """The durable state's fields, as /status and the status reports show them."""
        state = self.state
        return {
            "vm_id": self.vm_id,
            "health": state.health.value,
            "reason": state.reason,
            # The target disks may hold a half-applied unit (until it is re-applied).
            "dirty": state.intent is not None,
            # 0 until something is applied (sequences start at 1).
            "applied_seq": state.applied_seq or 0,
            "applied_offset": state.applied_offset,
            "source_ts_ns": state.source_ts_ns,
            "epoch": state.epoch,
        }

    def status(self) -> dict[str, Any]:
        state = self.state
        bracket = self._bracket
        return {
            **self._position(),
            "phase": self.phase,
            "paused": self.paused,
            "pause_requested": self._pause_requested,
            "source_time": _iso(state.source_ts_ns),
            "rpo_seconds": round(self.rpo_seconds(), 3),
            "rpo_objective_seconds": self.vm.rpo_objective_s,
            "lag_messages": int(self._lag_messages()),
            "lag_batches": int(self._lag_batches()),
            "lag_bytes": int(self._lag_bytes()),
            "end_offset": self._end_offset,
            "staging_resync": None
            if bracket is None
            else {
                "resync_id": bracket.resync_id,
                "first_seq": bracket.first_seq,
                "last_seq": bracket.last_seq,
                "batches": bracket.batches,
                "bytes": bracket.nbytes,
                "age_seconds": round(self._staged_resync_age(), 3),
                "repairs_gap": bracket.heals,
                "covered_bytes": None
                if bracket.coverage is None
                else bracket.coverage.covered_bytes(),
            },
            "refused_resync": state.extra.get("refused_resync"),
            "last_error": self.last_error,
        }

    def _report(self, event: str, **fields: Any) -> None:
        """Publishes the VM's state to the status topic in the background (a report that
        cannot be sent is retried by the sink; the state file is the truth)."""
        sink = self.status_sink
        if sink is None:
            return
        report: dict[str, Any] = {
            "service": "applier",
            "event": event,
            **self._position(),
            "ts_ns": time.time_ns(),
            **fields,
        }
        if event == "needs-resync":
            report["wants"] = "full-resync"
            report["last_seq"] = self.state.extra.get("problem_last_seq")
        task = asyncio.create_task(sink.publish(self.vm_id, report))
        self._reports.add(task)
        task.add_done_callback(self._report_done)

    def _report_done(self, task: asyncio.Task[None]) -> None:
        self._reports.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("VM %s: status report not sent: %s", self.vm_id, task.exception())

    async def close(self) -> None:
        for task in list(self._reports):
            task.cancel()
        await asyncio.gather(*self._reports, return_exceptions=True)


async def _blocking(function: Callable[..., T], *args: Any) -> T:
    """Runs blocking I/O in a thread. Cancelling the caller waits for the thread to end:
    the disks must not be closed (and their descriptors reused) under a running write."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _iso(ts_ns: int) -> str | None:
    if not ts_ns:
        return None
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos // 1000:06d}Z"
