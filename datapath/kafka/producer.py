"""Producers: idempotent (the tap, status reports) and transactional (the receiver, the
transceiver).

Both are thin wrappers over librdkafka (confluent-kafka) that raise only the domain
errors of :mod:`datapath.kafka.errors`. librdkafka rather than aiokafka, as the consumers
and the admin client use, because the producers carry every byte the product replicates
and aiokafka's producer was the slowest part of the chain: one request in flight per
partition, and the batch built and checksummed in Python. On the same loopback broker,
transactions of 8 MiB records reached 105-115 MB/s with aiokafka using 0.35 s of CPU per
64 MiB, and 210-230 MB/s with librdkafka using 0.07 s (docs/benchmarks.md).

librdkafka runs its own threads; a thread of ours serves its delivery reports and hands
each to the event loop, where it settles the record's future. Its blocking calls
(transactions, flush) run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Generator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self

import confluent_kafka as rdkafka
from aiokafka.structs import TopicPartition

from datapath.kafka.errors import (
    RD_PURGED,
    RDKAFKA_ERRORS,
    KafkaError,
    KafkaFatal,
    KafkaMetrics,
    KafkaUnavailable,
    retrying,
    translate,
)
from datapath.kafka.lifecycle import AsyncClient
from datapath.kafka.settings import KafkaClusterSettings

log = logging.getLogger(__name__)
_driver_log = logging.getLogger("librdkafka")

Compression = Literal["gzip", "snappy", "lz4", "zstd"]

# What a produce request needs beyond its records (the record batch's and the request's
# own headers): a producer's max request size is the topic's max.message.bytes plus this.
REQUEST_SLACK = 64 * 1024
# Large enough for a journal batch of several MiB; topics cap it with max.message.bytes.
DEFAULT_MAX_REQUEST_SIZE = 8 * 1024 * 1024 + REQUEST_SLACK
# How long the delivery-report thread waits for reports at a time (also its stop latency).
_POLL_S = 0.05
# A full local queue: how long send() waits for deliveries before trying again.
_QUEUE_FULL_WAIT_S = 0.005
# First retry of a refused transactional request (see TransactionalProducer).
_TRANSACTION_RETRY_BACKOFF_MS = 10
# Waiting for a consumer group's coordinator (see _group_metadata): some 7 s in all, longer
# than a fresh cluster takes to create its offsets topic.
_COORDINATOR_ATTEMPTS = 10
_COORDINATOR_BACKOFF_S = 0.1
_COORDINATOR_MAX_BACKOFF_S = 1.0
# Records handed to librdkafka and not yet settled, at most. An idempotent librdkafka
# producer counts a partition's records in flight against its limit of five requests in
# flight, and while that holds records back its broker thread busy-polls instead of
# waiting for the responses (librdkafka's rd_kafka_toppar_producer_serve computes the
# wake-up before it checks the limit). Measured with records of 300 KiB on a loopback
# broker: 160 poll calls per record and 0.9 of a core for that thread, against 0.15 with
# at most four unacknowledged, at the same or a higher rate.
MAX_UNACKED_RECORDS = 4


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where an acknowledged record landed."""

    topic: str
    partition: int
    offset: int
    timestamp: int


def _mark_retrieved(future: asyncio.Future[RecordMetadata]) -> None:
    # A record of a failed transaction fails with it; the commit reports that, so its
    # delivery need not be awaited (and asyncio must not log it as never retrieved).
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[RecordMetadata], error: Any, message: Any) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(translate(rdkafka.KafkaException(error)))
    else:
        future.set_result(
            RecordMetadata(
                message.topic(), message.partition(), message.offset(), message.timestamp()[1]
            )
        )


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
        # The future holds a domain error already (see _settle).
        return (yield from self.future.__await__())


