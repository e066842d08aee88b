"""Real local sites: Kafka brokers that start, stop, crash and come back with their data,
records that cross both sites exactly as sent, and a PostgreSQL that answers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from aiokafka.structs import TopicPartition
from tap_helpers import wait_until

from datapath.kafka import (
    Admin,
    Consumer,
    KafkaClusterSettings,
    Producer,
    TransactionalProducer,
)
from datapath.kafka.consumer import IsolationLevel
from datapath.localpg import LocalPostgres
from datapath.localsite import KafkaSite, SiteError
from datapath.topics import Stream, TopicSpec, topic_name, vm_topic_specs

MiB = 1024 * 1024


def specs(vm_id: str) -> list[TopicSpec]:
    return vm_topic_specs(
        vm_id, replication_factor=1, retention_ms=24 * 3600 * 1000, max_message_bytes=8 * MiB
    )


async def read_all(
    cluster: KafkaClusterSettings,
    topic: str,
    *,
    isolation_level: IsolationLevel = "read_committed",
) -> list[bytes]:
    """Every readable record of partition 0 of ``topic``, from the start to its end offset.

    read_committed waits (a few seconds at most) for the transactions already committed to
    become readable: a commit returns once the coordinator has decided, and the markers
    that move the last stable offset past its records follow shortly after.
    """
    tp = TopicPartition(topic, 0)
    async with Consumer(cluster, isolation_level=isolation_level) as consumer:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        if isolation_level == "read_committed":
            end = await _settled_end(cluster, consumer, tp, end)
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=2000)
            values += [record.value for record in batch.get(tp, [])]
        return values


async def _settled_end(
    cluster: KafkaClusterSettings, committed: Consumer, tp: TopicPartition, stable: int
) -> int:
    """The last stable offset once it reaches the log's end, or after 10 s as it is then."""
    async with Consumer(cluster, isolation_level="read_uncommitted") as raw:
        raw.assign([tp])
        log_end = (await raw.end_offsets([tp]))[tp]
    deadline = time.monotonic() + 10
    while stable < log_end and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        stable = (await committed.end_offsets([tp]))[tp]
    return stable


async def test_site_keeps_its_records_across_stop_kill_and_restart(tmp_path: Path) -> None:
    # Started, stopped and restarted on the main thread, blocking the loop a few seconds:
    # only brokers spawned from the main thread die with a killed test run.
    site = KafkaSite.start("solo", tmp_path)
    try:
        cluster = KafkaClusterSettings(bootstrap_servers=site.bootstrap)
        cluster_id, bootstrap = site.cluster_id, site.bootstrap
        topic = topic_name(Stream.BATCH, "restart")
        async with Admin(cluster) as admin:
            await admin.create_topics(specs("restart"))
        sent = [os.urandom(1000) for _ in range(20)]
        async with Producer(cluster) as producer:
            for value in sent:
                await producer.send_and_wait(topic, value)

        site.stop()
        assert not site.running
        site.restart()
        assert (site.cluster_id, site.bootstrap) == (cluster_id, bootstrap)
        assert await read_all(cluster, topic) == sent

        more = [os.urandom(1000) for _ in range(5)]
        async with Producer(cluster) as producer:
            for value in more:
                await producer.send_and_wait(topic, value)
        # A crash: acknowledged records are in the OS page cache and survive the JVM.
        site.kill()
        assert not site.running
        site.restart()
        assert await read_all(cluster, topic) == sent + more
    finally:
        site.stop()


def test_site_that_cannot_start_fails_with_the_reason_from_its_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(SiteError) as failure:
            KafkaSite.start("blocked", tmp_path, port=taken, timeout=60)
    message = str(failure.value)
    assert "before it was ready" in message
    assert "Address already in use" in message
    assert str(tmp_path / "blocked" / "broker.log") in message


