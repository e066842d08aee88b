"""The applier's Kafka side: a VM's target batch topic as a JournalSource, and the
status topic as a StatusSink."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiokafka.structs import TopicPartition

from datapath.kafka import (
    Admin,
    Consumer,
    KafkaClusterSettings,
    KafkaError,
    KafkaMetrics,
    Producer,
    UnknownTopic,
    retrying,
)
from datapath.topics import Stream, TopicSpec, topic_name
from services.applier.journal_source import JournalMessage

log = logging.getLogger(__name__)


class KafkaJournalSource:
    """Partition 0 of one batch topic, read_committed, assigned (no consumer group: the
    applied position lives in the applier's state file, not in Kafka).

    `create`: the topic's spec, to create it when it does not exist yet (an existing
    topic is used as it is); None to refuse to start without it."""

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        topic: str,
        *,
        metrics: KafkaMetrics,
        create: TopicSpec | None = None,
        max_records: int = 256,
    ) -> None:
        self.cluster = cluster
        self.topic = topic
        self.create = create
        self.partition = TopicPartition(topic, 0)
        self.metrics = metrics
        self.max_records = max_records
        self._consumer: Consumer | None = None

    def _require(self) -> Consumer:
        if self._consumer is None:
            raise KafkaError(f"journal {self.topic} is not open")
        return self._consumer

    async def start(self) -> None:
        if self._consumer is not None:
            return
        await retrying(
            self._ensure_topic,
            what="applier_journal_topic",
            attempts=5,
            backoff=0.5,
            metrics=self.metrics,
        )
        consumer = Consumer(self.cluster, isolation_level="read_committed")
        await retrying(
            consumer.start,
            what="applier_consumer_start",
            attempts=5,
            backoff=0.5,
            metrics=self.metrics,
        )
        consumer.assign([self.partition])
        self._consumer = consumer

    async def _ensure_topic(self) -> None:
        # Checked first: a consumer assigned to a missing topic waits on metadata forever.
        await ensure_topic(self.cluster, self.topic, self.create)

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.stop()
            except KafkaError as exc:
                log.warning("closing the consumer of %s: %s", self.topic, exc)

    async def seek(self, offset: int) -> None:
        self._require().seek(self.partition, max(0, offset))

    async def fetch(self, timeout_s: float) -> list[JournalMessage]:
        records = await self._require().getmany(
            self.partition, timeout_ms=int(timeout_s * 1000), max_records=self.max_records
        )
        return [
            JournalMessage(record.offset, record.value)
            for record in records.get(self.partition, ())
            if record.value is not None
        ]

    async def position(self) -> int:
        return await self._require().position(self.partition)

    async def end_offset(self) -> int:
        consumer = self._require()

        async def ask() -> int:
            offsets = await consumer.end_offsets([self.partition])
            return int(offsets[self.partition])

        return await retrying(
            ask, what="applier_end_offsets", attempts=3, backoff=0.5, metrics=self.metrics
        )


async def ensure_topic(cluster: KafkaClusterSettings, topic: str, create: TopicSpec | None) -> None:
    """Creates `topic` from `create` when it is missing; UnknownTopic when it is missing
    and may not be created."""
    async with Admin(cluster) as admin:
        if topic in await admin.list_topics():
            return
        if create is None:
            raise UnknownTopic(
                f"topic {topic} does not exist on {cluster.describe()}: create it (or let "
                "the applier: DM_APPLIER_CREATE_TOPICS=true)"
            )
        created = await admin.create_topics([create])
        if created:
            log.info("created topic %s on %s", topic, cluster.describe())


class KafkaStatusSink:
    """Writes each VM's applier report to the site-wide status topic (compacted), keyed
    `applier/<vm_id>`, so the topic keeps the latest report per VM."""

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        metrics: KafkaMetrics,
        create: TopicSpec | None = None,
    ) -> None:
        """create: the status topic's spec, to create it when missing (None: never)."""
        self.cluster = cluster
        self.metrics = metrics
        self.topic = topic_name(Stream.STATUS)
        self.create = create
        self._producer: Producer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> Producer:
        async with self._lock:
            if self._producer is None:
                await ensure_topic(self.cluster, self.topic, self.create)
                producer = Producer(self.cluster, linger_ms=0)
                await producer.start()
                self._producer = producer
            return self._producer

    async def publish(self, vm_id: str, report: dict[str, Any]) -> None:
        value = json.dumps(report, sort_keys=True).encode()
        key = f"applier/{vm_id}".encode()

        async def send() -> None:
            producer = await self._started()
            await producer.send_and_wait(self.topic, value, key)

        await retrying(
            send, what="applier_status_report", attempts=8, backoff=0.5, metrics=self.metrics
        )
        log.info("VM %s: reported %s to %s", vm_id, report.get("event"), self.topic)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as exc:
                log.warning("closing the status producer: %s", exc)
