"""Producers: idempotent (the tap, the receiver) and transactional (the transceiver).

Both are thin wrappers over aiokafka's ``AIOKafkaProducer`` that raise only the domain
errors of :mod:`datapath.kafka.errors`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Generator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, Self

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition

from datapath.kafka.errors import DRIVER_ERRORS, KafkaError, KafkaFatal, translate
from datapath.kafka.lifecycle import AsyncClient, start_or_release
from datapath.kafka.settings import KafkaClusterSettings

log = logging.getLogger(__name__)

# aiokafka's RecordMetadata (topic, partition, offset, timestamp, ...); the driver is untyped.
RecordMetadata = Any
Compression = Literal["gzip", "snappy", "lz4", "zstd"]

# Large enough for a journal batch of several MiB; topics cap it with max.message.bytes.
DEFAULT_MAX_REQUEST_SIZE = 8 * 1024 * 1024 + 64 * 1024


def _retrieve_abandoned_failures(producer: AIOKafkaProducer) -> None:
    """Mark as seen the failures aiokafka sets on futures nobody awaits.

    When its sender dies (a fenced transactional producer), aiokafka 0.14 fails every
    queued batch, including each batch's internal drain waiter, which no one awaits:
    asyncio would log "Future exception was never retrieved" whenever the garbage
    collector finds it. The error itself reaches the caller through the transaction.
    """
    accumulator = getattr(producer, "_message_accumulator", None)
    for batches in getattr(accumulator, "_batches", {}).values():
        for batch in batches:
            waiter = getattr(batch, "_drain_waiter", None)
            if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
                waiter.exception()


def _mark_retrieved(future: asyncio.Future[RecordMetadata]) -> None:
    # A record of a failed transaction fails with it; the commit reports that, so its
    # delivery need not be awaited (and asyncio must not log it as never retrieved).
    if not future.cancelled():
        future.exception()


class Delivery:
    """The pending acknowledgement of one record; await it for its RecordMetadata.

    Returned by :meth:`Producer.send` so a caller can keep many records in flight and await
    them later (in order: Kafka acknowledges one partition's records in order).
    """

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[RecordMetadata]) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        try:
            return (yield from self.future.__await__())
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc


class Producer(AsyncClient):
    """An idempotent producer: acks=all, no duplicates or reordering on retries."""

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        linger_ms: int = 5,
        compression_type: Compression | None = None,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_batch_size: int = 1024 * 1024,
        request_timeout_ms: int = 30_000,
        client_id: str | None = None,
    ) -> None:
        self.cluster = cluster
        self._kwargs: dict[str, Any] = {
            **cluster.client_kwargs(),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "compression_type": compression_type,
            "max_request_size": max_request_size,
            "max_batch_size": max_batch_size,
            "request_timeout_ms": request_timeout_ms,
        }
        if client_id is not None:
            self._kwargs["client_id"] = client_id
        self._producer: AIOKafkaProducer | None = None

    def _driver_kwargs(self) -> dict[str, Any]:
        return self._kwargs

    @property
    def driver(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise KafkaFatal(f"{type(self).__name__} is not started")
        return self._producer

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._driver_kwargs())
        await start_or_release(producer.start, producer.stop, what="producer")
        self._producer = producer
        log.debug("%s started on %s", type(self).__name__, self.cluster.describe())

    async def stop(self) -> None:
        """Flush what is pending and close; idempotent."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await producer.stop()
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        finally:
            _retrieve_abandoned_failures(producer)

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Delivery:
        """Queue one record and return its pending acknowledgement (await it later).

        Waits only while the producer's buffer is full. Raises :class:`UnknownTopic` when
        the topic does not exist (after ``request_timeout_ms``) and
        :class:`MessageTooLarge` when the record exceeds ``max_request_size``.
        """
        try:
            future = await self.driver.send(
                topic, value, key=key, partition=partition, headers=headers
            )
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        return Delivery(future)

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> RecordMetadata:
        """Send one record and wait until the cluster acknowledged it (acks=all)."""
        delivery = await self.send(topic, value, key, partition=partition, headers=headers)
        return await delivery

    async def flush(self) -> None:
        """Wait until every queued record has been sent (not necessarily acknowledged)."""
        try:
            await self.driver.flush()
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc


class TransactionalProducer(Producer):
    """A producer whose records (and consumer offsets) commit or abort together.

    Usage, as in the transceiver::

        async with TransactionalProducer(target, transactional_id="dm-tx-vm1") as producer:
            async with producer.transaction():
                await producer.send(topic, value)
                producer.send_offsets_to_transaction({tp: next_offset}, group_id)

    One transactional id per copy task: starting a second producer with the same id fences
    the first (:class:`ProducerFenced`). After a fatal error the producer must be stopped
    and a new one started; it resumes from the last committed transaction.
    """

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        transactional_id: str,
        transaction_timeout_ms: int = 60_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(cluster, **kwargs)
        self.transactional_id = transactional_id
        self.transaction_timeout_ms = transaction_timeout_ms
        self._pending_offsets: dict[TopicPartition, int] | None = None
        self._pending_group: str | None = None

    def _driver_kwargs(self) -> dict[str, Any]:
        return {
            **super()._driver_kwargs(),
            "transactional_id": self.transactional_id,
            "transaction_timeout_ms": self.transaction_timeout_ms,
        }

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Delivery:
        """Queue one record of the current transaction (see :meth:`Producer.send`).

        Awaiting the delivery is optional: the transaction's commit is what counts, and it
        raises if any of its records failed.
        """
        delivery = await super().send(topic, value, key, partition=partition, headers=headers)
        delivery.future.add_done_callback(_mark_retrieved)
        return delivery

    @property
    def in_transaction(self) -> bool:
        return self._pending_offsets is not None

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_id: str
    ) -> None:
        """Commit these consumer offsets (next offset to read) with the transaction.

        May be called many times in a transaction: offsets are merged, the latest per
        partition wins, and sent to the cluster once, at commit (aiokafka 0.14 supports one
        AddOffsetsToTxn per transaction).
        """
        if self._pending_offsets is None:
            raise KafkaFatal("send_offsets_to_transaction outside a transaction")
        if self._pending_group not in (None, group_id):
            raise KafkaFatal(
                f"one consumer group per transaction: {self._pending_group!r}, not {group_id!r}"
            )
        self._pending_group = group_id
        self._pending_offsets.update(offsets)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Self]:
        """Begin a transaction; commit it when the block ends, abort it if the block raises."""
        if self._pending_offsets is not None:
            raise KafkaFatal("transactions do not nest")
        producer = self.driver
        try:
            await producer.begin_transaction()
        except DRIVER_ERRORS as exc:
            raise translate(exc) from exc
        self._pending_offsets, self._pending_group = {}, None
        try:
            yield self
            await self._commit(producer)
        except BaseException as exc:
            await self._abort(producer, exc)
            if isinstance(exc, DRIVER_ERRORS) and not isinstance(exc, KafkaError):
                raise translate(exc) from exc
            raise
        finally:
            self._pending_offsets, self._pending_group = None, None

    async def _commit(self, producer: AIOKafkaProducer) -> None:
        offsets, group = self._pending_offsets, self._pending_group
        if offsets and group is not None:
            await producer.send_offsets_to_transaction(offsets, group)
        await producer.commit_transaction()

    async def _abort(self, producer: AIOKafkaProducer, cause: BaseException) -> None:
        txn_manager = producer._txn_manager
        # After a fatal transaction error (fenced, invalid epoch) the broker has already
        # ended the transaction and aiokafka refuses to abort: only a new producer helps.
        if txn_manager is None or txn_manager.is_fatal_error():
            return
        try:
            await producer.abort_transaction()
        except DRIVER_ERRORS as exc:
            # The cause is the error worth raising; this one only says the producer is
            # now unusable, which the next transaction will report.
            log.warning(
                "aborting transaction %s after %r failed: %s", self.transactional_id, cause, exc
            )
