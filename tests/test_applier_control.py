"""One VM's apply loop in the states a crash or an operator leaves it in: a redo that
cannot re-read its unit, a crash while a repairing resync was applied, pause and resume
racing with the loop, the RPO of a target that never applied anything. An in-memory
journal (tests/test_applier_support.MemoryJournal) stands in for the batch topic: these
are states, not Kafka behaviour, which tests/test_applier.py covers against brokers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_applier_support import BLOCK, MemoryJournal, SourceVm, memory_applier, wait_until

from datapath.journal import Batch, Record, RecordKind, encode_batch
from services.applier.disks import BatchRefused, TargetDisks
from services.applier.state import ApplyIntent, Health, StateStore, VmState
from services.applier.vm import PauseTimeout, VmApplier

MIB = 1024 * 1024


@contextlib.asynccontextmanager
async def running(applier: VmApplier) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(applier.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def image(path: Path) -> bytes:
    return path.read_bytes()


def disks_of(tmp_path: Path, vm: SourceVm) -> list[Path]:
    return [tmp_path / f"t{i}.img" for i in range(len(vm.model))]


async def test_a_redo_that_cannot_reread_its_unit_keeps_the_target_dirty(tmp_path: Path) -> None:
    vm = SourceVm("vm-torn", [MIB], seed=3)
    disks = disks_of(tmp_path, vm)
    journal = MemoryJournal()
    journal.append(vm.batch([vm.write(0, 0, 4)]))
    async with running(memory_applier(vm, disks, journal, tmp_path / "state")) as _:
        applier_state = StateStore(tmp_path / "state")
        await wait_until(lambda: applier_state.load(vm.vm_id).applied_seq == 1, what="seq 1")
    applied = StateStore(tmp_path / "state").load(vm.vm_id)
    # Seq 2 was being applied when the applier was killed: its intent is durable and the
    # first half of its write landed.
    unit = vm.batch([vm.write(0, 0, 2)])
    journal.append(unit)
    start, end = journal.offsets_of(1)
    StateStore(tmp_path / "state").save(
        applied.with_changes(intent=ApplyIntent(unit.first_seq, unit.last_seq, start, end))
    )
    torn = unit.records[0]
    with disks[0].open("r+b") as f:
        f.seek(torn.offset)
        f.write(torn.data[:BLOCK])
    # Retention removed the unit before the applier came back.
    journal.forget_before(end + 1)

    applier = memory_applier(vm, disks, journal, tmp_path / "state", pause_timeout_s=0.5)
    async with running(applier):
        await wait_until(lambda: applier.state.health is Health.NEEDS_RESYNC, what="stop")
        status = applier.status()
        assert status["dirty"] is True and "unit-unreadable" in status["reason"]
        assert StateStore(tmp_path / "state").load(vm.vm_id).intent is not None
        # A torn target is never handed out as consistent.
        with pytest.raises(PauseTimeout, match="dirty"):
            await applier.pause()
        await applier.resume()
        # Only a full resync repairs it; then it is clean and can be paused.
        journal.append(*vm.full_resync(7))
        await wait_until(lambda: applier.state.health is Health.OK, what="repaired")
        assert applier.status()["dirty"] is False
        await applier.pause()
        assert [image(d) for d in disks] == [bytes(m) for m in vm.model]


async def test_a_crash_while_a_repairing_resync_was_applied_is_redone_before_a_pause(
    tmp_path: Path,
) -> None:
    vm = SourceVm("vm-heal", [MIB], seed=5)
    disks = disks_of(tmp_path, vm)
    vm.ops(20)  # written on the source, lost on the way: the target waits for a resync
    journal = MemoryJournal()
    bracket = vm.full_resync(9)
    journal.append(*bracket)
    StateStore(tmp_path / "state").prepare()
    StateStore(tmp_path / "state").save(
        VmState(
            vm_id=vm.vm_id,
            health=Health.NEEDS_RESYNC,
            reason="gap: seq 1..20 missing",
            extra={"resync_after_offset": -1, "problem": "gap"},
            intent=ApplyIntent(
                bracket[0].first_seq, bracket[-1].last_seq, 0, journal.end - 1, resync_id=9
            ),
        )
    )
    disks[0].write_bytes(os.urandom(64 * 1024))  # whatever the killed apply left

    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    async with running(applier):
        # Paused as soon as it can be: that is only once the interrupted unit is redone.
        state = await applier.pause()
        assert applier.status()["dirty"] is False and state.health is Health.OK
        assert state.applied_seq == bracket[-1].last_seq
        assert [image(d) for d in disks] == [bytes(m) for m in vm.model]


async def test_a_bracket_batch_the_disks_refuse_is_refused_before_any_write(
    tmp_path: Path,
) -> None:
    vm = SourceVm("vm-refuse", [MIB], seed=7)
    disks = disks_of(tmp_path, vm)
    vm.ops(5)
    first, *rest = vm.full_resync(3)
    last = rest[-1]
    # The bracket's last batch names a second disk, which the plan does not have.
    stray = Record(RecordKind.SYNC_BLOCK, last.first_seq, 1, 0, BLOCK, last.min_ts_ns, b"x" * BLOCK)
    rest[-1] = dataclasses.replace(last, records=[stray, *last.records])
    journal = MemoryJournal()
    journal.append(first, *rest)
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    with pytest.raises(BatchRefused):
        await asyncio.wait_for(applier.run(), 10)
    assert image(disks[0]) == bytes(MIB)
    state = StateStore(tmp_path / "state").load(vm.vm_id)
    assert state.intent is None and state.applied_seq is None


async def test_a_resume_while_the_loop_is_not_holding_the_pause_is_durable(
    tmp_path: Path,
) -> None:
    vm = SourceVm("vm-resume", [MIB], seed=9)
    disks = disks_of(tmp_path, vm)
    journal = MemoryJournal(start_delay_s=0.5)
    journal.append(vm.batch(vm.ops(3)))
    StateStore(tmp_path / "state").prepare()
    StateStore(tmp_path / "state").save(VmState(vm_id=vm.vm_id, paused=True))
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    async with running(applier):
        await applier.resume()  # while the loop is still starting
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="applied")
        await wait_until(
            lambda: not StateStore(tmp_path / "state").load(vm.vm_id).paused,
            what="the resume made durable",
        )
    # A restarted applier goes on applying.
    journal.append(vm.batch(vm.ops(3)))
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    async with running(applier):
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="applied")
        assert not applier.paused


async def test_a_pause_right_after_a_resume_pauses(tmp_path: Path) -> None:
    vm = SourceVm("vm-pause", [MIB], seed=11)
    disks = disks_of(tmp_path, vm)
    journal = MemoryJournal()
    journal.append(vm.batch(vm.ops(3)))
    applier = memory_applier(vm, disks, journal, tmp_path / "state", pause_timeout_s=3.0)
    async with running(applier):
        await wait_until(lambda: applier.state.applied_seq == 3, what="applied")
        await applier.pause()
        await asyncio.sleep(0.05)  # the paused loop now waits in a fetch
        resumed = asyncio.create_task(applier.resume())
        await asyncio.sleep(0.01)
        state = await applier.pause()
        await resumed
        assert applier.paused and state.paused
        journal.append(vm.batch(vm.ops(3)))
        await asyncio.sleep(0.3)
        assert applier.state.applied_seq == 3  # nothing applied while paused
        await applier.resume()
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="resumed")


async def test_the_rpo_of_a_target_stuck_before_its_first_write_grows(tmp_path: Path) -> None:
    vm = SourceVm("vm-stuck", [MIB], seed=13)
    disks = disks_of(tmp_path, vm)
    vm.ops(4)  # lost
    late = vm.batch(vm.ops(2))
    ten_minutes_ago = time.time_ns() - 600 * 1_000_000_000
    journal = MemoryJournal()
    journal.append(
        dataclasses.replace(
            late,
            min_ts_ns=ten_minutes_ago,
            max_ts_ns=ten_minutes_ago,
            records=[dataclasses.replace(r, ts_ns=ten_minutes_ago) for r in late.records],
        )
    )
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    async with running(applier):
        await wait_until(lambda: applier.state.health is Health.NEEDS_RESYNC, what="gap")
        assert applier.rpo_seconds() >= 600
    # And after a restart, from the durable state alone.
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    async with running(applier):
        await wait_until(lambda: applier.started, what="started")
        assert applier.rpo_seconds() >= 600


async def test_batches_that_compress_to_nothing_are_held_by_their_decompressed_size(
    tmp_path: Path,
) -> None:
    vm = SourceVm("vm-zeros", [4 * MIB], seed=17)
    disks = disks_of(tmp_path, vm)
    journal = MemoryJournal()
    now = time.time_ns()
    for seq in range(1, 41):  # 160 MiB of zeros in some 40 KB of journal
        zeros = Record(RecordKind.WRITE, seq, 0, 0, 4 * MIB, now, bytes(4 * MIB))
        journal.append(Batch(vm.vm_id, 1, seq, seq, now, now, [zeros]))
    applier = memory_applier(vm, disks, journal, tmp_path / "state", max_unit_bytes=16 * MIB)
    peak = 0.0
    async with running(applier):
        while applier.state.applied_seq != 40:
            peak = max(peak, applier._lag_bytes())
            await asyncio.sleep(0.001)
    assert peak <= 16 * MIB + 4 * MIB, "the batches read ahead exceeded the unit bound"
    assert applier.metrics.units.labels(vm=vm.vm_id)._value.get() >= 10
    # What was fetched past the bound waited in memory: the journal was read once, not
    # sought back after every unit (a consumer drops all it prefetched at a seek).
    assert journal.seeks == [0]
    assert image(disks[0]) == bytes(4 * MIB)


async def test_a_redelivered_first_chunk_does_not_move_where_its_batch_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = SourceVm("vm-chunks", [MIB], seed=19)
    disks = disks_of(tmp_path, vm)
    batch = vm.batch([vm.write(0, 0, 8)])  # 32 KiB of data: three chunks of 16 KiB
    first, second, third = encode_batch(batch, max_message_bytes=16 * 1024, compress=False)
    journal = MemoryJournal()
    # An at-least-once writer sent the first chunk again in the middle of the batch.
    journal.messages = dict(enumerate([first, second, first, third]))
    journal.end = 4
    # The applier dies after its intent is durable, before the unit is applied.
    crash = RuntimeError("killed")

    def killed(*args: object) -> None:
        raise crash

    monkeypatch.setattr(TargetDisks, "apply", killed)
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(applier.run(), 10)
    monkeypatch.undo()
    intent = StateStore(tmp_path / "state").load(vm.vm_id).intent
    assert intent is not None and intent.start_offset == 0
    # The restarted applier re-reads the unit from there and applies it.
    applier = memory_applier(vm, disks, journal, tmp_path / "state")
    async with running(applier):
        await wait_until(lambda: applier.state.applied_seq == batch.last_seq, what="redone")
        assert applier.state.health is Health.OK
    assert image(disks[0]) == bytes(vm.model[0])
