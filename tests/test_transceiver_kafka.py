"""Tap frames in, batches on the target site out: exactly once across both clusters
(guarantees 1, 2 and 6), in continuous and periodic mode, throttled, through a WAN outage."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka.admin import RecordsToDelete
from aiokafka.structs import TopicPartition
from replication_helpers import (
    TapStream,
    check_batches,
    create_topics,
    publish,
    read_batches,
    read_topic,
    wait_for_batches,
    write_plan,
)
from tap_helpers import wait_until

from datapath.kafka import Admin, KafkaClusterSettings, KafkaError, Producer
from datapath.localsite import KafkaSite
from datapath.topics import Stream, topic_name
from services.receiver.settings import ReceiverSettings
from services.receiver.worker import Receiver
from services.transceiver.offset_record import decode_progress
from services.transceiver.settings import TransceiverSettings
from services.transceiver.worker import Transceiver


def new_vms(count: int) -> list[str]:
    return [f"tx-{uuid.uuid4().hex[:10]}" for _ in range(count)]


async def one_vm(
    source: KafkaClusterSettings, target: KafkaClusterSettings, tmp_path: Path
) -> tuple[str, Path]:
    """A new VM with its topics on both sites, and a plan protecting it alone."""
    (vm,) = new_vms(1)
    await asyncio.gather(create_topics(source, [vm]), create_topics(target, [vm]))
    return vm, write_plan(tmp_path / "plan.yaml", source, target, [vm])


@asynccontextmanager
async def running(
    plan: Path, *, receiver: bool = True, **transceiver: object
) -> AsyncIterator[Transceiver]:
    tag = uuid.uuid4().hex[:8]
    rcv = None
    if receiver:
        rcv = Receiver(
            ReceiverSettings(
                plan=plan,
                group_id=f"g-{tag}",
                transactional_id_prefix=f"r-{tag}",
                instance_id=f"r-{tag}",
                batch_interval_s=0.1,
                session_timeout_ms=6000,
            )
        )
        await rcv.start()
    values: dict[str, object] = {"plan": plan, "transactional_id_prefix": f"t-{tag}"}
    values.update(transceiver)
    tx = Transceiver(TransceiverSettings(**values))  # type: ignore[arg-type]
    await tx.start()
    try:
        yield tx
    finally:
        await tx.stop()
        if rcv is not None:
            await rcv.stop()


async def test_tap_frames_reach_the_target_once_in_order_for_three_vms(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vms = new_vms(3)
    await asyncio.gather(create_topics(source_cluster, vms), create_topics(target_cluster, vms))
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, vms)
    streams = {vm: TapStream(vm, random.Random(i)) for i, vm in enumerate(vms)}
    async with running(plan) as transceiver:
        for _ in range(4):
            for vm, stream in streams.items():
                await publish(source_cluster, vm, [stream.frame(25) for _ in range(4)])
            await asyncio.sleep(0.2)
        for vm, stream in streams.items():
            target = await wait_for_batches(
                target_cluster, vm, stream.records[-1].seq, timeout_s=60
            )
            check_batches(target, stream.records)
            source = await read_batches(source_cluster, vm)
            assert [b.first_seq for b in source] == [b.first_seq for b in target]
        status = transceiver.status()
        assert status["ready"]
        assert all(v["lag_records"] == 0 for v in status["vms"].values())

    # The progress record on the target names the next source offset to copy.
    for vm in vms:
        values = await read_topic(target_cluster, topic_name(Stream.OFFSETS, vm))
        progress = decode_progress(values[-1])
        assert progress.last_seq == streams[vm].records[-1].seq


async def test_a_message_without_a_value_is_copied_as_it_is_and_copying_goes_on(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vm, plan = await one_vm(source_cluster, target_cluster, tmp_path)
    stream = TapStream(vm, random.Random(8))
    async with running(plan) as transceiver:
        await publish(source_cluster, vm, [stream.frame(10)])
        await wait_for_batches(target_cluster, vm, stream.records[-1].seq, timeout_s=60)
        async with Producer(source_cluster) as producer:
            await producer.send_and_wait(topic_name(Stream.BATCH, vm), None, partition=0)
        await publish(source_cluster, vm, [stream.frame(10)])
        target = await wait_for_batches(target_cluster, vm, stream.records[-1].seq, timeout_s=60)
        check_batches(target, stream.records)
        assert transceiver.status()["vms"][vm]["healthy"]
    assert (await read_topic(target_cluster, topic_name(Stream.BATCH, vm))).count(None) == 1


async def test_records_retention_removes_before_they_are_copied_are_counted_as_lost(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vm, plan = await one_vm(source_cluster, target_cluster, tmp_path)
    topic = topic_name(Stream.BATCH, vm)
    size = 10_000
    async with Producer(source_cluster) as producer:
        await producer.send_and_wait(topic, os.urandom(size), partition=0)
        async with running(
            plan,
            receiver=False,
            bandwidth_bytes_per_s=size,
            burst_bytes=size,
            max_transaction_messages=1,
        ) as transceiver:
            await wait_until(
                lambda: transceiver.status()["vms"][vm]["position"] == 1,
                what="the first message copied",
                limit_s=60,
            )
            for _ in range(10):
                await producer.send_and_wait(topic, os.urandom(size), partition=0)
            # The copier waits for its throttle (about 1 s a message) when retention
            # removes everything: what it took is copied, the rest is gone.
            await asyncio.sleep(0.3)
            async with Admin(source_cluster) as admin:
                await admin.driver.delete_records(
                    {TopicPartition(topic, 0): RecordsToDelete(before_offset=11)}
                )
            lost = transceiver.metrics.backlog_lost.labels(vm=vm)
            await wait_until(lambda: lost._value.get() > 0, what="the loss counted", limit_s=60)
            status = transceiver.status()["vms"][vm]
            assert status["copied_messages"] + lost._value.get() == 11, status


@pytest.mark.parametrize("fresh_count", [2, 7])
async def test_a_recreated_source_topic_is_copied_from_its_start(
    source_cluster: KafkaClusterSettings,
    target_cluster: KafkaClusterSettings,
    tmp_path: Path,
    fresh_count: int,
) -> None:
    # The new topic holds fewer messages than the old one had been copied up to (its end
    # is before that offset), or more (only its id tells it from the old one).
    vm, plan = await one_vm(source_cluster, target_cluster, tmp_path)
    topic = topic_name(Stream.BATCH, vm)
    async with Producer(source_cluster) as producer:
        for _ in range(5):
            await producer.send_and_wait(topic, os.urandom(100), partition=0)
    async with running(plan, receiver=False) as transceiver:
        await wait_until(
            lambda: transceiver.status()["vms"][vm]["position"] == 5,
            what="five messages copied",
            limit_s=60,
        )
    async with Admin(source_cluster) as admin:
        await admin.delete_topics([topic])
    await wait_until_recreated(source_cluster, vm)
    fresh = [os.urandom(100) for _ in range(fresh_count)]
    async with Producer(source_cluster) as producer:
        for value in fresh:
            await producer.send_and_wait(topic, value, partition=0)
    async with running(plan, receiver=False) as transceiver:
        await wait_until(
            lambda: transceiver.status()["vms"][vm]["copied_messages"] == fresh_count,
            what="the new topic copied",
            limit_s=60,
        )
        assert transceiver.metrics.backlog_lost.labels(vm=vm)._value.get() == 0
    assert (await read_topic(target_cluster, topic))[-fresh_count:] == fresh


async def wait_until_recreated(cluster: KafkaClusterSettings, vm: str) -> None:
    """Creates the VM's topics again once the deletion let it (it completes in the
    background on the broker)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await create_topics(cluster, [vm])
            return
        except KafkaError:
            assert time.monotonic() < deadline, "the deleted topic could not be created again"
            await asyncio.sleep(0.2)


