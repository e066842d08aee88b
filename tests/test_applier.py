"""The applier against real brokers: order, duplicates, gaps, resync brackets, thin
targets, NBD targets, redo after a crash in the middle of a unit."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka.structs import TopicPartition
from conftest import LoopDevices
from test_applier_support import (
    BLOCK,
    JournalWriter,
    SourceVm,
    create_topics,
    file_targets,
    running_applier,
    wait_until,
    write_plan,
)

from datapath.integrity import OpKind, consistent_prefixes, holds_prefix
from datapath.journal import encode_batch
from datapath.kafka import Consumer, KafkaClusterSettings
from datapath.storage import FileBackend, NbdBackend
from datapath.topics import Stream, topic_name
from services.applier.coverage import Coverage
from services.applier.disks import TargetDisks
from services.applier.state import ApplyIntent, Health, StateStore
from services.applier.vm import VmApplier
from services.applier.worker import ApplierWorker

MIB = 1024 * 1024


def images_of(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def applied_seq(worker: ApplierWorker, vm_id: str) -> int | None:
    return worker.vm(vm_id).state.applied_seq


def metric(worker: ApplierWorker, name: str, **labels: str) -> float:
    value = worker.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def assert_rpo_is_the_newest_applied_age(read: Callable[[], float], applier: VmApplier) -> None:
    """Drained: the RPO is the age of the newest applied write, an upper bound (whatever
    is not on the target yet is newer); never 0 while writes may be on their way."""
    newest = applier.state.source_ts_ns
    before = (time.time_ns() - newest) / 1e9
    rpo = read()
    after = (time.time_ns() - newest) / 1e9
    assert newest > 0 and 0 < before <= rpo <= after


async def test_batches_apply_in_order_and_target_equals_the_source(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    sizes = [4 * MIB, 2 * MIB]
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    vm = SourceVm(vm_id, sizes, seed=11)
    async with JournalWriter(target_cluster, vm_id) as writer:
        # Multi-chunk batches (64 KiB messages), several batches per transaction.
        for _ in range(10):
            await writer.send(vm.batch(vm.ops(12)), vm.batch(vm.ops(12)))
        async with running_applier(plan, tmp_path / "state") as worker:
            await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="drain")
            assert images_of(disks) == [bytes(m) for m in vm.model]
            assert holds_prefix(consistent_prefixes(vm.log, disks), vm.last_seq)
            status = worker.status()["vms"][vm_id]
            assert status["health"] == "ok" and status["dirty"] is False
            assert status["source_ts_ns"] > 0
            applier = worker.vm(vm_id)
            assert_rpo_is_the_newest_applied_age(applier.rpo_seconds, applier)
            assert_rpo_is_the_newest_applied_age(
                lambda: metric(worker, "datamover_rpo_seconds", vm=vm_id), applier
            )
            assert metric(worker, "datamover_applier_batches_applied_total", vm=vm_id) == 20
            # More batches while it runs.
            await writer.send(vm.batch(vm.ops(5)))
            await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="drain")
            assert images_of(disks) == [bytes(m) for m in vm.model]
    # The position is durable: a new applier resumes and applies only what is new.
    state = StateStore(tmp_path / "state").load(vm_id)
    assert state.applied_seq == vm.last_seq and state.intent is None


async def test_paused_vm_applies_nothing_and_its_rpo_grows(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, [MIB])
    vm = SourceVm(vm_id, [MIB], seed=4)
    async with (
        JournalWriter(target_cluster, vm_id) as writer,
        running_applier(plan, tmp_path / "state") as worker,
    ):
        applier = worker.vm(vm_id)
        await writer.send(vm.batch(vm.ops(5)))
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="applied")
        paused_at = (await applier.pause()).applied_seq
        held = images_of(disks)
        pending = vm.batch(vm.ops(5))
        await writer.send(pending)
        await wait_until(lambda: applier.status()["lag_batches"] == 1, what="read ahead")
        assert applier.state.applied_seq == paused_at and images_of(disks) == held
        assert applier.status()["paused"] and applier.state.paused
        # The oldest write not applied is `pending`'s: the RPO is its age.
        age = (time.time_ns() - pending.min_ts_ns) / 1e9
        assert applier.rpo_seconds() >= age > 0
    # A pause survives a restart of the applier (the state file remembers it).
    async with running_applier(plan, tmp_path / "state") as worker:
        applier = worker.vm(vm_id)
        await wait_until(lambda: applier.paused, what="paused again after a restart")
        assert applier.state.applied_seq == paused_at
        await applier.resume()
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="resumed")
        assert_rpo_is_the_newest_applied_age(applier.rpo_seconds, applier)
    assert images_of(disks) == [bytes(vm.model[0])]


async def test_missing_journal_topic_is_reported_or_created(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    disks = [tmp_path / "t0.img"]
    plan = write_plan(
        tmp_path / "plan.yaml", source_cluster, target_cluster, {vm_id: [(str(disks[0]), MIB)]}
    )
    async with running_applier(plan, tmp_path / "state", create_topics=False) as worker:
        applier = worker.vm(vm_id)
        await wait_until(lambda: "does not exist" in applier.last_error, what="the error")
        assert topic_name(Stream.BATCH, vm_id) in applier.status()["last_error"]
    async with running_applier(plan, tmp_path / "state") as worker:
        applier = worker.vm(vm_id)
        await wait_until(lambda: applier.phase == "idle", what="journal created and read")
        vm = SourceVm(vm_id, [MIB], seed=8)
        async with JournalWriter(target_cluster, vm_id) as writer:
            await writer.send(vm.batch(vm.ops(5)))
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="applied")
    assert images_of(disks) == [bytes(vm.model[0])]


async def test_an_applier_whose_loop_keeps_failing_is_not_ready(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    # The plan's target (1 MiB) is smaller than the source's writes reach (2 MiB).
    _, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, [MIB])
    vm = SourceVm(vm_id, [2 * MIB], seed=21)
    async with (
        JournalWriter(target_cluster, vm_id) as writer,
        running_applier(plan, tmp_path / "state") as worker,
    ):
        await wait_until(worker.ready, what="ready")
        await writer.send(vm.batch([vm.write(0, 2 * MIB // BLOCK - 1, 1)]))
        await wait_until(lambda: worker.vm(vm_id).phase == "error", what="the loop failing")
        assert not worker.ready()
        assert "BatchRefused" in worker.status()["vms"][vm_id]["last_error"]


async def test_duplicate_batches_are_refused_silently(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    sizes = [2 * MIB]
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    vm = SourceVm(vm_id, sizes, seed=5)
    first = vm.batch(vm.ops(10))
    second = vm.batch(vm.ops(10))
    # An overwrite in a later batch: replaying `first` after it would undo it.
    third = vm.batch([vm.write(0, 0, 64)])
    fourth = vm.batch(vm.ops(10))
    async with JournalWriter(target_cluster, vm_id) as writer:
        await writer.send(first, second, first, third)
        await writer.send(second, first, third, fourth, fourth)
        async with running_applier(plan, tmp_path / "state") as worker:
            await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="drain")
            await wait_until(
                lambda: metric(worker, "datamover_applier_duplicate_batches_total", vm=vm_id) == 5,
                what="5 duplicates counted",
            )
            assert worker.vm(vm_id).state.health is Health.OK
    assert images_of(disks) == [bytes(vm.model[0])]


async def test_applier_never_applies_past_a_gap_and_asks_for_a_resync(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    sizes = [2 * MIB, 1 * MIB]
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    status_end = await _end_offset(target_cluster, topic_name(Stream.STATUS))
    vm = SourceVm(vm_id, sizes, seed=7)
    before = [vm.batch(vm.ops(8)) for _ in range(3)]
    applied_model = [bytes(m) for m in vm.model]
    last_good = vm.last_seq
    lost = vm.batch(vm.ops(8))  # never reaches the target journal
    after = [vm.batch(vm.ops(8)) for _ in range(3)]
    async with JournalWriter(target_cluster, vm_id) as writer:
        await writer.send(*before)
        await writer.send(*after)
        async with running_applier(plan, tmp_path / "state") as worker:
            applier = worker.vm(vm_id)
            await wait_until(lambda: applier.state.health is Health.NEEDS_RESYNC, what="stop")
            assert applier.state.applied_seq == last_good
            missing = f"seq {lost.first_seq}..{lost.last_seq} missing"
            assert applier.state.reason.startswith("gap: ") and missing in applier.state.reason
            assert images_of(disks) == applied_model
            assert metric(worker, "datamover_applier_gaps_total", vm=vm_id, reason="gap") == 1
            assert worker.status()["vms"][vm_id]["health"] == "needs-resync"
            report = await _status_report(target_cluster, vm_id, status_end)
            assert report["health"] == "needs-resync" and report["event"] == "needs-resync"
            assert report["applied_seq"] == last_good and report["wants"] == "full-resync"
            # The batch it stopped at ends there: a full sync numbered after it repairs it.
            assert report["last_seq"] == after[0].last_seq
            # More writes keep arriving; none is applied while the hole is there.
            await writer.send(vm.batch(vm.ops(8)))
            await wait_until(lambda: applier._caught_up(), what="read to the end")
            assert applier.state.applied_seq == last_good
            assert images_of(disks) == applied_model
            # A resync of some regions (e.g. after a Kafka outage) cannot repair lost
            # writes: refused, the VM keeps waiting.
            await writer.send(*vm.resync(41, [(0, 0, 64 * BLOCK), (1, 0, 64 * BLOCK)]))
            await wait_until(
                lambda: bool(applier.state.extra.get("refused_resync")), what="refusal"
            )
            assert "sets 524288 of 3145728 bytes" in applier.state.extra["refused_resync"]
            assert applier.state.health is Health.NEEDS_RESYNC
            assert images_of(disks) == applied_model
            # The source answers with a full resync (a bracket), then goes on writing.
            await writer.send(*vm.full_resync(resync_id=42))
            tail = vm.batch(vm.ops(8))
            await writer.send(tail)
            await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="healed")
            # Read afresh: mypy would keep the NEEDS_RESYNC narrowing of `applier.state`.
            assert worker.vm(vm_id).state.health is Health.OK
            assert images_of(disks) == [bytes(m) for m in vm.model]


async def test_corrupt_batch_stops_only_its_vm(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    other_id = vm_id + "-other"
    plan = write_plan(
        tmp_path / "plan.yaml",
        source_cluster,
        target_cluster,
        {vm_id: [(str(tmp_path / "a.img"), MIB)], other_id: [(str(tmp_path / "b.img"), MIB)]},
    )
    await create_topics(target_cluster, vm_id, other_id)
    vm, other = SourceVm(vm_id, [MIB], seed=1), SourceVm(other_id, [MIB], seed=2)
    good = vm.batch(vm.ops(5))
    applied_model = bytes(vm.model[0])
    corrupt = bytearray(encode_batch(vm.batch(vm.ops(5)), max_message_bytes=1 << 20)[0])
    corrupt[-10] ^= 0xFF
    async with (
        JournalWriter(target_cluster, vm_id) as writer,
        JournalWriter(target_cluster, other_id) as other_writer,
    ):
        await writer.send(good)
        await writer.send_raw([bytes(corrupt)])
        await writer.send(vm.batch(vm.ops(5)))
        await other_writer.send(other.batch(other.ops(5)))
        async with running_applier(plan, tmp_path / "state") as worker:
            await wait_until(
                lambda: worker.vm(vm_id).state.health is Health.NEEDS_RESYNC, what="stop"
            )
            assert "CRC32C" in worker.vm(vm_id).state.reason
            assert worker.vm(vm_id).state.applied_seq == good.last_seq
            await wait_until(lambda: applied_seq(worker, other_id) == other.last_seq, what="other")
            await other_writer.send(other.batch(other.ops(5)))
            await wait_until(lambda: applied_seq(worker, other_id) == other.last_seq, what="other")
            assert worker.ready()
    assert (tmp_path / "a.img").read_bytes() == applied_model
    assert (tmp_path / "b.img").read_bytes() == bytes(other.model[0])


async def test_incomplete_resync_bracket_is_not_applied_until_closed(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    sizes = [2 * MIB]
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    vm = SourceVm(vm_id, sizes, seed=3)
    async with JournalWriter(target_cluster, vm_id) as writer:
        await writer.send(vm.batch(vm.ops(10)), vm.batch(vm.ops(10)))
        before = vm.last_seq
        before_model = bytes(vm.model[0])
        bracket = [
            vm.batch(vm.ops(10), resync_id=9, starts=True),
            vm.batch(vm.ops(10), resync_id=9),
            vm.batch(vm.ops(10), resync_id=9),
        ]
        closing = vm.batch(vm.ops(10), resync_id=9, completes=True)
        async with running_applier(plan, tmp_path / "state") as worker:
            applier = worker.vm(vm_id)
            await writer.send(*bracket[:2])
            await writer.send(bracket[2])
            await wait_until(
                lambda: (applier.status()["staging_resync"] or {}).get("batches") == 3,
                what="bracket staged",
            )
            assert applier.state.applied_seq == before
            assert disks[0].read_bytes() == before_model
            assert holds_prefix(consistent_prefixes(vm.log, disks), before)
            # Staged batches are not counted as applied, but they are the RPO.
            assert applier.rpo_seconds() > 0
            assert applier.status()["lag_batches"] == 3
            # Operators see how long the bracket has been staging, and how large it is.
            before_s = (time.time_ns() - bracket[0].min_ts_ns) / 1e9
            staged_age = metric(worker, "datamover_applier_staged_resync_seconds", vm=vm_id)
            after_s = (time.time_ns() - bracket[0].min_ts_ns) / 1e9
            assert 0 < before_s <= staged_age <= after_s
            assert metric(worker, "datamover_applier_staged_resync_bytes", vm=vm_id) > 0
            await writer.send(closing)
            await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="bracket")
            assert applier.status()["staging_resync"] is None
            assert metric(worker, "datamover_applier_staged_resync_seconds", vm=vm_id) == 0
            assert metric(worker, "datamover_applier_staged_resync_bytes", vm=vm_id) == 0
            assert metric(worker, "datamover_applier_units_applied_total", vm=vm_id) == 2
    assert disks[0].read_bytes() == bytes(vm.model[0])


async def test_superseded_bracket_is_applied_with_its_successor_as_one_unit(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    """A tap that restarts mid-resync leaves its bracket without an END and opens a new
    one; the abandoned bracket's batches are still in the sequence, so they are applied
    with the new bracket, as one unit, when it completes (never before, never dropped)."""
    sizes = [2 * MIB]
    disks, plan = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    vm = SourceVm(vm_id, sizes, seed=5)
    async with JournalWriter(target_cluster, vm_id) as writer:
        await writer.send(vm.batch(vm.ops(10)))
        before = vm.last_seq
        before_model = bytes(vm.model[0])
        abandoned = [
            vm.batch(vm.ops(10), resync_id=9, starts=True),
            vm.batch(vm.ops(10), resync_id=9),
        ]
        # The restarted tap: a new epoch, then a new bracket. Its writes do not cover the
        # abandoned bracket's, so the target equals the source only if those were applied.
        vm.epoch = 2
        restarted = vm.batch(vm.ops(5))
        successor = vm.batch(vm.ops(10), resync_id=10, starts=True)
        closing = vm.batch(vm.ops(10), resync_id=10, completes=True)
        async with running_applier(plan, tmp_path / "state") as worker:
            applier = worker.vm(vm_id)
            await wait_until(lambda: applier.state.applied_seq == before, what="live batch")
            await writer.send(*abandoned)
            await writer.send(restarted, successor)
            await wait_until(
                lambda: (applier.status()["staging_resync"] or {}).get("batches") == 4,
                what="both brackets staged",
            )
            assert applier.status()["staging_resync"]["resync_id"] == 10
            assert applier.state.applied_seq == before
            assert disks[0].read_bytes() == before_model
            await writer.send(closing)
            await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="unit")
            assert applier.status()["staging_resync"] is None
            assert metric(worker, "datamover_applier_units_applied_total", vm=vm_id) == 2
    assert disks[0].read_bytes() == bytes(vm.model[0])


async def test_thin_target_stays_sparse(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    size = 64 * MIB
    disk = tmp_path / "thin.img"
    plan = write_plan(
        tmp_path / "plan.yaml", source_cluster, target_cluster, {vm_id: [(str(disk), size)]}
    )
    await create_topics(target_cluster, vm_id)
    vm = SourceVm(vm_id, [size])
    blocks = MIB // BLOCK
    async with (
        JournalWriter(target_cluster, vm_id, max_message_bytes=1 << 20) as writer,
        running_applier(plan, tmp_path / "state") as worker,
    ):
        applier = worker.vm(vm_id)
        # 4 MiB of data spread over the disk.
        writes = [vm.write(0, index * 4 * blocks, blocks) for index in range(4)]
        await writer.send(vm.batch(writes))
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="writes")
        assert disk.stat().st_size == size
        written = disk.stat().st_blocks * 512
        assert 4 * MIB <= written < 5 * MIB
        # Zero one, trim another: the target punches holes, no data travels.
        zero = vm.zero(0, 0, blocks)
        trim = vm.zero(0, 4 * blocks, blocks, kind=OpKind.TRIM)
        batch = vm.batch([zero, trim])
        assert all(not r.data for r in batch.records)
        await writer.send(batch)
        await wait_until(lambda: applier.state.applied_seq == vm.last_seq, what="zeroes")
        assert disk.stat().st_blocks * 512 <= written - 2 * MIB
        with FileBackend(disk, readonly=True) as backend:
            holes = [e for e in backend.allocated_extents() if e.zero]
        assert any(e.offset <= 0 and e.end >= MIB for e in holes)
        assert any(e.offset <= 4 * MIB and e.end >= 5 * MIB for e in holes)
    assert disk.read_bytes() == bytes(vm.model[0])


@pytest.fixture
def qcow2_export(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An empty 16 MiB qcow2 image served by `qemu-nbd -t` on a Unix socket."""
    if shutil.which("qemu-nbd") is None:
        pytest.fail("qemu-nbd is not installed (make setup)")
    image = tmp_path / "target.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(16 * MIB)], check=True
    )
    socket_path = tmp_path / "nbd.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "-t", "-f", "qcow2", "--cache=none", "-k", str(socket_path), str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert server.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not create its socket"
            time.sleep(0.05)
        yield image, f"nbd+unix:///?socket={socket_path}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def qcow2_as_raw(image: Path) -> bytes:
    raw = image.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    return raw.read_bytes()


