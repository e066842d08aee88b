"""The publishing session's bookkeeping (vib.publisher), without Kafka: unit tests."""

from __future__ import annotations

import asyncio
from typing import Any

from datapath.journal import RECORD_HEADER_SIZE, RecordKind, decode_frame
from datapath.kafka import KafkaUnavailable
from vib.producer_child import Acks
from vib.publisher import PublishSession


class NeverSink:
    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        raise AssertionError("nothing is framed in these tests")


def write(session: PublishSession, seq: int, size: int = 4096) -> None:
    session.append(RecordKind.WRITE, seq, 0, seq * size, size, bytes(size), gen=seq)


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
        write(session, seq)
    assert session.discard_from(20) is None
    assert session.discard_from(6) == 6
    assert session.buffered_bytes == 5 * (RECORD_HEADER_SIZE + 4096)
    assert [offset for _, offset, _ in session.unacked_regions()] == [s * 4096 for s in range(1, 6)]
    assert session.oldest_unacked_gen() == 1
    assert session.discard_from(1) == 1
    assert session.buffered_bytes == 0
    assert session.oldest_unacked_gen() == 0


class RecordingSink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        self.frames.append(frame)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


def recording_session(sink: RecordingSink, acked: list[int], *, epoch: int = 1) -> PublishSession:
    return PublishSession(
        sink,
        vm_id="vm",
        epoch=epoch,
        frame_max_bytes=64 << 10,  # data of 16 KiB or more is kept, not copied
        linger_s=0.001,
        on_acked=acked.append,
        on_failed=lambda exc: None,
    )


async def publish_until_acked(session: PublishSession, acked: list[int], last: int) -> None:
    session.start()
    for _ in range(200):
        if acked and acked[-1] == last:
            break
        await asyncio.sleep(0.01)
    await session.close()
    assert acked and acked[-1] == last


async def test_records_are_framed_in_order_within_the_frame_bound_after_a_discard() -> None:
    sink = RecordingSink()
    acked: list[int] = []
    frame_max = 64 << 10
    session = recording_session(sink, acked, epoch=3)
    for seq in range(1, 41):  # several chunks: 15 records of 4 KiB fit one
        write(session, seq)
    # Back to 10 across chunk boundaries: the rest is numbered on from there.
    assert session.discard_from(10) == 10
    assert session.buffered_bytes == 9 * (RECORD_HEADER_SIZE + 4096)
    assert len(list(session.unacked_regions())) == 9
    session.append(RecordKind.FLUSH, 10, 0, 0, 0)
    for seq in range(11, 31):
        write(session, seq)
    await publish_until_acked(session, acked, 30)
    frames = [decode_frame(frame) for frame in sink.frames]
    records = [record for frame in frames for record in frame.records]
    assert [record.seq for record in records] == list(range(1, 31))
    assert records[9].kind is RecordKind.FLUSH
    assert all(bytes(r.data) == bytes(4096) for r in records if r.kind is RecordKind.WRITE)
    assert all(frame.epoch == 3 for frame in frames)
    assert max(len(frame) for frame in sink.frames) <= frame_max + 300
    assert len(frames) >= 2 and session.all_acked() and session.oldest_unacked_gen() == 0


async def test_a_large_record_travels_alone_in_its_frame_in_order() -> None:
    sink = RecordingSink()
    acked: list[int] = []
    session = recording_session(sink, acked)
    large = bytes(range(256)) * 80
    write(session, 1)
    session.append(RecordKind.WRITE, 2, 0, 0, len(large), large, gen=2)
    write(session, 3)
    # Dropping a kept record gives its chunk back; one kept before stays alone.
    session.append(RecordKind.WRITE, 4, 0, 0, len(large), large, gen=4)
    assert session.discard_from(4) == 4
    assert session.discard_from(3) == 3
    write(session, 3)
    assert session.buffered_bytes == 2 * (RECORD_HEADER_SIZE + 4096) + RECORD_HEADER_SIZE + (
        20 << 10
    )
    await publish_until_acked(session, acked, 3)
    frames = [decode_frame(frame) for frame in sink.frames]
    assert [[r.seq for r in frame.records] for frame in frames] == [[1], [2], [3]]
    assert bytes(frames[1].records[0].data) == large


async def test_the_child_producer_never_counts_a_frame_after_a_failed_one() -> None:
    # The parent maps the child's acknowledgement count onto its oldest frames: a frame
    # acknowledged after a failed one must not make the failed one look acknowledged.
    lines: list[dict[str, object]] = []

    class Lines:
        def send_line(self, message: dict[str, object]) -> None:
            lines.append(message)

    acks = Acks(Lines())  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    first, failed, later = (loop.create_future() for _ in range(3))
    first.set_result(None)
    failed.set_exception(KafkaUnavailable("message timed out"))
    later.set_result(None)
    for fut in (first, failed, later):
        acks.done(fut)
    await asyncio.sleep(0)
    assert lines == [{"acked": 1}]
    assert acks.failed.done()
