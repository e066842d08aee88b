"""Where VMs' batch topics end: the header of each one's last committed batch.

A receiver that takes over a VM (start, restart, rebalance) learns from it the next
sequence number it owes, the epoch, and whether a resync bracket is still open. Reading
the header is enough: every chunk repeats its batch's fields, and all chunks of a batch
commit in one transaction, so the last committed chunk belongs to a complete batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from aiokafka.structs import TopicPartition

from datapath.journal import ChunkHeader, JournalError, peek_header
from datapath.kafka import Consumer, KafkaUnavailable

log = logging.getLogger(__name__)

_FIRST_WINDOW = 8


async def read_batch_tails(
    consumer: Consumer, partitions: Iterable[TopicPartition], *, timeout_s: float = 30.0
) -> dict[TopicPartition, ChunkHeader | None]:
    """The header of the last committed chunk of each partition (None when it has none).

    ``consumer`` must be read_committed, in no group, and used by nobody else meanwhile:
    it is (re)assigned here. All partitions are read together, from a small window before
    their end, widened only where that window holds no readable chunk (aborted
    transactions only).
    """
    wanted = list(partitions)
    result: dict[TopicPartition, ChunkHeader | None] = {tp: None for tp in wanted}
    if not wanted:
        return result
    consumer.assign(wanted)
    begins = await consumer.beginning_offsets(wanted)
    ends = await consumer.end_offsets(wanted)
    deadline = time.monotonic() + timeout_s
    window = _FIRST_WINDOW
    todo = {tp: ends[tp] for tp in wanted if ends[tp] > begins[tp]}
    while todo:
        starts = {tp: max(begins[tp], end - window) for tp, end in todo.items()}
        consumer.assign(list(todo))
        for tp, start in starts.items():
            consumer.seek(tp, start)
        values: dict[TopicPartition, list[tuple[int, bytes]]] = {tp: [] for tp in todo}
        reading = set(todo)
        while reading:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"reading the tails of {len(todo)} batch topics took over {timeout_s:.0f}s"
                )
            fetched = await consumer.getmany(*reading, timeout_ms=200)
            for tp, messages in fetched.items():
                values[tp].extend((m.offset, m.value) for m in messages if m.offset < todo[tp])
            reading = {tp for tp in reading if await consumer.position(tp) < todo[tp]}
        unresolved = {}
        for tp, found in values.items():
            header = _last_header(tp, found)
            if header is not None:
                result[tp] = header
            elif starts[tp] > begins[tp]:
                # Only aborted transactions or unreadable chunks there: look further back.
                unresolved[tp] = starts[tp]
        todo = unresolved
        window *= 4
    return result


def _last_header(tp: TopicPartition, values: list[tuple[int, bytes]]) -> ChunkHeader | None:
    for offset, value in reversed(values):
        try:
            return peek_header(value)
        except JournalError as exc:
            log.error(
                "%s offset %d is not a readable batch chunk (%s); looking further back",
                tp.topic,
                offset,
                exc,
            )
    return None