async def test_qcow2_target_served_by_qemu_nbd(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
    qcow2_export: tuple[Path, str],
) -> None:
    image, uri = qcow2_export
    size = 16 * MIB
    plan = write_plan(
        tmp_path / "plan.yaml", source_cluster, target_cluster, {vm_id: [(uri, size)]}
    )
    await create_topics(target_cluster, vm_id)
    vm = SourceVm(vm_id, [size], seed=21)
    async with JournalWriter(target_cluster, vm_id, max_message_bytes=1 << 20) as writer:
        for _ in range(4):
            await writer.send(vm.batch(vm.ops(15)))
        await writer.send(vm.batch([vm.zero(0, 0, 256)]))
        async with running_applier(plan, tmp_path / "state") as worker:
            await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="drain")
    with NbdBackend(uri, readonly=True) as backend:
        assert backend.read(0, size) == bytes(vm.model[0])
        assert holds_prefix(consistent_prefixes(vm.log, [backend]), vm.last_seq)
    # What qemu-nbd wrote is a valid qcow2 holding the same disk.
    assert await asyncio.to_thread(qcow2_as_raw, image) == bytes(vm.model[0])


@pytest.fixture
def loop_device(loop_devices: LoopDevices) -> tuple[str, Path]:
    """A loop device over an 8 MiB sparse file: (device, backing file)."""
    return loop_devices(8 * MIB)


