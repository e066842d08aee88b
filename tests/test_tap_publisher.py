"""The publishing session's bookkeeping (vib.publisher), without Kafka: unit tests."""

from __future__ import annotations

import asyncio
from typing import Any

from datapath.journal import RECORD_HEADER_SIZE, Record, RecordKind
from vib.publisher import PublishSession


class NeverSink:
    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        raise AssertionError("nothing is framed in these tests")


def write(seq: int, size: int = 4096) -> Record:
    return Record(RecordKind.WRITE, seq, 0, seq * size, size, 0, bytes(size))


async def test_records_not_framed_yet_can_be_dropped_from_a_number_on() -> None:
    session = PublishSession(
        NeverSink(),
        vm_id="vm",
        epoch=1,
        frame_max_bytes=1 << 20,
        linger_s=0.005,
        on_acked=lambda seq: None,
        on_failed=lambda exc: None,
    )
    for seq in range(1, 11):
        session.append(write(seq), RECORD_HEADER_SIZE + 4096, gen=seq)
    assert session.discard_from(20) is None
    assert session.discard_from(6) == 6
    assert session.buffered_bytes == 5 * (RECORD_HEADER_SIZE + 4096)
    assert [offset for _, offset, _ in session.unacked_regions()] == [s * 4096 for s in range(1, 6)]
    assert session.oldest_unacked_gen() == 1
    assert session.discard_from(1) == 1
    assert session.buffered_bytes == 0
    assert session.oldest_unacked_gen() == 0