CHILD_THAT_DIES = """
import os, signal, subprocess
from datapath.localsite import die_with_parent
child = subprocess.Popen(["sleep", "120"], preexec_fn=die_with_parent(signal.SIGTERM))
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_servers_do_not_outlive_a_killed_test_run() -> None:
    # Sites and PostgreSQL are spawned this way: a SIGKILLed parent leaves nothing running.
    parent = subprocess.run(
        [sys.executable, "-c", CHILD_THAT_DIES], capture_output=True, text=True, check=False
    )
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    orphan = Path(f"/proc/{int(parent.stdout)}/stat")
    deadline = time.monotonic() + 30
    while running(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(orphan), "the child outlived its parent"


def running(stat: Path) -> bool:
    try:
        # The state follows the parenthesised command name; a zombie (Z) has exited.
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_sites_round_trip_idempotent_and_transactional(
    source_cluster: KafkaClusterSettings, target_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    topic = topic_name(Stream.BATCH, vm_id)
    for cluster in (source_cluster, target_cluster):
        async with Admin(cluster) as admin:
            await admin.create_topics(specs(vm_id))

    # Source: an idempotent producer with many batches in flight at once.
    rng = random.Random(7)
    batches = [rng.randbytes(rng.randrange(1, MiB)) for _ in range(24)]
    async with Producer(source_cluster) as producer:
        deliveries = [await producer.send(topic, batch) for batch in batches]
        offsets = [(await delivery).offset for delivery in deliveries]
    assert offsets == list(range(len(batches)))
    assert await read_all(source_cluster, topic) == batches

    # Source -> target as the transceiver copies: records and source offsets in one
    # transaction on the target cluster.
    source_tp = TopicPartition(topic, 0)
    group = f"dm-transceiver-{vm_id}"
    copied: list[bytes] = []
    async with (
        Consumer(source_cluster) as consumer,
        TransactionalProducer(target_cluster, transactional_id=f"dm-tx-{vm_id}") as tx,
    ):
        consumer.assign([source_tp])
        await consumer.seek_to_beginning(source_tp)
        async with tx.transaction():
            while len(copied) < len(batches):
                fetched = await consumer.getmany(source_tp, timeout_ms=2000, max_records=5)
                for record in fetched.get(source_tp, []):
                    await tx.send(topic, record.value)
                    copied.append(record.value)
                    # Called per record on purpose: merged into one call at commit.
                    tx.send_offsets_to_transaction({source_tp: record.offset + 1}, group)

        with pytest.raises(RuntimeError, match="copy failed"):
            async with tx.transaction():
                for _ in range(3):
                    await tx.send(topic, b"aborted")
                await tx.flush()
                raise RuntimeError("copy failed")

        async with tx.transaction():
            await tx.send(topic, b"after the abort")

    assert copied == batches
    assert await read_all(target_cluster, topic) == [*batches, b"after the abort"]
    # The aborted records did reach the log: only read_committed hides them.
    uncommitted = await read_all(target_cluster, topic, isolation_level="read_uncommitted")
    assert uncommitted.count(b"aborted") == 3
    async with Admin(target_cluster) as admin:
        assert await admin.group_offsets(group) == {source_tp: len(batches)}


def test_local_brokers_start_with_their_whole_heap(
    source_site: object, target_site: object
) -> None:
    # A heap grown from a small start cost a full collection in the first seconds of a
    # workload (docs/kafka.md): the JVM takes the last -Xms/-Xmx of its command line.
    for site in (source_site, target_site):
        if not isinstance(site, KafkaSite):
            pytest.skip("an external cluster: its JVM is not ours")
        assert site.process is not None
        argv = Path(f"/proc/{site.process.pid}/cmdline").read_bytes().decode().split("\0")
        initial = [arg for arg in argv if arg.startswith("-Xms")]
        maximum = [arg for arg in argv if arg.startswith("-Xmx")]
        assert initial and maximum, argv
        assert initial[-1].removeprefix("-Xms") == maximum[-1].removeprefix("-Xmx") == site.heap


async def test_postgres_answers_select_1(postgres: LocalPostgres) -> None:
    assert postgres.url.startswith("postgresql+asyncpg://")
    connection = await asyncpg.connect(postgres.dsn)
    try:
        assert await connection.fetchval("select 1") == 1
    finally:
        await connection.close()


async def test_first_transactional_offsets_on_a_fresh_cluster_wait_for_its_coordinator(
    tmp_path: Path,
) -> None:
    # A fresh cluster has no group coordinator until its offsets topic exists; librdkafka's
    # own lookup in send_offsets_to_transaction gives up after quick retries and hangs.
    # Without the producer's wait for the coordinator this hung in about one run of four.
    site = KafkaSite.start("fresh", tmp_path)
    try:
        cluster = KafkaClusterSettings(bootstrap_servers=site.bootstrap)
        topic = topic_name(Stream.BATCH, "fresh")
        async with Admin(cluster) as admin:
            await admin.create_topics(specs("fresh"))
        # As the transceiver's: the source topic's offsets, under the same topic name here.
        source_tp = TopicPartition(topic, 0)
        async with (
            TransactionalProducer(cluster, transactional_id="dm-tx-fresh") as tx,
            tx.transaction(),
        ):
            await tx.send(topic, b"copied")
            tx.send_offsets_to_transaction({source_tp: 1}, "dm-transceiver-fresh")
        # The commit returns once the coordinator has decided; its markers (which make the
        # offsets visible to a reader that is not a fenced successor) follow shortly after.
        async with Admin(cluster) as admin:

            async def offsets_visible() -> bool:
                return bool(await admin.group_offsets("dm-transceiver-fresh"))

            await wait_until(offsets_visible, "the transaction's offsets", limit_s=30)
            assert await admin.group_offsets("dm-transceiver-fresh") == {source_tp: 1}
        assert await read_all(cluster, topic) == [b"copied"]
    finally:
        site.stop()


def _site_config(site: KafkaSite) -> dict[str, str]:
    lines = site.config_path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


async def test_segment_indexes_are_small_and_never_roll_a_segment_early(
    source_site: object, source_cluster: KafkaClusterSettings
) -> None:
    # A 10 MiB sparse index per segment made the broker zero a read-ahead's worth of
    # pages for each of its indexes (docs/kafka.md): the local sites keep them at 64 KiB,
    # which must still hold the entries of a full segment.
    if not isinstance(source_site, KafkaSite):
        pytest.skip("an external cluster: its configuration is not ours")
    config = _site_config(source_site)
    segment_bytes = int(config["log.segment.bytes"])
    index_bytes = int(config.get("log.index.size.max.bytes", 10 * MiB))  # Kafka's default
    assert index_bytes <= 64 * 1024
    time_index_entry = 12  # the larger of the two entries (offset index: 8 bytes)
    assert index_bytes // time_index_entry >= segment_bytes // 4096  # index.interval.bytes
    topic = f"dm.test.index.{random.randrange(1 << 30)}"
    async with Admin(source_cluster) as admin:
        await admin.create_topics([TopicSpec(topic, 1, 1, {"max.message.bytes": str(2 * MiB)})])
    # Records of 4 KiB and a little more, each in a batch of its own: each batch gets an
    # index entry, the most a segment can have, until the segment rolls at its size.
    record = os.urandom(4096 + 100)
    async with Producer(source_cluster, linger_ms=0, max_batch_size=len(record)) as producer:
        count = segment_bytes // len(record) + 200
        for start in range(0, count, 500):
            await asyncio.gather(
                *(producer.send(topic, record) for _ in range(min(500, count - start)))
            )
    partition = source_site.log_dirs / f"{topic}-0"
    segments = sorted(partition.glob("*.log"))
    assert len(segments) >= 2
    # The first segment rolled because it was full, not because its index was.
    assert segments[0].stat().st_size > segment_bytes - 2 * len(record) - 200
    for index in [*partition.glob("*.index"), *partition.glob("*.timeindex")]:
        assert index.stat().st_size <= index_bytes, index