class Producer(AsyncClient):
    """An idempotent producer: acks=all, no duplicates or reordering on retries."""

    # A transaction's commit raises if any of its records failed, so awaiting each
    # delivery is optional there (and asyncio must not log an unawaited failure).
    _commit_reports_failures = False

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
        self.request_timeout_s = request_timeout_ms / 1000
        self._config: dict[str, Any] = {
            **cluster.rdkafka_config(),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": compression_type or "none",
            "message.max.bytes": max_request_size,
            # A record larger than this still travels, alone in its batch.
            "batch.size": min(max_batch_size, max_request_size),
            "request.timeout.ms": request_timeout_ms,
            # A record not acknowledged within the request timeout fails, as with every
            # other client here; the callers decide whether to retry.
            "message.timeout.ms": request_timeout_ms,
            # Topics are created before they are used: one that is not in the metadata
            # soon is missing (and fails as UnknownTopic), not still propagating.
            "topic.metadata.propagation.max.ms": max(100, min(2000, request_timeout_ms // 2)),
            "logger": _driver_log,
            "error_cb": _log_client_error,
        }
        if client_id is not None:
            self._config["client.id"] = client_id
        self._producer: rdkafka.Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self._unacked = 0
        self._room_waiters: list[asyncio.Future[None]] = []

    def _driver_config(self) -> dict[str, Any]:
        return self._config

    @property
    def driver(self) -> rdkafka.Producer:
        if self._producer is None:
            raise KafkaFatal(f"{type(self).__name__} is not started")
        return self._producer

    async def start(self) -> None:
        """Creates the producer and checks that the cluster answers (its metadata)."""
        if self._producer is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            producer = rdkafka.Producer(self._driver_config())
        except RDKAFKA_ERRORS as exc:
            raise translate(exc) from exc
        self._producer = producer
        # One event per driver: a start after a stop that is still tearing the last one
        # down must not keep that one's report thread alive (its join would never end).
        self._stopping = threading.Event()
        self._poller = threading.Thread(
            target=self._serve_reports,
            args=(producer, self._stopping),
            name=f"kafka-deliveries-{self._config['client.id']}",
            daemon=True,
        )
        self._poller.start()
        try:
            await self._blocking(producer.list_topics, timeout=self.request_timeout_s)
            await self._on_start(producer)
        except BaseException:
            await self._release()
            raise
        log.debug("%s started on %s", type(self).__name__, self.cluster.describe())

    async def _on_start(self, producer: rdkafka.Producer) -> None:
        """What a subclass needs before the producer is used."""

    async def stop(self) -> None:
        """Sends what is queued (up to the request timeout), then closes; idempotent.

        Raises :class:`KafkaUnavailable` when records were left undelivered (they fail)."""
        producer = self._producer
        if producer is None:
            return
        try:
            left = await self._blocking(producer.flush, self.request_timeout_s)
        finally:
            await self._release()
        if left:
            raise KafkaUnavailable(f"{left} records were not delivered before the producer stopped")

    async def abort(self) -> None:
        """Closes at once: queued records are dropped and fail, none is sent any more."""
        await self._release()

    async def _release(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self._stopping.set()
        poller, self._poller = self._poller, None
        # Purging fails what is left (their futures settle); librdkafka's teardown may
        # wait for its threads: both off the event loop.
        await asyncio.to_thread(_tear_down, producer, poller)
        for waiter in self._room_waiters:  # senders waiting for room learn it is stopped
            if not waiter.done():
                waiter.set_result(None)

    def _serve_reports(self, producer: rdkafka.Producer, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                producer.poll(_POLL_S)
            except RDKAFKA_ERRORS as exc:
                # A fatal error (fenced, say) surfaces here too; the calls that depend on
                # the producer (deliveries, transactions) report it to their callers.
                log.info("%s: %s", self._config["client.id"], translate(exc))
                stopping.wait(_POLL_S)

    def _on_delivery(
        self, future: asyncio.Future[RecordMetadata], error: Any, message: Any
    ) -> None:
        # Called on a librdkafka-serving thread.
        loop = self._loop
        if loop is not None:
            # A report after the loop closed (its program is exiting) has no one to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._record_settled, future, error, message)

    async def _blocking(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except RDKAFKA_ERRORS as exc:
            raise translate(exc) from exc

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

        Waits while MAX_UNACKED_RECORDS records are unacknowledged, or the local queue is
        full. The delivery fails with :class:`UnknownTopic` when the topic does not exist;
        :class:`MessageTooLarge` is raised here when the record exceeds
        ``max_request_size``, and by the delivery when the topic refuses it.
        """
        producer = self.driver
        while self._unacked >= MAX_UNACKED_RECORDS:
            await self._wait_for_room()
            producer = self.driver  # raises if the producer was stopped meanwhile
        assert self._loop is not None
        future: asyncio.Future[RecordMetadata] = self._loop.create_future()
        if self._commit_reports_failures:
            future.add_done_callback(_mark_retrieved)
        options: dict[str, Any] = {"on_delivery": functools.partial(self._on_delivery, future)}
        if partition is not None:
            options["partition"] = partition
        if headers:
            options["headers"] = headers
        while True:
            try:
                producer.produce(topic, value, key, **options)
            except BufferError:
                await asyncio.sleep(_QUEUE_FULL_WAIT_S)
                continue
            except RDKAFKA_ERRORS as exc:
                raise translate(exc) from exc
            self._unacked += 1
            return Delivery(future)

    @property
    def unacked_records(self) -> int:
        """Records sent and not settled yet (acknowledged or failed)."""
        return self._unacked

    async def _wait_for_room(self) -> None:
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._room_waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._room_waiters.remove(waiter)

    def _record_settled(
        self, future: asyncio.Future[RecordMetadata], error: Any, message: Any
    ) -> None:
        """On the event loop: librdkafka is done with a record (delivered or failed)."""
        _settle(future, error, message)
        self._unacked -= 1
        # One waiter per settled record; a woken sender checks the count again.
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

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
        """Wait until every queued record has been acknowledged (up to the request timeout)."""
        left = await self._blocking(self.driver.flush, self.request_timeout_s)
        if left:
            raise KafkaUnavailable(f"{left} records still unacknowledged after the flush")


def _tear_down(producer: rdkafka.Producer, poller: threading.Thread | None) -> None:
    if poller is not None:
        poller.join()
    with contextlib.suppress(rdkafka.KafkaException, RuntimeError):
        producer.purge()
    # Serves the reports of what the purge failed, so their futures settle.
    producer.poll(0)


def _log_client_error(error: rdkafka.KafkaError) -> None:
    # Connection-level events (a broker down, all brokers down): librdkafka retries them
    # itself; the records' own deliveries and the callers' timeouts report what matters.
    log.debug("librdkafka: %s", error)


class TransactionalProducer(Producer):
    """A producer whose records (and consumer offsets) commit or abort together.

    Usage, as in the transceiver::

        async with TransactionalProducer(target, transactional_id="dm-tx-vm1") as producer:
            async with producer.transaction():
                await producer.send(topic, value)
                producer.send_offsets_to_transaction({tp: next_offset}, group_id)

    One transactional id per copy task: starting a second producer with the same id fences
    the first (:class:`ProducerFenced`). After a fatal error the producer must be stopped
    and a new one started; it resumes from the last committed transaction. Awaiting a
    record's delivery is optional: the commit raises if any of the transaction's records
    failed.
    """

    _commit_reports_failures = True

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        *,
        transactional_id: str,
        transaction_timeout_ms: int = 60_000,
        metrics: KafkaMetrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(cluster, **kwargs)
        self.transactional_id = transactional_id
        # Counts the retries of the group coordinator's lookup (unregistered if not given).
        self.metrics = metrics if metrics is not None else KafkaMetrics(registry=None)
        self.transaction_timeout_ms = transaction_timeout_ms
        self._pending_offsets: dict[TopicPartition, int] | None = None
        self._pending_group: str | None = None
        self._group_metadata: dict[str, Any] = {}
        # The first record that failed in the current transaction (librdkafka's error).
        self._failed_delivery: Any = None

    def _driver_config(self) -> dict[str, Any]:
        config = super()._driver_config()
        return {
            **config,
            "transactional.id": self.transactional_id,
            "transaction.timeout.ms": self.transaction_timeout_ms,
            # librdkafka wants every record settled within the transaction's lifetime.
            "message.timeout.ms": min(config["message.timeout.ms"], self.transaction_timeout_ms),
            # The requests of a transaction begun right after the previous commit (the
            # consumer offsets' AddOffsetsToTxn among them) are refused with
            # CONCURRENT_TRANSACTIONS until the coordinator has written that one's
            # markers, some 20-30 ms. librdkafka retries them after this backoff (growing
            # on repeated errors, as for produce retries); with its 100 ms default,
            # back-to-back transactions took 110 ms instead of 35.
            "retry.backoff.ms": _TRANSACTION_RETRY_BACKOFF_MS,
        }

    def _on_delivery(
        self, future: asyncio.Future[RecordMetadata], error: Any, message: Any
    ) -> None:
        # Runs before a commit waiting for this record returns (see _commit).
        if error is not None and self._failed_delivery is None and error.code() not in RD_PURGED:
            self._failed_delivery = error
        super()._on_delivery(future, error, message)

    async def _on_start(self, producer: rdkafka.Producer) -> None:
        # InitProducerId: fences any other producer with this id and waits until its
        # open transaction is completed or aborted.
        await self._blocking(producer.init_transactions, self.request_timeout_s)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_id: str
    ) -> None:
        """Commit these consumer offsets (next offset to read) with the transaction.

        May be called many times in a transaction: offsets are merged, the latest per
        partition wins, and sent to the cluster once, at commit.
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
            producer.begin_transaction()
        except RDKAFKA_ERRORS as exc:
            raise translate(exc) from exc
        self._pending_offsets, self._pending_group = {}, None
        self._failed_delivery = None
        try:
            yield self
            await self._commit(producer)
        except BaseException as exc:
            # The producer's own calls raise domain errors; anything else the block raised
            # is the caller's and passes unchanged.
            await self._abort(producer, exc)
            raise
        finally:
            self._pending_offsets, self._pending_group = None, None

    async def _commit(self, producer: rdkafka.Producer) -> None:
        offsets, group = self._pending_offsets, self._pending_group
        metadata = None
        if offsets and group is not None:
            metadata = await self._metadata_of(group, next(iter(offsets)))
        try:
            await self._blocking(self._commit_blocking, producer, offsets, metadata)
        except KafkaError as exc:
            failed = self._failed_delivery
            if failed is None or _driver_fatal(exc):
                raise
            # A record failed, so librdkafka refuses the commit ("N message(s) failed
            # delivery", or an erroneous state for the offsets): the record's own error
            # (too large, timed out...) says what happened and whether retrying helps.
            raise translate(rdkafka.KafkaException(failed)) from exc

    def _commit_blocking(
        self,
        producer: rdkafka.Producer,
        offsets: Mapping[TopicPartition, int] | None,
        group_metadata: Any,
    ) -> None:
        """The end of a transaction, in one trip off the event loop."""
        timeout_s = self.request_timeout_s
        if offsets and group_metadata is not None:
            # Every record settled first: an offsets call made while a record fails was
            # seen to block for its whole timeout, the transaction turning abortable
            # under it. After a failed record only the commit runs, and reports it.
            left = producer.flush(timeout_s)
            if left:
                raise KafkaUnavailable(f"{left} records unacknowledged at the commit")
            if self._failed_delivery is None:
                producer.send_offsets_to_transaction(
                    [
                        rdkafka.TopicPartition(tp.topic, tp.partition, o)
                        for tp, o in offsets.items()
                    ],
                    group_metadata,
                    timeout_s,
                )
        producer.commit_transaction(timeout_s)

    async def _metadata_of(self, group_id: str, partition: TopicPartition) -> Any:
        """The group's metadata for TxnOffsetCommit: its id only, no generation or member
        (the offsets of a VM are fenced by the VM's transactional id; see the receiver)."""
        metadata = self._group_metadata.get(group_id)
        if metadata is None:
            metadata = await retrying(
                functools.partial(
                    self._blocking,
                    _group_metadata,
                    self.cluster,
                    group_id,
                    partition,
                    self.request_timeout_s,
                ),
                what="find_group_coordinator",
                attempts=_COORDINATOR_ATTEMPTS,
                backoff=_COORDINATOR_BACKOFF_S,
                max_backoff=_COORDINATOR_MAX_BACKOFF_S,
                metrics=self.metrics,
            )
            self._group_metadata[group_id] = metadata
        return metadata

    async def _abort(self, producer: rdkafka.Producer, cause: BaseException) -> None:
        try:
            await self._blocking(producer.abort_transaction, self.request_timeout_s)
        except KafkaError as exc:
            # After a fatal error (fenced, invalid epoch) the broker has already ended the
            # transaction and only a new producer helps; the cause is the error to raise.
            log.warning(
                "aborting transaction %s after %r failed: %s", self.transactional_id, cause, exc
            )


def _driver_fatal(exc: KafkaError) -> bool:
    """The translated librdkafka error was fatal for its producer (fenced, say)."""
    cause = exc.__cause__
    return isinstance(cause, rdkafka.KafkaException) and bool(cause.args[0].fatal())


def _group_metadata(
    cluster: KafkaClusterSettings, group_id: str, partition: TopicPartition, timeout_s: float
) -> Any:
    """The group's metadata, once the cluster has a coordinator for the group.

    librdkafka's send_offsets_to_transaction looks the group's coordinator up with a few
    quick retries, and when they are used up it neither fails nor honours its timeout: it
    hangs (librdkafka issues 5456 and 5511). A cluster has no coordinator until its
    offsets topic exists, which its first group creates: on a fresh cluster that took
    longer than those retries. So the group's committed offsets are read first (once per
    group and producer): that fails with a transient error (NOT_COORDINATOR,
    COORDINATOR_NOT_AVAILABLE) until the coordinator is there, and the caller retries.
    """
    consumer = rdkafka.Consumer(
        {**cluster.rdkafka_config(), "group.id": group_id, "logger": _driver_log}
    )
    try:
        consumer.committed(
            [rdkafka.TopicPartition(partition.topic, partition.partition)], timeout=timeout_s
        )
        return consumer.consumer_group_metadata()
    finally:
        consumer.close()