async def test_periodic_mode_copies_at_ticks_only_and_the_throttle_paces_it(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    vm, plan = await one_vm(source_cluster, target_cluster, tmp_path)
    stream = TapStream(vm, random.Random(3))
    await publish(source_cluster, vm, [stream.frame(40) for _ in range(6)])
    first_last = stream.records[-1].seq
    # The receiver alone first, so that the whole backlog is there at the first tick.
    async with running(plan, receiver=True, vms=[]):
        await wait_for_batches(source_cluster, vm, first_last, timeout_s=60)
    backlog = sum(len(v) for v in await read_topic(source_cluster, topic_name(Stream.BATCH, vm)))

    async with running(
        plan,
        mode="periodic",
        interval_s=3600.0,
        bandwidth_bytes_per_s=max(1, backlog // 2),
        burst_bytes=max(1, backlog // 4),
    ) as transceiver:
        copied = await wait_for_batches(target_cluster, vm, first_last, timeout_s=60)
        check_batches(copied, stream.records)
        # More writes arrive; the receiver batches them but the next tick is an hour away.
        await publish(source_cluster, vm, [stream.frame(10)])
        await wait_for_batches(source_cluster, vm, stream.records[-1].seq, timeout_s=60)
        await asyncio.sleep(1.0)
        assert (await read_batches(target_cluster, vm))[-1].last_seq == first_last
        assert transceiver.throttle is not None and transceiver.throttle.waited_s > 0
        # The lag of what waits for the next tick is exported meanwhile.
        for _ in range(100):
            if transceiver.status()["vms"][vm]["lag_records"]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the waiting backlog never showed as lag")
        assert (await read_batches(target_cluster, vm))[-1].last_seq == first_last


@pytest.mark.slow
async def test_target_down_for_30_seconds_loses_nothing_and_catches_up(
    source_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    site = await asyncio.to_thread(KafkaSite.start, "wan-target", tmp_path / "target")
    try:
        target_cluster = KafkaClusterSettings(bootstrap_servers=site.bootstrap)
        vms = new_vms(2)
        await asyncio.gather(create_topics(source_cluster, vms), create_topics(target_cluster, vms))
        plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, vms)
        streams = {vm: TapStream(vm, random.Random(i)) for i, vm in enumerate(vms)}

        async def write(rounds: int) -> None:
            for _ in range(rounds):
                for vm, stream in streams.items():
                    await publish(source_cluster, vm, [stream.frame(20)])
                await asyncio.sleep(0.5)

        async with running(plan, operation_timeout_s=10.0, max_retry_backoff_s=2.0) as tx:
            await write(4)
            for vm, stream in streams.items():  # the copy works before the WAN goes down
                await wait_for_batches(target_cluster, vm, stream.records[-1].seq, timeout_s=90)
            await asyncio.to_thread(site.stop)
            await write(10)  # the WAN is down: the backlog grows on the source
            await asyncio.sleep(25)
            status = tx.status()["vms"]
            assert all(not v["healthy"] for v in status.values()), status
            assert all(v["lag_records"] for v in status.values()), status
            await asyncio.to_thread(site.restart)
            await write(4)
            for vm, stream in streams.items():
                batches = await wait_for_batches(
                    target_cluster, vm, stream.records[-1].seq, timeout_s=90
                )
                check_batches(batches, stream.records)
    finally:
        await asyncio.to_thread(site.stop)
