"""Copying one VM's batch topic from the source cluster to the target, exactly once.

The MirrorMaker 2 exactly-once pattern: a transactional producer on the target, with a
stable id per VM (``<prefix>.<vm id>``), writes the copied messages AND a progress record
(the next source offset) to the VM's compacted offsets topic on the target, in one
transaction. On (re)start the producer's InitProducerId fences any other copier of the
VM and settles its open transaction; only then is the progress record read back and the
source consumer placed there. Whatever crashes when, the target holds each source
message once, in order.

Failures of either cluster end the current attempt: everything is closed, the copier
waits (exponential backoff) and starts over from the committed progress. Messages are
copied as they are (bytes, key, headers); their journal header is only peeked at for the
sequence number and timestamps that feed the lag metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka.structs import TopicPartition

from datapath.journal import ChunkHeader, JournalError, peek_header
from datapath.kafka import (
    REQUEST_SLACK,
    Consumer,
    KafkaClusterSettings,
    KafkaError,
    KafkaMetrics,
    ProducerFenced,
    TransactionalProducer,
    backoff_delay,
    topic_id,
    within,
)
from datapath.topics import Stream, topic_name

from .metrics import TransceiverMetrics
from .offset_record import (
    CopyProgress,
    OffsetRecordError,
    decode_progress,
    encode_progress,
    progress_key,
)
from .settings import TransceiverSettings
from .throttle import TokenBucket

log = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0


class VmCopier:
    """The copy task of one VM; ``run()`` until cancelled."""

    def __init__(
        self,
        vm_id: str,
        *,
        settings: TransceiverSettings,
        source: KafkaClusterSettings,
        target: KafkaClusterSettings,
        max_message_bytes: int,
        metrics: TransceiverMetrics,
        kafka_metrics: KafkaMetrics,
        throttle: TokenBucket | None,
    ) -> None:
        self.vm_id = vm_id
        self.settings = settings
        self.source = source
        self.target = target
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.kafka_metrics = kafka_metrics
        self.throttle = throttle
        self.source_partition = TopicPartition(topic_name(Stream.BATCH, vm_id), 0)
        self.target_topic = topic_name(Stream.BATCH, vm_id)
        self.offsets_partition = TopicPartition(topic_name(Stream.OFFSETS, vm_id), 0)
        self.key = progress_key(self.source_partition.topic, 0)

        self.position: int | None = None  # next source offset to copy (committed)
        self.source_end: int | None = None
        self.last_seq: int | None = None
        self.epoch: int | None = None
        self.healthy = False
        self.last_error: str | None = None
        self.copied_messages = 0
        self.copied_bytes = 0
        self._mean_message_bytes = 0.0
        self._oldest_uncopied_ts_ns: int | None = None
        self._last_copied_ts_ns: int | None = None
        self._source: Consumer | None = None
        self._source_topic_id: str | None = None
        self._producer: TransactionalProducer | None = None
        self._next_lag_refresh = 0.0
        for gauge in (metrics.lag_records, metrics.lag_bytes, metrics.lag_seconds):
            gauge.labels(vm=vm_id).set(0)
        metrics.target_up.labels(vm=vm_id).set(0)

    # -- the task

    async def run(self) -> None:
        settings = self.settings
        failures = 0
        while True:
            try:
                await self._open()
                failures = 0
                await self._copy_forever()
            except ProducerFenced as exc:
                self._failed("fenced", exc)
            except (KafkaError, TimeoutError) as exc:
                self._failed("timeout" if isinstance(exc, TimeoutError) else "copy", exc)
            finally:
                await self._close_producer()
            # While the target is away, keep the source lag visible.
            await self._refresh_lag(force=True)
            failures += 1
            await asyncio.sleep(
                backoff_delay(settings.retry_backoff_s, failures, settings.max_retry_backoff_s)
            )

    async def close(self) -> None:
        await self._close_producer()
        source, self._source = self._source, None
        if source is not None:
            try:
                await source.stop()
            except KafkaError as exc:
                log.warning("VM %s: closing the source consumer failed: %s", self.vm_id, exc)

    def status(self) -> dict[str, Any]:
        lag = None
        if self.source_end is not None and self.position is not None:
            lag = max(0, self.source_end - self.position)
        return {
            "healthy": self.healthy,
            "last_error": self.last_error,
            "source_topic": self.source_partition.topic,
            "target_topic": self.target_topic,
            "position": self.position,
            "source_end": self.source_end,
            "lag_records": lag,
            "last_seq": self.last_seq,
            "epoch": self.epoch,
            "copied_messages": self.copied_messages,
            "copied_bytes": self.copied_bytes,
        }

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.healthy = False
        self.last_error = f"{kind}: {exc!r}"
        self.metrics.errors.labels(vm=self.vm_id, kind=kind).inc()
        self.metrics.target_up.labels(vm=self.vm_id).set(0)
        log.warning("VM %s: copy interrupted (%s), starting over: %r", self.vm_id, kind, exc)

    # -- opening

    async def _open(self) -> None:
        timeout = self.settings.operation_timeout_s
        async with asyncio.timeout(timeout):
            if self._source is None:
                # No silent jump when retention removes what was not copied yet: the
                # fetch fails, and the reopen counts what was lost (below).
                source = Consumer(
                    self.source, isolation_level="read_committed", auto_offset_reset="none"
                )
                await source.start()
                source.assign([self.source_partition])
                self._source = source
            producer = TransactionalProducer(
                self.target,
                transactional_id=f"{self.settings.transactional_id_prefix}.{self.vm_id}",
                transaction_timeout_ms=self.settings.transaction_timeout_ms,
                metrics=self.kafka_metrics,
                max_request_size=self.max_message_bytes + REQUEST_SLACK,
                linger_ms=0,
            )
            self._producer = producer
            # InitProducerId: fences other copiers of this VM, settles their transaction.
            await producer.start()
            progress = await self._read_progress()
            tp = self.source_partition
            self._source_topic_id = await topic_id(self.source, tp.topic, timeout_s=timeout)
            begin = (await self._source.beginning_offsets([tp]))[tp]
            end = (await self._source.end_offsets([tp]))[tp]
        start = begin if progress is None else progress.next_offset
        if (
            progress is not None
            and None not in (progress.source_topic_id, self._source_topic_id)
            and progress.source_topic_id != self._source_topic_id
        ):
            # The topic was deleted and created again: its offsets start over, however
            # many messages it holds by now.
            log.warning(
                "VM %s: the source topic %s is not the one copied up to offset %d (its id "
                "was %s, now %s): copying it from its start, offset %d",
                self.vm_id,
                tp.topic,
                start,
                progress.source_topic_id,
                self._source_topic_id,
                begin,
            )
            start = begin
        elif start > end:
            # Offsets the source never reached: the topic was deleted and created again.
            # Everything it holds now is new to the target.
            log.warning(
                "VM %s: copied up to source offset %d, but the source topic ends at %d "
                "(recreated?): copying it from its start, offset %d",
                self.vm_id,
                start,
                end,
                begin,
            )
            start = begin
        if start < begin:
            lost = begin - start
            self.metrics.backlog_lost.labels(vm=self.vm_id).inc(lost)
            log.error(
                "VM %s: source offsets %d..%d were deleted by retention before they were "
                "copied; the target will see a sequence gap and needs a resync",
                self.vm_id,
                start,
                begin - 1,
            )
            start = begin
        if progress is not None:
            self.last_seq, self.epoch = progress.last_seq, progress.epoch
        self._source.seek(self.source_partition, start)
        self.position = start
        self.healthy = True
        self.last_error = None
        self.metrics.target_up.labels(vm=self.vm_id).set(1)
        log.info(
            "VM %s: copying from source offset %d (last seq %s)", self.vm_id, start, self.last_seq
        )

    async def _read_progress(self) -> CopyProgress | None:
        """The last committed progress record of this VM on the target."""
        tp = self.offsets_partition
        latest: bytes | None = None
        async with Consumer(self.target, isolation_level="read_committed") as reader:
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            end = (await reader.end_offsets([tp]))[tp]
            while await reader.position(tp) < end:
                fetched = await reader.getmany(tp, timeout_ms=500)
                for message in fetched.get(tp, ()):
                    if message.key == self.key and message.offset < end:
                        latest = message.value
        if latest is None:
            return None
        try:
            return decode_progress(latest)
        except OffsetRecordError as exc:
            # Our own record, unreadable: starting from the beginning would duplicate
            # everything on the target, so stop here and let an operator look.
            raise KafkaError(f"VM {self.vm_id}: {exc}") from exc

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await within(_CLOSE_TIMEOUT_S, producer.stop())
        except (KafkaError, TimeoutError) as exc:
            # The target is unreachable; the next producer with this id aborts what is open.
            log.debug("VM %s: closing the target producer failed: %r", self.vm_id, exc)

    # -- copying

    async def _copy_forever(self) -> None:
        source = self._source
        assert source is not None
        tp = self.source_partition
        if self.settings.mode == "continuous":
            while True:
                await self._copy_available(until=None)
        interval = self.settings.interval_s
        next_tick = time.monotonic()
        while True:
            # Periodic: copy what the source holds at the tick, then stay off the WAN.
            end = (await source.end_offsets([tp]))[tp]
            while await source.position(tp) < end:
                await self._copy_available(until=end)
            next_tick += interval
            if next_tick <= time.monotonic():
                next_tick = time.monotonic()  # a copy longer than the interval: no catch-up burst
            while (delay := next_tick - time.monotonic()) > 0:
                # Idle between ticks, but the lag keeps growing and stays visible.
                await self._refresh_lag(force=True)
                await asyncio.sleep(min(delay, self.settings.lag_refresh_s))

    async def _copy_available(self, *, until: int | None) -> None:
        """Copies what one fetch returns (below ``until``) in one target transaction."""
        source = self._source
        assert source is not None
        tp = self.source_partition
        fetched = (
            await source.getmany(
                tp, timeout_ms=200, max_records=self.settings.max_transaction_messages
            )
        ).get(tp, [])
        taken: list[Any] = []
        size = 0
        for message in fetched:
            if until is not None and message.offset >= until:
                break
            # (A message without a value is copied as it is, like any other.)
            length = len(message.value or b"")
            if taken and size + length > self.settings.max_transaction_bytes:
                break
            taken.append(message)
            size += length
        if len(taken) < len(fetched):
            source.seek(tp, fetched[len(taken)].offset)
        if not taken:
            # The consumer may have stepped over transaction markers: nothing left to copy.
            self.position = max(self.position or 0, await source.position(tp))
            await self._refresh_lag()
            return
        headers = [_header(m.value) for m in taken]
        if self._oldest_uncopied_ts_ns is None:
            first = next((h for h in headers if h is not None), None)
            self._oldest_uncopied_ts_ns = first.min_ts_ns if first else None
        if self.throttle is not None:
            waited = await self.throttle.acquire(size)
            self.metrics.throttle_wait.inc(waited)
        started = time.monotonic()
        last = next((h for h in reversed(headers) if h is not None), None)
        await self._commit(taken, last)
        self.metrics.transaction_seconds.observe(time.monotonic() - started)
        self.position = max(taken[-1].offset + 1, await source.position(tp))
        if last is not None:
            self.last_seq, self.epoch = last.last_seq, last.epoch
            self._last_copied_ts_ns = last.max_ts_ns
            self.metrics.last_seq.labels(vm=self.vm_id).set(last.last_seq)
        self._oldest_uncopied_ts_ns = None
        m = self.metrics
        m.messages.labels(vm=self.vm_id).inc(len(taken))
        m.bytes.labels(vm=self.vm_id).inc(size)
        m.transactions.labels(vm=self.vm_id).inc()
        m.batches.labels(vm=self.vm_id).inc(sum(1 for h in headers if h is not None and h.is_last))
        self.copied_messages += len(taken)
        self.copied_bytes += size
        mean = size / len(taken)
        self._mean_message_bytes = (
            mean if not self._mean_message_bytes else 0.9 * self._mean_message_bytes + 0.1 * mean
        )
        await self._refresh_lag()

    async def _commit(self, messages: list[Any], last: ChunkHeader | None) -> None:
        progress = CopyProgress(
            source_topic=self.source_partition.topic,
            partition=0,
            next_offset=messages[-1].offset + 1,
            last_seq=last.last_seq if last else self.last_seq,
            epoch=last.epoch if last else self.epoch,
            source_cluster=self.source.bootstrap_servers,
            ts_ns=time.time_ns(),
            source_topic_id=self._source_topic_id,
        )
        await within(self.settings.operation_timeout_s, self._transaction(messages, progress))

    async def _transaction(self, messages: list[Any], progress: CopyProgress) -> None:
        producer = self._producer
        assert producer is not None
        # The commit waits for every record sent here and fails if any failed.
        async with producer.transaction():
            for message in messages:
                await producer.send(
                    self.target_topic,
                    message.value,
                    message.key,
                    partition=0,
                    headers=list(message.headers) or None,
                )
            await producer.send(
                self.offsets_partition.topic, encode_progress(progress), self.key, partition=0
            )

    async def _refresh_lag(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_lag_refresh:
            return
        self._next_lag_refresh = now + self.settings.lag_refresh_s
        source = self._source
        if source is None or self.position is None:
            return
        try:
            async with asyncio.timeout(5.0):
                end = (await source.end_offsets([self.source_partition]))[self.source_partition]
        except (KafkaError, TimeoutError) as exc:
            log.debug("VM %s: source end offset unavailable: %r", self.vm_id, exc)
            return
        self.source_end = end
        lag = max(0, end - self.position)
        m = self.metrics
        m.lag_records.labels(vm=self.vm_id).set(lag)
        m.lag_bytes.labels(vm=self.vm_id).set(lag * self._mean_message_bytes)
        age = 0.0
        if lag:
            oldest = self._oldest_uncopied_ts_ns or self._last_copied_ts_ns
            if oldest is not None:
                age = max(0.0, (time.time_ns() - oldest) / 1e9)
        m.lag_seconds.labels(vm=self.vm_id).set(age)


def _header(value: bytes | None) -> ChunkHeader | None:
    if value is None:
        return None
    try:
        return peek_header(value)
    except JournalError:
        # Not ours to judge: the bytes are copied as they are; the applier quarantines them.
        return None
