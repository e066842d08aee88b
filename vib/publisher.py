"""Publishing one VM's sequenced records: frames, linger, acknowledgements.

A `PublishSession` lives from the moment the tap reaches the VM's tap topic until the
first failure (or a clean stop). Records are appended synchronously by the write path
(in sequence order); one sender task cuts them into frames bounded by `frame_max_bytes`
after at most `linger_s`, encodes each frame once and hands it to the sink (an idempotent
producer, acks=all). Kafka acknowledges in order on the single partition, so the
session's `acked_seq` only moves forward and "acknowledged" always means a prefix.

On a failure the session stops at once and gives back every record not acknowledged,
so the tap can mark their regions dirty: whether they reached Kafka is unknown, and the
resync that follows makes the question moot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from datapath.journal import RANGE_KINDS, RECORD_HEADER_SIZE, Record, encode_frame

log = logging.getLogger(__name__)


class FrameSink(Protocol):
    """Where frames go: the VM's tap topic."""

    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        """Queues a frame; the returned future completes when Kafka acknowledged it."""


class SessionFailed(Exception):
    """Why a session stopped publishing (the cause is chained)."""


Region = tuple[int, int, int]  # disk, offset, length


class _Sent:
    __slots__ = ("done", "first_gen", "last_seq", "regions", "sent_at", "size")

    def __init__(self, records: list[Record], size: int, first_gen: int) -> None:
        # Only the regions are kept (not the data): enough to mark them dirty.
        changing = RANGE_KINDS
        self.regions: list[Region] = [
            (r.disk, r.offset, r.length) for r in records if r.kind in changing
        ]
        self.size = size
        self.last_seq = records[-1].seq
        self.first_gen = first_gen
        self.sent_at = time.monotonic()
        self.done = False


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class PublishSession:
    """One producer session of one VM.

    `append` takes a record, its encoded size and the local generation of the guest
    write it carries (0 for records that carry none: markers, flushes, resync data).
    `on_acked(seq)` runs when everything up to `seq` is acknowledged; `on_failed(exc)`
    runs once when the session stops publishing because of an error.
    """

    def __init__(
        self,
        sink: FrameSink,
        *,
        vm_id: str,
        epoch: int,
        frame_max_bytes: int,
        linger_s: float,
        on_acked: Callable[[int], None],
        on_failed: Callable[[BaseException], None],
        on_frame: Callable[[int, float], None] | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.epoch = epoch
        self._sink = sink
        self._frame_max = frame_max_bytes
        self._linger = linger_s
        self._on_acked = on_acked
        self._on_failed = on_failed
        self._on_frame = on_frame
        self._pending: list[Record] = []
        self._gens: list[int] = []
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._inflight: deque[_Sent] = deque()
        self._inflight_bytes = 0
        self._wake = asyncio.Event()
        self._full: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.active = True
        self.acked_seq = 0
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"publish-{self.vm_id}")

    # -- the write path's side ------------------------------------------------------------

    def append(self, record: Record, size: int, gen: int = 0) -> None:
        pending = self._pending
        if not pending:
            self._pending_since = time.monotonic()
            self._wake.set()
        pending.append(record)
        self._gens.append(gen)
        self._pending_bytes += size
        if self._pending_bytes >= self._frame_max:
            full = self._full
            if full is not None and not full.done():
                full.set_result(None)

    def discard_from(self, seq: int) -> int | None:
        """Drops the records numbered `seq` or later that are not framed yet (none has
        left the tap); returns the first dropped number, None if none was dropped.

        For records whose content travels again anyway (an abandoned resync bracket's):
        the caller numbers its next record with the returned number, so the sequence
        stays gapless."""
        pending = self._pending
        cut = len(pending)
        while cut and pending[cut - 1].seq >= seq:
            cut -= 1
        if cut == len(pending):
            return None
        first = pending[cut].seq
        self._pending_bytes -= sum(RECORD_HEADER_SIZE + len(r.data) for r in pending[cut:])
        del pending[cut:]
        del self._gens[cut:]
        return first

    @property
    def buffered_bytes(self) -> int:
        return self._pending_bytes + self._inflight_bytes

    def oldest_unacked_gen(self) -> int:
        """The local generation of the oldest guest write not acknowledged (0: none)."""
        for sent in self._inflight:
            if sent.first_gen:
                return sent.first_gen
        for gen in self._gens:
            if gen:
                return gen
        return 0

    def oldest_unacked_age(self) -> float:
        if self._inflight:
            return time.monotonic() - self._inflight[0].sent_at
        if self._pending:
            return time.monotonic() - self._pending_since
        return 0.0

    def unacked_regions(self) -> Iterator[Region]:
        """(disk, offset, length) of every data-changing record not acknowledged."""
        for sent in self._inflight:
            yield from sent.regions
        changing = RANGE_KINDS
        for record in self._pending:
            if record.kind in changing:
                yield record.disk, record.offset, record.length

    # -- sending ------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.active:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self._pending_bytes < self._frame_max and self._linger > 0:
                    full = self._full = loop.create_future()
                    handle = loop.call_later(self._linger, _resolve, full)
                    try:
                        await full
                    finally:
                        handle.cancel()
                        self._full = None
                while self._pending and self.active:
                    await self._send_one()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(exc)

    def _take_frame(self) -> tuple[list[Record], list[int], int]:
        pending = self._pending
        if self._pending_bytes <= self._frame_max:
            records, gens, size = pending, self._gens, self._pending_bytes
            self._pending, self._gens, self._pending_bytes = [], [], 0
            return records, gens, size
        size = 0
        count = 0
        limit = self._frame_max
        for record in pending:
            record_size = RECORD_HEADER_SIZE + len(record.data)
            if count and size + record_size > limit:
                break
            size += record_size
            count += 1
        records, gens = pending[:count], self._gens[:count]
        del pending[:count]
        del self._gens[:count]
        self._pending_bytes -= size
        self._pending_since = time.monotonic()
        return records, gens, size

    async def _send_one(self) -> None:
        records, gens, size = self._take_frame()
        first_gen = next((g for g in gens if g), 0)
        sent = _Sent(records, size, first_gen)
        # Accounted before the send so that a failure below still gives these records back.
        self._inflight.append(sent)
        self._inflight_bytes += size
        frame = encode_frame(self.vm_id, self.epoch, records)
        fut = await self._sink.send(frame)
        fut.add_done_callback(lambda f: self._sent_done(sent, f))

    def _sent_done(self, sent: _Sent, fut: asyncio.Future[Any]) -> None:
        exc = SessionFailed("a frame's send was cancelled") if fut.cancelled() else fut.exception()
        if not self.active:
            return
        if exc is not None:
            self.fail(exc)
            return
        sent.done = True
        inflight = self._inflight
        acked = self.acked_seq
        now = time.monotonic()
        while inflight and inflight[0].done:
            head = inflight.popleft()
            self._inflight_bytes -= head.size
            acked = head.last_seq
            if self._on_frame is not None:
                self._on_frame(head.size, now - head.sent_at)
        if acked != self.acked_seq:
            self.acked_seq = acked
            self._on_acked(acked)

    # -- ending ---------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Stops publishing (idempotent); `on_failed` runs once."""
        if not self.active:
            return
        self.active = False
        self.failure = exc
        self._wake.set()
        full = self._full
        if full is not None and not full.done():
            full.set_result(None)
        self._on_failed(exc)

    def all_acked(self) -> bool:
        return not self._pending and not self._inflight

    async def close(self) -> None:
        self.active = False
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
