"""SIGKILL the receiver and the transceiver at random points, again and again, while the
tap writes: the target's batch topics stay gapless and duplicate-free (guarantees 1, 2, 6)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from pathlib import Path

import pytest
from replication_helpers import (
    ServiceProcess,
    TapStream,
    check_batches,
    create_topics,
    publish,
    read_batches,
    read_topic,
    wait_for_batches,
    write_plan,
)

from datapath.kafka import KafkaClusterSettings
from datapath.topics import Stream, topic_name

KILLS_EACH = 10


@pytest.mark.slow
async def test_sigkilled_receiver_and_transceiver_leave_no_gap_and_no_duplicate(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    vms = [f"kill-{tag}-{i}" for i in range(3)]
    await asyncio.gather(create_topics(source_cluster, vms), create_topics(target_cluster, vms))
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, target_cluster, vms)
    receiver = ServiceProcess(
        "receiver",
        ["--plan", str(plan), "--instance-id", f"r-{tag}", "--batch-interval", "0.1"],
        tmp_path / "receiver.log",
        {
            "DM_RECEIVER_GROUP_ID": f"g-{tag}",
            "DM_RECEIVER_TRANSACTIONAL_ID_PREFIX": f"r-{tag}",
            "DM_RECEIVER_SESSION_TIMEOUT_MS": "6000",
        },
    )
    transceiver = ServiceProcess(
        "transceiver",
        ["--plan", str(plan)],
        tmp_path / "transceiver.log",
        {
            "DM_TRANSCEIVER_TRANSACTIONAL_ID_PREFIX": f"t-{tag}",
            "DM_TRANSCEIVER_MAX_TRANSACTION_MESSAGES": "4",  # many transactions to hit
            "DM_TRANSCEIVER_MAX_RETRY_BACKOFF_S": "1",
        },
    )
    streams = {vm: TapStream(vm, random.Random(i)) for i, vm in enumerate(vms)}
    rng = random.Random(2024)
    writing = True

    async def write() -> None:
        while writing:
            for vm, stream in streams.items():
                await publish(source_cluster, vm, [stream.frame(rng.randrange(1, 12))])
            await asyncio.sleep(0.05)

    receiver.start()
    transceiver.start()
    writer = asyncio.create_task(write())
    kills = {"receiver": 0, "transceiver": 0}
    try:
        await asyncio.gather(receiver.wait_ready(), transceiver.wait_ready())

        async def keep_killing(victim: ServiceProcess, rng: random.Random) -> None:
            for _ in range(KILLS_EACH):
                # A random point: mostly while it works, sometimes while it still starts.
                if rng.random() < 0.7:
                    await victim.wait_ready()
                await asyncio.sleep(rng.uniform(0.0, 1.5))
                victim.kill()
                kills[victim.name] += 1
                victim.start()

        # Both are killed independently, so some kills of one land mid-recovery of the other.
        await asyncio.gather(
            keep_killing(receiver, random.Random(rng.random())),
            keep_killing(transceiver, random.Random(rng.random())),
        )
        writing = False
        await writer
        await asyncio.gather(receiver.wait_ready(), transceiver.wait_ready())
        for vm, stream in streams.items():
            target = await wait_for_batches(
                target_cluster, vm, stream.records[-1].seq, timeout_s=90
            )
            check_batches(target, stream.records)
            source = await read_batches(source_cluster, vm)
            assert [(b.first_seq, b.last_seq) for b in source] == [
                (b.first_seq, b.last_seq) for b in target
            ]
            # Message for message (the assembler would hide a chunk copied twice).
            topic = topic_name(Stream.BATCH, vm)
            assert await read_topic(target_cluster, topic) == await read_topic(
                source_cluster, topic
            )
        assert kills == {"receiver": KILLS_EACH, "transceiver": KILLS_EACH}
    except BaseException:
        print("--- receiver log ---\n" + receiver.log_tail(80))
        print("--- transceiver log ---\n" + transceiver.log_tail(80))
        raise
    finally:
        writing = False
        if not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        receiver.stop()
        transceiver.stop()