async def test_block_device_target(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
    loop_device: tuple[str, Path],
) -> None:
    device, backing = loop_device
    # The device (8 MiB) is larger than its source (6 MiB), as a volume rounded up.
    plan = write_plan(
        tmp_path / "plan.yaml", source_cluster, target_cluster, {vm_id: [(device, 6 * MIB)]}
    )
    await create_topics(target_cluster, vm_id)
    vm = SourceVm(vm_id, [6 * MIB], seed=17, zero_fraction=0.2, trim_fraction=0.2)
    source = lambda: bytes(vm.model[0]) + bytes(2 * MIB)  # noqa: E731
    async with JournalWriter(target_cluster, vm_id) as writer:
        await writer.send(*[vm.batch(vm.ops(10)) for _ in range(3)])
        async with running_applier(plan, tmp_path / "state") as worker:
            await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="drain")
            assert images_of([Path(device)]) == [source()]
            # After a gap, a full resync of the source's 6 MiB repairs it.
            vm.batch(vm.ops(5))  # lost
            await writer.send(vm.batch(vm.ops(5)))
            applier = worker.vm(vm_id)
            await wait_until(lambda: applier.state.health is Health.NEEDS_RESYNC, what="gap")
            await writer.send(*vm.full_resync(resync_id=5))
            await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="healed")
            assert worker.vm(vm_id).state.health is Health.OK
    assert images_of([Path(device)]) == [source()]
    assert backing.read_bytes() == source()


