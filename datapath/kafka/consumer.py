"""A consumer that reads only committed records and commits offsets only when told to."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import aiokafka.errors as driver
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from datapath.kafka.errors import DRIVER_ERRORS, KafkaFatal, KafkaUnavailable, translate
from datapath.kafka.lifecycle import AsyncClient, start_or_release
from datapath.kafka.settings import KafkaClusterSettings

log = logging.getLogger(__name__)

# aiokafka's ConsumerRecord (topic, partition, offset, key, value, headers, timestamp...).
ConsumerRecord = Any
IsolationLevel = Literal["read_committed", "read_uncommitted"]

# One fetch must hold the largest record (a journal batch) of a partition.
DEFAULT_MAX_PARTITION_FETCH_BYTES = 8 * 1024 * 1024 + 64 * 1024
_DRIVER_ERRORS = (*DRIVER_ERRORS, driver.ConsumerStoppedError)


class Consumer(AsyncClient):
    """A Kafka consumer: manual partition assignment or group subscription, manual commits.

    ``read_committed`` by default, so records of open or aborted transactions are never
    returned; auto-commit is off, so an offset is committed only after its record was
    processed (or inside a producer transaction, see ``TransactionalProducer``).
    """

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        group_id: str | None = None,
        isolation_level: IsolationLevel = "read_committed",
        auto_offset_reset: Literal["earliest", "latest", "none"] = "earliest",
        max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
        fetch_max_bytes: int = 64 * 1024 * 1024,
        fetch_max_wait_ms: int = 200,
        fetch_min_bytes: int = 1,
        request_timeout_ms: int = 30_000,
        client_id: str | None = None,
        group_instance_id: str | None = None,
        session_timeout_ms: int | None = None,
        metadata_max_age_ms: int | None = None,
    ) -> None:
        """Group options (used with :meth:`subscribe`), aiokafka's defaults when None:

        ``group_instance_id`` makes this a static member, so a restart within the session
        timeout gets its partitions back without a rebalance; ``session_timeout_ms`` is how
        long the group waits for a silent member (heartbeats go at a quarter of it);
        ``metadata_max_age_ms`` bounds how late topics created after the subscription are
        noticed.

        A fetch returns once ``fetch_min_bytes`` are there or ``fetch_max_wait_ms`` has
        passed: with the default of 1 byte, every new message ends a waiting fetch.
        """
        self.cluster = cluster
        self.group_id = group_id
        self.request_timeout_ms = request_timeout_ms
        self._kwargs: dict[str, Any] = {
            **cluster.client_kwargs(),
            "group_id": group_id,
            "isolation_level": isolation_level,
            "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset,
            "max_partition_fetch_bytes": max_partition_fetch_bytes,
            "fetch_max_bytes": fetch_max_bytes,
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "fetch_min_bytes": fetch_min_bytes,
            "request_timeout_ms": request_timeout_ms,
            # Not checked here: every journal frame and batch carries a CRC32C of its
            # own, checked by the part that decodes it (the receiver, the applier), end to
            # end from the tap. aiokafka's CRC is a table-driven C loop that took 8-18 %
            # of the receiver's and the transceiver's CPU for the same bytes.
            "check_crcs": False,
        }
        if client_id is not None:
            self._kwargs["client_id"] = client_id
        if group_instance_id is not None:
            self._kwargs["group_instance_id"] = group_instance_id
        if session_timeout_ms is not None:
            self._kwargs["session_timeout_ms"] = session_timeout_ms
            self._kwargs["heartbeat_interval_ms"] = max(1_000, session_timeout_ms // 4)
        if metadata_max_age_ms is not None:
            self._kwargs["metadata_max_age_ms"] = metadata_max_age_ms
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def driver(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise KafkaFatal("Consumer is not started")
        return self._consumer

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(**self._kwargs)
        await start_or_release(
            consumer.start, consumer.stop, what="consumer", errors=_DRIVER_ERRORS
        )
        self._consumer = consumer
        log.debug("consumer (group %s) started on %s", self.group_id, self.cluster.describe())

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await consumer.stop()
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read exactly these partitions (no group rebalancing)."""
        try:
            self.driver.assign(list(partitions))
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    def subscribe(
        self, topics: Iterable[str], *, listener: ConsumerRebalanceListener | None = None
    ) -> None:
        """Share these topics' partitions with the other members of ``group_id``.

        ``listener``: an aiokafka ``ConsumerRebalanceListener`` to act on every assignment
        change before records of the new assignment are read.
        """
        try:
            self.driver.subscribe(topics=list(topics), listener=listener)
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    def assignment(self) -> set[TopicPartition]:
        return set(self.driver.assignment())

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 1000, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """The records fetched within ``timeout_ms`` (possibly none), per partition."""
        try:
            records: dict[TopicPartition, list[ConsumerRecord]] = await self.driver.getmany(
                *partitions, timeout_ms=timeout_ms, max_records=max_records
            )
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        return records

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Read ``partition`` from ``offset`` on (takes effect at the next fetch)."""
        try:
            self.driver.seek(partition, offset)
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self._call(self.driver.seek_to_beginning(*partitions))

    async def seek_to_committed(self, *partitions: TopicPartition) -> None:
        await self._call(self.driver.seek_to_committed(*partitions))

    async def position(self, partition: TopicPartition) -> int:
        """The offset of the next record that will be returned for ``partition``."""
        position: int = await self._call(self.driver.position(partition))
        return position

    async def beginning_offsets(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = await self._call(
            self.driver.beginning_offsets(list(partitions))
        )
        return offsets

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset after the last readable record: with read_committed, the last stable
        offset (records of open transactions are not readable yet)."""
        offsets: dict[TopicPartition, int] = await self._call(
            self.driver.end_offsets(list(partitions))
        )
        return offsets

    async def committed(self, partition: TopicPartition) -> int | None:
        """The group's committed offset of ``partition``, None if it has none."""
        offset: int | None = await self._call(self.driver.committed(partition))
        return offset

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit ``offsets`` (next offsets to read), or the current positions when None."""
        arg = (
            None if offsets is None else {tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()}
        )
        await self._call(self.driver.commit(arg))

    async def _call(self, call: Any) -> Any:
        # The driver can wait forever for a partition that does not exist: bound every call.
        try:
            async with asyncio.timeout(self.request_timeout_ms / 1000):
                return await call
        except TimeoutError as exc:
            raise KafkaUnavailable(
                f"no answer from {self.cluster.bootstrap_servers} within "
                f"{self.request_timeout_ms} ms"
            ) from exc
        except _DRIVER_ERRORS as exc:
            raise translate(exc) from exc
