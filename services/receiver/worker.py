"""The receiver's worker loop: tap topics in, consistency batches out, exactly once.

One consumer, in the receiver group, reads the tap topics of the VMs the group assigned
to this receiver. Every VM has its own pipeline: a :class:`VmBatcher` and a transactional
producer whose id is ``<prefix>.<vm id>``. A VM's batches, its dead letters and status
events, and its consumed tap offset commit in one transaction of that producer, so a
crash at any point leaves either all of them or none.

Why one transactional id per VM: aiokafka 0.14 commits offsets with TxnOffsetCommit v0,
which carries no group generation (no KIP-447 fencing). When the group moves a VM to
another receiver, the new owner starts a producer with the same id; that fences the old
owner's producer and completes or aborts its open transaction before the new owner reads
the committed offset and the batch topic's tail. A zombie can then commit nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from datapath.journal import (
    DATA_KINDS,
    Batch,
    ChunkHeader,
    JournalError,
    encode_batch,
    peek_header,
)
from datapath.kafka import (
    REQUEST_SLACK,
    Consumer,
    KafkaClusterSettings,
    KafkaError,
    KafkaMetrics,
    KafkaUnavailable,
    ProducerFenced,
    TransactionalProducer,
    backoff_delay,
    within,
)
from datapath.protection import ProtectedVM, ProtectionPlan, load_protection_plan
from datapath.provisioning import ensure_plan_topics
from datapath.topics import Stream, topic_name

from .batch_tail import read_batch_tails
from .batcher import BatcherLimits, CutBatch, Outbox, VmBatcher
from .metrics import ReceiverMetrics
from .settings import ReceiverSettings
from .status_events import outgoing_for

log = logging.getLogger(__name__)

# Room left in a Kafka message for the record framing around a batch chunk.
_MESSAGE_OVERHEAD = 4096
_STOP_GRACE_S = 10.0
# How often a cut batch waiting for the publication before it checks whether it may go.
_WAITING_OUTBOX_POLL_MS = 5
# The loop's longest wait for tap messages (due batches wake it up sooner): how soon it
# retries opening a VM or refreshes lag once nothing arrives.
_IDLE_POLL_MS = 100


@dataclass(slots=True)
class EncodedBatch:
    cut: CutBatch
    batch: Batch
    chunks: list[bytes]
    payload_bytes: int


class VmPipeline:
    """One assigned VM: its batcher and its transactional producer."""

    def __init__(
        self, vm: ProtectedVM, partition: TopicPartition, producer: TransactionalProducer
    ) -> None:
        self.vm = vm
        self.partition = partition
        self.producer = producer
        self.batch_topic = topic_name(Stream.BATCH, vm.id)
        self.deadletter_topic = topic_name(Stream.DEADLETTER, vm.id)
        self.batcher: VmBatcher | None = None  # None while (re)opening
        self.fenced = False
        self.last_error: str | None = None
        self.committed_offset: int | None = None
        self.last_committed_seq: int | None = None
        self.log_end: int | None = None
        self.retry_at = 0.0
        self.open_failures = 0  # in a row
        # The latest publication (an outbox being encoded, then committed after the one
        # before it): at most two at once, one encoding while the other commits.
        self.inflight: asyncio.Task[None] | None = None
        self._inflight_encoded = True
        self._previous: asyncio.Task[None] | None = None
        # Batcher counters already added to the Prometheus counters (reset with the batcher).
        self.reported: dict[str, int] = {}

    @property
    def healthy(self) -> bool:
        return self.batcher is not None and not self.fenced

    def may_publish(self) -> bool:
        """True when a new publication may start: none is in flight, or the latest one is
        encoded and has nothing before it left to wait for."""
        latest = self.inflight
        return latest is None or latest.done() or (self._inflight_encoded and self._previous_done())

    def _previous_done(self) -> bool:
        previous = self._previous
        return previous is None or previous.done()

    def publish(
        self, publication: Callable[[asyncio.Task[None] | None], Coroutine[Any, Any, None]]
    ) -> None:
        """Starts `publication(previous)`, previous being the publication it must follow."""
        previous = self._previous = self.inflight
        self._inflight_encoded = False
        self.inflight = asyncio.create_task(publication(previous), name=f"publish-{self.vm.id}")

    def encoded(self) -> None:
        self._inflight_encoded = True

    async def close(self) -> None:
        await self._close(self.producer)

    async def renew_producer(self, producer: TransactionalProducer) -> None:
        """Closes the producer for `producer`, a new one (not started). The new one is in
        place before the old one's close begins: the loop may reopen the VM meanwhile,
        and must start the new one, not the one being closed."""
        old, self.producer = self.producer, producer
        await self._close(old)

    async def _close(self, producer: TransactionalProducer) -> None:
        try:
            await producer.stop()
        except KafkaError as exc:
            log.warning("VM %s: closing its producer failed: %s", self.vm.id, exc)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._receiver.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._receiver.partitions_assigned(assigned)


class Receiver:
    """The receiver service's worker (see :class:`datapath.service.Worker`)."""

    def __init__(self, settings: ReceiverSettings, plan: ProtectionPlan | None = None) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = ReceiverMetrics(self.registry)
        self.kafka_metrics = KafkaMetrics(self.registry)
        self._plan = plan
        self._vms_by_tap: dict[str, ProtectedVM] = {}
        self._pipes: dict[TopicPartition, VmPipeline] = {}
        self._lock = asyncio.Lock()
        self._consumer: Consumer | None = None
        self._tail_consumer: Consumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._instance = settings.instance_id or f"{socket.gethostname()}"
        self._limits = BatcherLimits(
            interval_s=settings.batch_interval_s,
            max_batch_bytes=settings.max_batch_bytes,
            max_batch_records=settings.max_batch_records,
        )
        self._joined = False
        self._stopping = False
        self._max_queued_bytes = 4 * settings.max_batch_bytes
        self._max_queued_records = 4 * settings.max_batch_records
        self._last_loop_error: str | None = None
        self._next_lag_refresh = 0.0

    # -- Worker protocol

    async def start(self) -> None:
        plan = self._plan or load_protection_plan(self.settings.plan)
        self._plan = plan
        self._vms_by_tap = {topic_name(Stream.TAP, vm.id): vm for vm in plan.vms}
        cluster = plan.sites.source.kafka
        await ensure_plan_topics(cluster, plan.vms, metrics=self.kafka_metrics)
        self._tail_consumer = Consumer(cluster, isolation_level="read_committed")
        await self._tail_consumer.start()
        self._consumer = Consumer(
            cluster,
            group_id=self.settings.group_id,
            group_instance_id=self.settings.instance_id,
            session_timeout_ms=self.settings.session_timeout_ms,
            # Tap topics created after the receiver started are picked up within this time.
            metadata_max_age_ms=30_000,
            fetch_min_bytes=self.settings.fetch_min_bytes,
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        await self._consumer.start()
        # The listener fences the previous owner's transactions and reloads each VM's
        # state before a record of a new assignment is read.
        self._consumer.subscribe(sorted(self._vms_by_tap), listener=_Rebalance(self))
        self._task = asyncio.create_task(self._run(), name="receiver-loop")
        log.info(
            "receiver %s started: %d VMs on %s, group %s",
            self._instance,
            len(plan.vms),
            cluster.describe(),
            self.settings.group_id,
        )

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:
            pipes = list(self._pipes.values())
            self._pipes.clear()
        await _settle([pipe.inflight for pipe in pipes], timeout_s=_STOP_GRACE_S)
        await asyncio.gather(*(pipe.close() for pipe in pipes))
        for consumer in (self._consumer, self._tail_consumer):
            if consumer is not None:
                try:
                    await consumer.stop()
                except KafkaError as exc:
                    log.warning("stopping a consumer failed: %s", exc)
        self._consumer = self._tail_consumer = None
        log.info("receiver %s stopped", self._instance)

    def ready(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and self._joined
            and all(pipe.healthy for pipe in self._pipes.values())
        )

    def status(self) -> dict[str, Any]:
        vms = {}
        for pipe in self._pipes.values():
            batcher = pipe.batcher
            vms[pipe.vm.id] = {
                "tap_topic": pipe.partition.topic,
                "batch_topic": pipe.batch_topic,
                "healthy": pipe.healthy,
                "fenced": pipe.fenced,
                "last_error": pipe.last_error,
                "committed_offset": pipe.committed_offset,
                "log_end_offset": pipe.log_end,
                "last_committed_seq": pipe.last_committed_seq,
                "next_seq": batcher.next_seq if batcher else None,
                "epoch": batcher.epoch if batcher else None,
                "open_resync": batcher.open_resync if batcher else None,
                "pending_records": batcher.pending_records if batcher else None,
                "counters": _counters(batcher),
            }
        return {
            "service": "receiver",
            "instance": self._instance,
            "group_id": self.settings.group_id,
            "ready": self.ready(),
            "joined": self._joined,
            "last_loop_error": self._last_loop_error,
            "vms": vms,
        }

    # -- rebalancing

    async def partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._lock:
            closing = [self._pipes.pop(tp) for tp in revoked if tp in self._pipes]
        # A transaction in flight ends (commits or fails) before the VM moves on, so the
        # next owner starts from a settled state. Pending records are dropped: the next
        # owner reads them again from the committed offset.
        await _settle([pipe.inflight for pipe in closing])
        await asyncio.gather(*(pipe.close() for pipe in closing))
        self.metrics.assigned_vms.set(len(self._pipes))
        if closing:
            log.info("revoked VMs: %s", ", ".join(p.vm.id for p in closing))

    async def partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        if self._stopping:
            return  # a rebalance that raced with stop(): the VMs go to the others
        async with self._lock:
            opening = []
            for tp in assigned:
                vm = self._vms_by_tap.get(tp.topic)
                if vm is None or tp in self._pipes:
                    continue
                pipe = VmPipeline(vm, tp, self._new_producer(vm))
                self._pipes[tp] = pipe
                opening.append(pipe)
            await self._open_pipes(opening)
            self._joined = True
        self.metrics.assigned_vms.set(len(self._pipes))
        if opening:
            log.info("assigned VMs: %s", ", ".join(p.vm.id for p in opening))

    def _new_producer(self, vm: ProtectedVM) -> TransactionalProducer:
        return TransactionalProducer(
            self._source_cluster(),
            transactional_id=f"{self.settings.transactional_id_prefix}.{vm.id}",
            transaction_timeout_ms=self.settings.transaction_timeout_ms,
            metrics=self.kafka_metrics,
            max_request_size=vm.journal.max_message_bytes + REQUEST_SLACK,
            linger_ms=0,
        )

    def _fenced_grace_s(self) -> float:
        """How long a fenced VM waits for the rebalance that would move it: a member that
        stopped heartbeating is out after a session timeout, and the rebalance that
        follows takes about as long again."""
        return 2 * self.settings.session_timeout_ms / 1000

    def _source_cluster(self) -> KafkaClusterSettings:
        assert self._plan is not None
        return self._plan.sites.source.kafka

    async def _open_pipes(self, pipes: list[VmPipeline]) -> None:
        """Fences the VMs' previous owners, then loads where their batches end.

        One attempt, under the lock that every VM's batching waits for: a VM that cannot
        be opened now is opened again by the loop later (`_open_failed`), while the
        others go on."""
        if not pipes:
            return
        for pipe in pipes:
            pipe.batcher = None
        # Starting a producer runs InitProducerId: it fences any other producer of the VM
        # and waits until that one's open transaction is completed or aborted, so what is
        # read next is final.
        started = await asyncio.gather(
            *(pipe.producer.start() for pipe in pipes), return_exceptions=True
        )
        ready = []
        for pipe, outcome in zip(pipes, started, strict=True):
            if isinstance(outcome, KafkaError):
                await self._open_failed(pipe, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                ready.append(pipe)
        if not ready:
            return
        consumer, tail_consumer = self._consumer, self._tail_consumer
        assert consumer is not None and tail_consumer is not None
        try:
            tails = await read_batch_tails(
                tail_consumer, [TopicPartition(p.batch_topic, 0) for p in ready]
            )
            committed = {pipe: await consumer.committed(pipe.partition) for pipe in ready}
            fresh = [p.partition for p in ready if committed[p] is None]
            begins = await consumer.beginning_offsets(fresh) if fresh else {}
        except KafkaError as exc:
            for pipe in ready:
                await self._open_failed(pipe, exc)
            return
        for pipe in ready:
            offset = committed[pipe]
            if offset is None:
                offset = begins[pipe.partition]
            self._resume(pipe, offset, tails[TopicPartition(pipe.batch_topic, 0)])

    async def _open_failed(self, pipe: VmPipeline, exc: KafkaError) -> None:
        """The loop opens the VM again after kafka_retry_backoff_s, doubling (up to 30 s)
        while it keeps failing; each failure schedules one retry, counted."""
        pipe.open_failures += 1
        delay = backoff_delay(self.settings.kafka_retry_backoff_s, pipe.open_failures)
        pipe.last_error = f"opening failed: {exc}"
        pipe.retry_at = time.monotonic() + delay
        self.metrics.errors.labels(kind="open").inc()
        self.kafka_metrics.retries.labels(operation="receiver_open").inc()
        log.error(
            "VM %s: cannot open its pipeline (attempt %d, again in %.1fs): %s",
            pipe.vm.id,
            pipe.open_failures,
            delay,
            exc,
        )
        await pipe.renew_producer(self._new_producer(pipe.vm))

    def _resume(self, pipe: VmPipeline, offset: int, tail: ChunkHeader | None) -> None:
        consumer = self._consumer
        assert consumer is not None
        consumer.seek(pipe.partition, offset)
        pipe.committed_offset = offset
        pipe.fenced = False
        pipe.last_error = None
        pipe.open_failures = 0
        pipe.last_committed_seq = tail.last_seq if tail else None
        pipe.reported = {}
        pipe.batcher = VmBatcher(
            pipe.vm.id,
            start_offset=offset,
            next_seq=tail.last_seq + 1 if tail else None,
            epoch=tail.epoch if tail else None,
            open_resync=tail.resync_id if tail and not tail.resync_complete else 0,
            limits=self._limits,
        )
        log.info(
            "VM %s: resuming at tap offset %d, next seq %s, epoch %s%s",
            pipe.vm.id,
            offset,
            pipe.batcher.next_seq,
            pipe.batcher.epoch,
            f", inside resync {pipe.batcher.open_resync}" if pipe.batcher.open_resync else "",
        )

    # -- the loop

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                fetched = await consumer.getmany(timeout_ms=self._poll_timeout_ms())
                await self._step(fetched)
                self._last_loop_error = None
            except KafkaError as exc:
                self._last_loop_error = str(exc)
                self.metrics.errors.labels(kind="kafka").inc()
                if isinstance(exc, KafkaUnavailable):
                    log.warning("source cluster unavailable: %s", exc)
                else:
                    log.error("receiver loop error (continuing): %s", exc)
                await asyncio.sleep(self.settings.kafka_retry_backoff_s)

    def _poll_timeout_ms(self) -> int:
        """How long the next fetch may wait: until the earliest batch is due to be cut (a
        quiet tap topic must not make it late), shortly while a cut batch waits for the
        publication before it, else `_IDLE_POLL_MS`."""
        now = time.monotonic()
        timeout = _IDLE_POLL_MS
        for pipe in self._pipes.values():
            batcher = pipe.batcher
            if batcher is None:
                continue
            if batcher.has_outbox:
                timeout = min(timeout, _WAITING_OUTBOX_POLL_MS)
            deadline = batcher.cut_deadline
            if deadline is not None:
                timeout = min(timeout, math.ceil((deadline - now) * 1000))
        return max(1, timeout)

    async def _step(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        async with self._lock:
            now = time.monotonic()
            for tp, messages in fetched.items():
                pipe = self._pipes.get(tp)
                if pipe is None or pipe.batcher is None:
                    continue  # re-read from the committed offset once the pipe is open
                size = 0
                for message in messages:
                    pipe.batcher.add_message(message.offset, message.value, now)
                    size += len(message.value or b"")
                self.metrics.tap_messages.labels(vm=pipe.vm.id).inc(len(messages))
                self.metrics.tap_bytes.labels(vm=pipe.vm.id).inc(size)
                self._report_counters(pipe)
            await self._open_pipes(
                [
                    pipe
                    for pipe in self._pipes.values()
                    if pipe.batcher is None and now >= pipe.retry_at
                ]
            )
            backlogged = []
            for pipe in self._pipes.values():
                batcher = pipe.batcher
                if batcher is None:
                    continue
                batcher.cut_due(now)
                if not pipe.may_publish():
                    # The next publication takes everything cut meanwhile. Too much
                    # waiting already: stop reading until the one in flight is sent.
                    if pipe.inflight and (
                        batcher.queued_bytes > self._max_queued_bytes
                        or batcher.queued_records > self._max_queued_records
                    ):
                        backlogged.append(pipe.inflight)
                    continue
                outbox = batcher.take_outbox()
                if outbox is not None:
                    pipe.publish(functools.partial(self._publish, pipe, batcher, outbox))
            if backlogged:
                await asyncio.wait(backlogged)
            if now >= self._next_lag_refresh:
                self._next_lag_refresh = now + self.settings.lag_refresh_s
                await self._refresh_lag()

    async def _publish(
        self,
        pipe: VmPipeline,
        batcher: VmBatcher,
        outbox: Outbox,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Encodes the outbox (in a thread, while `previous` may still be committing), then
        commits it as one transaction once `previous` has ended, unless that one failed."""
        vm_id = pipe.vm.id
        started = time.monotonic()
        encode_error: JournalError | None = None
        encoded: list[EncodedBatch] = []
        try:
            encoded = await asyncio.to_thread(self._encode, pipe.vm, outbox.batches)
        except JournalError as exc:
            encode_error = exc
        pipe.encoded()
        encoding_s = time.monotonic() - started
        if previous is not None:
            await asyncio.wait([previous])
        if pipe.batcher is not batcher:
            # The transaction before this one failed (or the VM was reopened): what this
            # one holds is read again from the committed offset.
            return
        started = time.monotonic()
        try:
            if encode_error is not None:
                raise encode_error
            await within(
                self.settings.transaction_timeout_ms / 1000,
                self._transaction(pipe, outbox, encoded),
            )
        except ProducerFenced as exc:
            # Either another receiver took the VM over, and the rebalance that tells our
            # consumer is on its way (it drops this pipe), or nobody did (the coordinator
            # fenced a transaction that outlived its timeout, say) and no rebalance comes:
            # then the VM opens again once that rebalance would have come.
            grace = self._fenced_grace_s()
            pipe.fenced = True
            pipe.batcher = None
            pipe.retry_at = time.monotonic() + grace
            pipe.last_error = f"fenced: {exc}"
            self.metrics.errors.labels(kind="fenced").inc()
            log.warning(
                "VM %s: producer fenced (%s); opening it again in %.0f s unless a rebalance "
                "hands it to another receiver first",
                vm_id,
                exc,
                grace,
            )
            await pipe.renew_producer(self._new_producer(pipe.vm))
            return
        except (KafkaError, TimeoutError, JournalError) as exc:
            kind = "encode" if isinstance(exc, JournalError) else "transaction"
            pipe.last_error = f"{kind} failed: {exc!r}"
            self.metrics.errors.labels(kind=kind).inc()
            log.error(
                "VM %s: transaction failed, nothing of it is visible; reopening: %r", vm_id, exc
            )
            # The loop reopens the pipe: a new producer aborts what is left, and reading
            # resumes at the committed offset.
            pipe.batcher = None
            pipe.retry_at = 0.0
            await pipe.renew_producer(self._new_producer(pipe.vm))
            return
        finally:
            self.metrics.transaction_seconds.observe(encoding_s + time.monotonic() - started)
        pipe.committed_offset = outbox.commit_offset
        m = self.metrics
        for item in encoded:
            cut, batch = item.cut, item.batch
            pipe.last_committed_seq = batch.last_seq
            m.batches.labels(vm=vm_id).inc()
            m.batch_bytes.labels(vm=vm_id).inc(sum(len(c) for c in item.chunks))
            m.records_in.labels(vm=vm_id).inc(len(cut.records))
            m.records_out.labels(vm=vm_id).inc(len(batch.records))
            m.data_in.labels(vm=vm_id).inc(cut.data_bytes)
            m.data_out.labels(vm=vm_id).inc(
                sum(r.length for r in batch.records if r.kind in DATA_KINDS)
            )
            m.payload.labels(vm=vm_id).inc(item.payload_bytes)
        self._update_ratios(vm_id)
        for event in outbox.events:
            m.status_events.labels(type=type(event).__name__).inc()

    def _encode(self, vm: ProtectedVM, batches: Sequence[CutBatch]) -> list[EncodedBatch]:
        settings = self.settings
        limit = vm.journal.max_message_bytes - _MESSAGE_OVERHEAD
        encoded = []
        for cut in batches:
            if settings.fold:
                batch = cut.folded(max_record_bytes=settings.max_record_bytes)
            else:
                batch = cut.unfolded()
            chunks = encode_batch(
                batch,
                max_message_bytes=limit,
                compress=settings.compress,
                level=settings.compression_level,
            )
            # Every chunk header carries the uncompressed payload's length.
            payload = peek_header(chunks[0]).payload_len
            encoded.append(EncodedBatch(cut, batch, chunks, payload))
        return encoded

    async def _transaction(
        self, pipe: VmPipeline, outbox: Outbox, encoded: list[EncodedBatch]
    ) -> None:
        producer = pipe.producer
        # The commit waits for every record sent here and fails, with that record's
        # error, if any failed: no delivery needs awaiting here.
        async with producer.transaction():
            for item in encoded:
                for chunk in item.chunks:
                    await producer.send(pipe.batch_topic, chunk, partition=0)
            for event in outbox.events:
                for message in outgoing_for(
                    event,
                    instance=self._instance,
                    tap_topic=pipe.partition.topic,
                    deadletter_topic=pipe.deadletter_topic,
                    status_topic=topic_name(Stream.STATUS),
                ):
                    await producer.send(
                        message.topic, message.value, message.key, headers=message.headers
                    )
            producer.send_offsets_to_transaction(
                {pipe.partition: outbox.commit_offset}, self.settings.group_id
            )

    def _report_counters(self, pipe: VmPipeline) -> None:
        assert pipe.batcher is not None
        counters = pipe.batcher.counters
        m = self.metrics
        for name, metric in (
            ("duplicates_skipped", m.duplicates),
            ("gaps", m.gaps),
            ("quarantined", m.quarantined),
        ):
            value = getattr(counters, name)
            delta = value - pipe.reported.get(name, 0)
            if delta > 0:
                metric.labels(vm=pipe.vm.id).inc(delta)
                pipe.reported[name] = value

    def _update_ratios(self, vm_id: str) -> None:
        m = self.metrics
        data_in = m.data_in.labels(vm=vm_id)._value.get()
        data_out = m.data_out.labels(vm=vm_id)._value.get()
        payload = m.payload.labels(vm=vm_id)._value.get()
        out = m.batch_bytes.labels(vm=vm_id)._value.get()
        if data_in:
            m.fold_ratio.labels(vm=vm_id).set(data_out / data_in)
        if payload:
            m.compression_ratio.labels(vm=vm_id).set(out / payload)

    async def _refresh_lag(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._pipes:
            return
        try:
            ends = await consumer.end_offsets(list(self._pipes))
        except KafkaError as exc:
            log.debug("lag refresh failed: %s", exc)
            return
        now_ns = time.time_ns()
        for tp, pipe in self._pipes.items():
            end = ends.get(tp)
            pipe.log_end = end
            if end is not None and pipe.committed_offset is not None:
                self.metrics.lag_messages.labels(vm=pipe.vm.id).set(
                    max(0, end - pipe.committed_offset)
                )
            oldest = pipe.batcher.oldest_pending_ts_ns if pipe.batcher else None
            self.metrics.lag_seconds.labels(vm=pipe.vm.id).set(
                0.0 if oldest is None else max(0.0, (now_ns - oldest) / 1e9)
            )


async def _settle(
    tasks: Iterable[asyncio.Task[None] | None], *, timeout_s: float | None = None
) -> None:
    """Waits for publishing tasks to end (each is bounded by the transaction timeout);
    after ``timeout_s`` the rest are cancelled: their transactions never commit."""
    pending = [task for task in tasks if task is not None and not task.done()]
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=timeout_s)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)


def _counters(batcher: VmBatcher | None) -> dict[str, int] | None:
    if batcher is None:
        return None
    return dataclasses.asdict(batcher.counters)
