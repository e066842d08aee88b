"""The VM's tap topic on the source cluster: where the tap continues, and where it writes.

`TapTopic.connect()` (one call per producer session) makes sure the topic exists, reads
the sequence number of the last frame in it (the sequence continues from there: with
an idempotent producer a frame is either wholly in the topic or not at all) and starts
an idempotent producer (acks=all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka.structs import TopicPartition

from datapath.journal import JournalError, peek_frame_header
from datapath.kafka import (
    REQUEST_SLACK,
    Admin,
    Consumer,
    KafkaClusterSettings,
    KafkaError,
    KafkaUnavailable,
    Producer,
)
from datapath.protection import ProtectedVM
from datapath.topics import Stream, topic_name, vm_topic_specs

log = logging.getLogger(__name__)

# A frame header is tiny, but the consumer fetches whole record batches: room for one frame.
_TAIL_FETCH_BYTES = 16 * 1024 * 1024


class TopicSession:
    """An idempotent producer on the tap topic, for one publishing session, and where the
    topic ended when it started: the last sequence number and the epoch of its last frame
    (0 and 0 for an empty topic)."""

    def __init__(self, producer: Producer, topic: str, last_seq: int, last_epoch: int) -> None:
        self._producer = producer
        self.topic = topic
        self.last_seq = last_seq
        self.last_epoch = last_epoch

    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        delivery = await self._producer.send(self.topic, frame, partition=0)
        return delivery.future

    async def close(self, grace_s: float) -> None:
        """Stops the producer after sending what is queued; aborts after `grace_s`."""
        try:
            async with asyncio.timeout(grace_s):
                await self._producer.stop()
        except TimeoutError:
            log.warning(
                "producer on %s did not stop within %.0fs; aborting it", self.topic, grace_s
            )
            await self.abort()
        except KafkaError as exc:  # a dead cluster's producer may fail to stop: it is gone anyway
            log.info("producer on %s stopped with an error: %s", self.topic, exc)
            await self.abort()

    async def abort(self) -> None:
        """Drops the producer at once: queued frames are never sent, retries stop."""
        await self._producer.abort()


class TapTopic:
    def __init__(
        self,
        cluster: KafkaClusterSettings,
        vm: ProtectedVM,
        *,
        create: bool = True,
        request_timeout_s: float = 15.0,
        max_request_size: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.vm = vm
        self.topic = topic_name(Stream.TAP, vm.id)
        self._create = create
        self._timeout_ms = int(request_timeout_s * 1000)
        self._max_request_size = max_request_size or vm.journal.max_message_bytes + REQUEST_SLACK
        # The producer packs several frames into one record batch, and the topic's
        # max.message.bytes bounds the whole batch: leave room for the batch's own header.
        self._max_batch_size = vm.journal.max_message_bytes - REQUEST_SLACK
        self._topic_ready = False

    async def ensure_topic(self) -> None:
        """Creates the VM's topics on the source cluster if missing (as every service does
        for the VMs it serves until the control plane creates them; see
        datapath.provisioning): the tap topic and the VM's other per-VM topics."""
        if self._topic_ready or not self._create:
            return
        journal = self.vm.journal
        specs = vm_topic_specs(
            self.vm.id,
            replication_factor=journal.replication_factor,
            retention_ms=journal.retention_ms,
            max_message_bytes=journal.max_message_bytes,
        )
        async with Admin(self.cluster, request_timeout_ms=self._timeout_ms) as admin:
            await admin.create_topics(specs)
        self._topic_ready = True

    async def tail(self) -> tuple[int, int] | None:
        """The last sequence number in the topic and the epoch of the frame holding it;
        None when it holds no frame at all."""
        tp = TopicPartition(self.topic, 0)
        consumer = Consumer(
            self.cluster,
            request_timeout_ms=self._timeout_ms,
            max_partition_fetch_bytes=_TAIL_FETCH_BYTES,
            fetch_max_bytes=_TAIL_FETCH_BYTES,
            fetch_max_wait_ms=50,
        )
        async with consumer:
            consumer.assign([tp])
            start = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            if end <= start:
                return None
            consumer.seek(tp, end - 1)
            deadline = asyncio.get_running_loop().time() + self._timeout_ms / 1000
            while asyncio.get_running_loop().time() < deadline:
                batches = await consumer.getmany(tp, timeout_ms=500)
                messages = batches.get(tp, [])
                if messages:
                    last = messages[-1]
                    try:
                        header = peek_frame_header(last.value)
                        return header.last_seq, header.epoch
                    except JournalError as exc:
                        raise JournalError(
                            f"the last message of {self.topic} (offset {last.offset}) is not "
                            f"a valid frame: {exc}"
                        ) from exc
        raise KafkaUnavailable(f"could not read the last frame of {self.topic}")

    async def connect(self) -> TopicSession:
        await self.ensure_topic()
        tail = await self.tail()
        producer = Producer(
            self.cluster,
            linger_ms=0,  # the tap gathers frames itself
            max_request_size=self._max_request_size,
            max_batch_size=self._max_batch_size,
            request_timeout_ms=self._timeout_ms,
            client_id=f"{self.cluster.client_id}-tap-{self.vm.id}",
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(KafkaError):
                await producer.stop()
            raise
        last_seq, last_epoch = tail or (0, 0)
        return TopicSession(producer, self.topic, last_seq, last_epoch)