async def test_crash_in_the_middle_of_a_unit_is_repaired_before_anything_else(
    tmp_path: Path,
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    vm_id: str,
) -> None:
    sizes = [2 * MIB, 2 * MIB]
    disks, plan_path = await file_targets(tmp_path, source_cluster, target_cluster, vm_id, sizes)
    state_dir = tmp_path / "state"
    vm = SourceVm(vm_id, sizes, seed=13, zero_fraction=0.2, trim_fraction=0.1)
    applied = [vm.batch(vm.ops(10)) for _ in range(2)]
    unit = [vm.batch(vm.ops(20)) for _ in range(3)]
    later = vm.batch(vm.ops(10))  # in the journal after the unit
    async with JournalWriter(target_cluster, vm_id) as writer:
        await writer.send(*applied)
        async with running_applier(plan_path, state_dir) as worker:
            await wait_until(lambda: applied_seq(worker, vm_id) == applied[-1].last_seq, what="a")
            position = worker.vm(vm_id).state
        await writer.send(*unit)
        await writer.send(later)
    start, end = await _batch_offsets(target_cluster, vm_id, position.next_offset, len(unit))
    # The crash: intent durable, part of the unit on disk, a torn write, no position.
    store = StateStore(state_dir)
    intent = ApplyIntent(unit[0].first_seq, unit[-1].last_seq, start, end)
    store.save(position.with_changes(intent=intent))
    from datapath.protection import load_protection_plan

    targets = TargetDisks(load_protection_plan(plan_path).vms[0])
    try:
        targets.apply([unit[0]])
        half = unit[1].records[: len(unit[1].records) // 2]
        for record in half:
            if record.data:
                torn = len(record.data) // 2
                targets.backends[record.disk].write(record.offset, bytes(record.data[:torn]))
        targets.flush_all()
    finally:
        targets.close()
    assert not holds_prefix_safe(vm, disks, unit[-1].last_seq)
    async with running_applier(plan_path, state_dir) as worker:
        # A pause asked for at once is granted only on a repaired target: the unit
        # redone whole, whatever came after it applied or not.
        state = await worker.vm(vm_id).pause()
        assert state.intent is None and state.applied_seq is not None
        assert state.applied_seq >= unit[-1].last_seq
        assert holds_prefix(consistent_prefixes(vm.log, disks), state.applied_seq)
        await worker.vm(vm_id).resume()
        await wait_until(lambda: applied_seq(worker, vm_id) == vm.last_seq, what="redo")
        assert metric(worker, "datamover_applier_redo_total", vm=vm_id) == 1
        assert worker.vm(vm_id).state.intent is None
    assert images_of(disks) == [bytes(m) for m in vm.model]


def holds_prefix_safe(vm: SourceVm, disks: list[Path], seq: int) -> bool:
    from datapath.integrity import NotAPrefix

    try:
        return holds_prefix(consistent_prefixes(vm.log, disks), seq)
    except NotAPrefix:
        return False


async def _batch_offsets(
    cluster: KafkaClusterSettings, vm_id: str, from_offset: int, batches: int
) -> tuple[int, int]:
    """First and last offsets of the next `batches` batches at or after from_offset."""
    from datapath.journal import peek_header

    partition = TopicPartition(topic_name(Stream.BATCH, vm_id), 0)
    async with Consumer(cluster) as consumer:
        consumer.assign([partition])
        consumer.seek(partition, from_offset)
        first: int | None = None
        seen = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            records = await consumer.getmany(partition, timeout_ms=500)
            for record in records.get(partition, []):
                header = peek_header(record.value)
                if first is None:
                    first = record.offset
                if header.is_last:
                    seen += 1
                    if seen == batches:
                        return first, int(record.offset)
    raise AssertionError("batches not found in the journal")


async def _end_offset(cluster: KafkaClusterSettings, topic: str) -> int:
    partition = TopicPartition(topic, 0)
    async with Consumer(cluster) as consumer:
        consumer.assign([partition])
        return (await consumer.end_offsets([partition]))[partition]


async def _status_report(
    cluster: KafkaClusterSettings, vm_id: str, start: int
) -> dict[str, object]:
    """The applier's latest report for vm_id on the status topic (after `start`)."""
    partition = TopicPartition(topic_name(Stream.STATUS), 0)
    key = f"applier/{vm_id}".encode()
    found: dict[str, object] | None = None
    async with Consumer(cluster) as consumer:
        consumer.assign([partition])
        consumer.seek(partition, start)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            records = await consumer.getmany(partition, timeout_ms=500)
            batch = records.get(partition, [])
            for record in batch:
                if record.key == key:
                    found = json.loads(record.value)
            if found is not None and not batch:
                return found
    raise AssertionError(f"no status report for {vm_id}")


def test_state_survives_a_reload(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.prepare()
    state = store.load("vm-a")
    assert state.applied_seq is None and state.next_offset == 0
    saved = state.with_changes(
        applied_seq=41,
        applied_offset=99,
        source_ts_ns=123,
        epoch=2,
        paused=True,
        intent=ApplyIntent(42, 50, 100, 130, resync_id=7),
    )
    store.save(saved)
    assert store.load("vm-a") == saved
    assert not list(tmp_path.glob("*.tmp"))
    os.rename(store.path("vm-a"), store.path("vm-b"))
    from services.applier.state import StateFileError

    with pytest.raises(StateFileError, match="belongs to VM 'vm-a'"):
        store.load("vm-b")


def test_an_empty_disk_is_covered_by_any_bracket() -> None:
    coverage = Coverage([0, 2 * BLOCK])
    coverage.add(1, 0, 2 * BLOCK)
    assert coverage.complete()


def test_coverage_counts_every_byte_a_bracket_sets_once() -> None:
    coverage = Coverage([100, 50])
    coverage.add(0, 10, 20)
    coverage.add(0, 30, 40)
    coverage.add(0, 15, 35)  # bridges both
    coverage.add(0, 40, 45)  # touches: merges
    coverage.add(1, 0, 50)
    coverage.add(5, 0, 10)  # a disk the VM does not have: ignored
    assert coverage.covered_bytes() == 35 + 50
    assert not coverage.complete()
    coverage.add(0, 0, 10)
    coverage.add(0, 45, 100)
    assert coverage.complete() and coverage.covered_bytes() == coverage.total_bytes
