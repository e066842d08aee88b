"""The receiver against a real broker: exact batches, quarantined corruption (1, 2, 7)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path

import httpx
import pytest
from replication_helpers import (
    TapStream,
    check_batches,
    create_topics,
    publish,
    read_topic,
    wait_for_batches,
    write_plan,
)
from tap_helpers import wait_until

from datapath.journal import encode_frame
from datapath.kafka import KafkaClusterSettings, KafkaUnavailable, TransactionalProducer
from datapath.protection import ProtectedVM
from datapath.topics import Stream, topic_name
from services.receiver.app import create_app as receiver_app
from services.receiver.settings import ReceiverSettings
from services.receiver.worker import Receiver
from services.transceiver.app import create_app as transceiver_app
from services.transceiver.settings import TransceiverSettings


def receiver_settings(plan: Path, **overrides: object) -> ReceiverSettings:
    tag = uuid.uuid4().hex[:8]
    values: dict[str, object] = {
        "plan": plan,
        "group_id": f"rcv-{tag}",
        "transactional_id_prefix": f"rcv-{tag}",
        "instance_id": f"rcv-{tag}-0",
        "batch_interval_s": 0.1,
        "session_timeout_ms": 6000,
    }
    values.update(overrides)
    return ReceiverSettings(**values)  # type: ignore[arg-type]


async def one_vm(
    source: KafkaClusterSettings, target: KafkaClusterSettings, tmp_path: Path, *, seed: int
) -> tuple[str, Path, TapStream]:
    """A new VM with its topics, a plan protecting it alone, and its tap stream."""
    vm = f"rcv-{uuid.uuid4().hex[:10]}"
    await create_topics(source, [vm])
    plan = write_plan(tmp_path / "plan.yaml", source, target, [vm])
    return vm, plan, TapStream(vm, random.Random(seed))


async def test_receiver_batches_three_vms_gapless_and_equal_to_the_raw_writes(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vms = [f"rcv-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    await create_topics(source_cluster, vms)
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, vms)
    streams = {vm: TapStream(vm, random.Random(index)) for index, vm in enumerate(vms)}
    # Frames published before the receiver starts are read from the beginning.
    for vm, stream in streams.items():
        await publish(source_cluster, vm, [stream.frame(30, hot_blocks=8) for _ in range(5)])
    receiver = Receiver(receiver_settings(plan, fetch_min_bytes=512 * 1024, fetch_max_wait_ms=30))
    await receiver.start()
    try:
        # The fetch bounds are the receiver's settings, not the driver's defaults.
        assert receiver._consumer is not None
        fetcher = receiver._consumer.driver._fetcher
        assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (512 * 1024, 30)
        for round_ in range(4):
            for vm, stream in streams.items():
                frames = [stream.frame(20, hot_blocks=16) for _ in range(5)]
                if round_ == 1 and vm == vms[0]:
                    frames += stream.bracket(6)  # a resync with live writes inside
                await publish(source_cluster, vm, frames)
        for vm, stream in streams.items():
            batches = await wait_for_batches(
                source_cluster, vm, stream.records[-1].seq, timeout_s=60
            )
            check_batches(batches, stream.records)
            assert sum(len(b.records) for b in batches) < len(stream.records), "nothing folded"
        bracketed = [
            b for b in await wait_for_batches(source_cluster, vms[0], 0, timeout_s=5) if b.resync_id
        ]
        assert bracketed and bracketed[-1].resync_complete
        assert all(not b.resync_complete for b in bracketed[:-1])
        status = receiver.status()
        assert status["ready"] and set(status["vms"]) == set(vms)
    finally:
        await receiver.stop()


async def test_corrupt_tap_record_is_quarantined_and_a_resync_requested(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vm, plan, stream = await one_vm(source_cluster, target_cluster, tmp_path, seed=5)
    good_before = [stream.frame(10) for _ in range(3)]
    corrupt = bytearray(stream.frame(10))
    corrupt_records = stream.records[-10:]
    corrupt[-7] ^= 0x40  # a flipped bit in the last record's data: its CRC fails
    good_after = [stream.frame(10) for _ in range(3)]
    await publish(source_cluster, vm, [*good_before, bytes(corrupt), *good_after])
    await publish(source_cluster, vm, [encode_frame("another-vm", 1, stream.records[:1])])
    await publish(source_cluster, vm, [None])  # a message without a value

    receiver = Receiver(receiver_settings(plan))
    await receiver.start()
    try:
        batches = await wait_for_batches(source_cluster, vm, stream.records[-1].seq, timeout_s=60)
    finally:
        await receiver.stop()

    # Everything but the corrupt frame arrived, and the batches never span its range.
    first_bad, last_bad = corrupt_records[0].seq, corrupt_records[-1].seq
    assert not any(b.first_seq <= last_bad and b.last_seq >= first_bad for b in batches)
    before = [b for b in batches if b.last_seq < first_bad]
    after = [b for b in batches if b.first_seq > last_bad]
    assert before[-1].last_seq == first_bad - 1 and after[0].first_seq == last_bad + 1
    check_batches(before, [r for r in stream.records if r.seq < first_bad])
    check_batches(after, [r for r in stream.records if r.seq > last_bad])

    dead = await read_topic(source_cluster, topic_name(Stream.DEADLETTER, vm))
    assert dead[0] == bytes(corrupt)
    assert dead[1:] == [encode_frame("another-vm", 1, stream.records[:1]), b""], (
        "the frame of another VM and the message without a value are quarantined too"
    )
    events = [json.loads(v) for v in await read_topic(source_cluster, topic_name(Stream.STATUS))]
    mine = [e for e in events if e["vm_id"] == vm]
    assert {
        (e["type"], e["reason"], e["first_seq"], e["last_seq"], e["tap_offset"]) for e in mine
    } >= {("resync_request", "corrupt_record", first_bad, last_bad, 3)}
    assert "CRC32C" in mine[0]["detail"]


async def test_a_vm_that_cannot_be_opened_holds_up_no_other_and_opens_later(
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stuck, other = (f"rcv-{uuid.uuid4().hex[:10]}" for _ in range(2))
    await create_topics(source_cluster, [stuck, other])
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, [stuck, other])
    streams = {vm: TapStream(vm, random.Random(i)) for i, vm in enumerate((stuck, other))}
    for vm, stream in streams.items():
        await publish(source_cluster, vm, [stream.frame(10) for _ in range(3)])
    refusals = 3
    real_new_producer = Receiver._new_producer

    def new_producer(receiver: Receiver, vm: ProtectedVM) -> TransactionalProducer:
        producer = real_new_producer(receiver, vm)
        nonlocal refusals
        if vm.id == stuck and refusals:
            refusals -= 1

            async def refuse() -> None:
                # As a transaction coordinator that stays away (each attempt would have
                # waited seconds before, and every VM's batching with it).
                raise KafkaUnavailable("coordinator not available")

            producer.start = refuse  # type: ignore[method-assign]
        return producer

    monkeypatch.setattr(Receiver, "_new_producer", new_producer)
    receiver = Receiver(receiver_settings(plan, kafka_retry_backoff_s=0.2))
    await receiver.start()
    try:
        other_last = streams[other].records[-1].seq
        await wait_for_batches(source_cluster, other, other_last, timeout_s=30)
        assert not receiver.status()["vms"][stuck]["healthy"]
        await wait_for_batches(source_cluster, stuck, streams[stuck].records[-1].seq, timeout_s=30)
        assert receiver.kafka_metrics.retries_of("receiver_open") == 3
        assert receiver.status()["vms"][stuck]["last_error"] is None
    finally:
        await receiver.stop()


async def test_a_fenced_vm_opens_again_when_no_rebalance_moves_it(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    # A producer fenced with no other receiver in the group (as when the coordinator
    # fences a transaction that outlived its timeout): no rebalance will come to drop the
    # VM, so the receiver opens it again itself, and the batches stay exact.
    vm, plan, stream = await one_vm(source_cluster, target_cluster, tmp_path, seed=11)
    settings = receiver_settings(plan)
    receiver = Receiver(settings)
    await receiver.start()
    try:
        await publish(source_cluster, vm, [stream.frame(20, hot_blocks=8) for _ in range(3)])
        await wait_for_batches(source_cluster, vm, stream.records[-1].seq, timeout_s=60)
        intruder = TransactionalProducer(
            source_cluster, transactional_id=f"{settings.transactional_id_prefix}.{vm}"
        )
        await intruder.start()  # fences the receiver's producer of the VM

        def failed_transactions() -> float:
            # A fence met at the commit is ProducerFenced; met while the transaction's
            # partitions are added, the driver reports a fatal error: either way the
            # receiver must open the VM again.
            errors = receiver.metrics.errors
            return sum(errors.labels(kind=k)._value.get() for k in ("fenced", "transaction"))

        try:
            await publish(source_cluster, vm, [stream.frame(20, hot_blocks=8) for _ in range(3)])
            await wait_until(lambda: failed_transactions() >= 1, "the fence")
        finally:
            await intruder.stop()
        await publish(source_cluster, vm, [stream.frame(20, hot_blocks=8) for _ in range(3)])
        batches = await wait_for_batches(source_cluster, vm, stream.records[-1].seq, timeout_s=90)
        check_batches(batches, stream.records)
        status = receiver.status()["vms"][vm]
        assert status["healthy"] and not status["fenced"]
    finally:
        await receiver.stop()


async def test_receivers_share_vms_and_hand_them_over_without_loss_or_duplicate(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vms = [f"rcv-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    await create_topics(source_cluster, vms)
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, vms)
    streams = {vm: TapStream(vm, random.Random(index)) for index, vm in enumerate(vms)}
    # Dynamic membership: a receiver that stops leaves the group at once.
    first = receiver_settings(plan, instance_id=None)
    second = first.model_copy()
    receivers = [Receiver(first), Receiver(second)]
    for receiver in receivers:
        await receiver.start()
    try:

        async def write(rounds: int) -> None:
            for _ in range(rounds):
                for vm, stream in streams.items():
                    await publish(source_cluster, vm, [stream.frame(15, hot_blocks=32)])
                await asyncio.sleep(0.1)

        await write(5)
        for vm, stream in streams.items():
            await wait_for_batches(source_cluster, vm, stream.records[-1].seq, timeout_s=60)
        # Both take a share once the group has settled (the second joined after the first).
        for _ in range(300):
            owned = [set(r.status()["vms"]) for r in receivers]
            if owned[0] and owned[1] and owned[0] | owned[1] == set(vms):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the VMs were never shared: {owned}")
        assert not owned[0] & owned[1]
        # One receiver goes away mid-stream; the other takes its VMs over.
        writer = asyncio.create_task(write(10))
        await asyncio.sleep(0.5)
        await receivers[0].stop()
        await writer
        for vm, stream in streams.items():
            batches = await wait_for_batches(
                source_cluster, vm, stream.records[-1].seq, timeout_s=60
            )
            check_batches(batches, stream.records)
        assert set(receivers[1].status()["vms"]) == set(vms)
    finally:
        for receiver in receivers:
            await receiver.stop()


async def test_receiver_and_transceiver_apps_answer_health_ready_metrics_and_status(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vm = f"rcv-{uuid.uuid4().hex[:10]}"
    await asyncio.gather(create_topics(source_cluster, [vm]), create_topics(target_cluster, [vm]))
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, [vm])
    tag = uuid.uuid4().hex[:8]
    apps = [
        (receiver_app(receiver_settings(plan)), "receiver", "datamover_receiver_assigned_vms"),
        (
            transceiver_app(TransceiverSettings(plan=plan, transactional_id_prefix=f"t-{tag}")),
            "transceiver",
            "datamover_transceiver_lag_records",
        ),
    ]
    for app, service, metric in apps:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://dm") as client,
        ):
            assert (await client.get("/health")).json() == {"status": "ok"}
            for _ in range(300):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                status = (await client.get("/status")).json()
                raise AssertionError(f"{service} never became ready: {status}")
            status = (await client.get("/status")).json()
            assert status["service"] == service and vm in status["vms"]
            assert metric in (await client.get("/metrics")).text
