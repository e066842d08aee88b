"""Publishing one VM's sequenced records: frames, linger, acknowledgements.

A `PublishSession` lives from the moment the tap reaches the VM's tap topic until the
first failure (or a clean stop). Records are appended synchronously by the write path
(in sequence order), encoded as they come; one sender task cuts them into frames bounded
by `frame_max_bytes` after at most `linger_s` and hands each to the sink (an idempotent
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
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from datapath.journal import (
    RANGE_KINDS,
    RECORD_HEADER_SIZE,
    MarkerKind,
    RecordKind,
    encode_frame_body,
    encode_record_header,
)

log = logging.getLogger(__name__)

# What the session keeps of each record beside its encoded bytes: seq, local generation,
# offset, length, encoded size, disk, kind. vib/_fast_writes.c appends the same layout.
META = struct.Struct("<QQQQIHBx")
_META_SIZE = META.size
_unpack_meta = META.unpack_from
_pack_meta = META.pack


class FrameSink(Protocol):
    """Where frames go: the VM's tap topic."""

    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        """Queues a frame; the returned future completes when Kafka acknowledged it."""


class SessionFailed(Exception):
    """Why a session stopped publishing (the cause is chained)."""


Region = tuple[int, int, int]  # disk, offset, length


def _regions(meta: bytes | bytearray) -> Iterator[Region]:
    changing = RANGE_KINDS
    for _seq, _gen, offset, length, _size, disk, kind in META.iter_unpack(meta):
        if kind in changing:
            yield disk, offset, length


def _first_gen(meta: bytes | bytearray) -> int:
    for entry in META.iter_unpack(meta):
        if entry[1]:
            return int(entry[1])
    return 0


class _Sent:
    __slots__ = ("_first_gen", "done", "last_seq", "meta", "sent_at", "size")

    def __init__(self, meta: bytes | bytearray, size: int, last_seq: int) -> None:
        # Only the metadata is kept (not the data): enough to mark the regions dirty.
        self.meta = meta
        self.size = size
        self.last_seq = last_seq
        self._first_gen = -1
        self.sent_at = time.monotonic()
        self.done = False

    @property
    def first_gen(self) -> int:
        if self._first_gen < 0:
            self._first_gen = _first_gen(self.meta)
        return self._first_gen


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Chunk:
    """The records of one frame to be: encoded back to back in `body[:used]` (a
    record's header, then its data), one META entry each in `meta`.

    `body` has a fixed capacity, a frame's bound plus one record header: writers append
    while the next record fits (the C write path too), and the session starts the next
    chunk when it does not. A large record's data is not copied in: it is kept as
    `external`, alone in a chunk whose body is the record's header."""

    __slots__ = ("body", "external", "meta", "used")

    def __init__(self, body: bytearray) -> None:
        self.body = body
        self.used = 0
        self.meta = bytearray()
        self.external: bytes | bytearray | memoryview = b""

    @property
    def size(self) -> int:
        """Bytes of its records."""
        external = self.external
        return self.used + (external.nbytes if type(external) is memoryview else len(external))


# Emptied chunk bodies kept for reuse: a fresh one is zero-filled, page by page.
_SPARE_BODIES = 8


class PublishSession:
    """One producer session of one VM.

    Records are encoded as they are appended, into chunks of one frame each (`chunk` is
    the one being filled); the sender takes the oldest chunk, puts a frame header before
    its records and recycles its memory.

    `append` encodes one record (with the local generation of the guest write it carries;
    0 for records that carry none: markers, flushes, resync data); the tap's C write path
    writes into `chunk` itself, then calls `appended`. `on_acked(seq)` runs when
    everything up to `seq` is acknowledged; `on_failed(exc)` runs once when the session
    stops publishing because of an error.
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
        # Records not framed yet, oldest chunk first; the last one is `chunk`.
        self._capacity = frame_max_bytes + RECORD_HEADER_SIZE
        # Data this large travels in a frame of its own rather than being copied.
        self._external_min = max(1, frame_max_bytes // 4)
        self._spare: list[bytearray] = []
        self.chunk = Chunk(bytearray(self._capacity))
        self._chunks: deque[Chunk] = deque([self.chunk])
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

    def append(
        self,
        kind: RecordKind,
        seq: int,
        disk: int,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview = b"",
        marker: MarkerKind | None = None,
        marker_id: int = 0,
        *,
        gen: int = 0,
    ) -> None:
        """Encodes one record (timestamped now) after the others."""
        header = encode_record_header(
            kind, seq, disk, offset, length, time.time_ns(), data, marker, marker_id
        )
        data_len = data.nbytes if type(data) is memoryview else len(data)
        size = len(header) + data_len
        meta = _pack_meta(seq, gen, offset, length, size, disk, kind)
        chunk = self.chunk
        if data_len >= self._external_min:
            self._append_kept(header, data, meta)
        else:
            if chunk.used + size > self._frame_max and chunk.used:
                chunk = self._next_chunk()
            start = chunk.used
            data_start = start + len(header)
            body = chunk.body
            body[start:data_start] = header
            if data_len:
                body[data_start : start + size] = data
            chunk.used = start + size
            chunk.meta += meta
        self.appended(size)

    def _append_kept(
        self, header: bytes, data: bytes | bytearray | memoryview, meta: bytes
    ) -> None:
        """A large record in a chunk of its own, its data kept rather than copied; the
        chunk being filled, if still empty, moves after it."""
        kept = Chunk(bytearray(header))
        kept.used = len(header)
        kept.external = data
        kept.meta += meta
        chunks = self._chunks
        if self.chunk.used:
            chunks.append(kept)
            self._next_chunk()
        else:
            chunks.insert(len(chunks) - 1, kept)

    def _next_chunk(self) -> Chunk:
        body = self._spare.pop() if self._spare else bytearray(self._capacity)
        chunk = self.chunk = Chunk(body)
        self._chunks.append(chunk)
        return chunk

    def appended(self, size: int) -> None:
        """`size` more bytes of records are in `chunk` (by `append` or the C path)."""
        if not self._pending_bytes:
            self._pending_since = time.monotonic()
            self._wake.set()
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
        first: int | None = None
        chunks = self._chunks
        while chunks:
            chunk = chunks[-1]
            meta = chunk.meta
            while meta and (entry := _unpack_meta(meta, len(meta) - _META_SIZE))[0] >= seq:
                first = entry[0]
                self._pending_bytes -= entry[4]
                if chunk.external:  # its one record
                    chunk.used, chunk.external = 0, b""
                else:
                    chunk.used -= entry[4]
                del meta[len(meta) - _META_SIZE :]
            if meta:
                break
            chunks.pop()
            self._recycle(chunk)
        if not chunks or chunks[-1].external:  # a kept record's chunk takes nothing more
            self._next_chunk()
        else:
            self.chunk = chunks[-1]
        return first

    def _recycle(self, chunk: Chunk) -> None:
        if len(self._spare) < _SPARE_BODIES and len(chunk.body) == self._capacity:
            self._spare.append(chunk.body)

    @property
    def buffered_bytes(self) -> int:
        return self._pending_bytes + self._inflight_bytes

    def oldest_unacked_gen(self) -> int:
        """The local generation of the oldest guest write not acknowledged (0: none)."""
        for sent in self._inflight:
            if sent.first_gen:
                return sent.first_gen
        for chunk in self._chunks:
            gen = _first_gen(chunk.meta)
            if gen:
                return gen
        return 0

    def oldest_unacked_age(self) -> float:
        if self._inflight:
            return time.monotonic() - self._inflight[0].sent_at
        if self._pending_bytes:
            return time.monotonic() - self._pending_since
        return 0.0

    def unacked_regions(self) -> Iterator[Region]:
        """(disk, offset, length) of every data-changing record not acknowledged."""
        for sent in self._inflight:
            yield from _regions(sent.meta)
        for chunk in self._chunks:
            yield from _regions(chunk.meta)

    # -- sending ------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.active:
                if not self._pending_bytes:
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
                while self._pending_bytes and self.active:
                    await self._send_one()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(exc)

    def _take_chunk(self) -> Chunk:
        """The oldest chunk, out of the pending records (a new one is started when it
        was the one being filled)."""
        chunk = self._chunks.popleft()
        if not self._chunks:
            self._next_chunk()
        self._pending_bytes -= chunk.size
        if self._pending_bytes:
            self._pending_since = time.monotonic()
        return chunk

    async def _send_one(self) -> None:
        chunk = self._take_chunk()
        meta, size = chunk.meta, chunk.size
        first_seq = _unpack_meta(meta, 0)[0]
        last_seq = _unpack_meta(meta, len(meta) - _META_SIZE)[0]
        sent = _Sent(meta, size, last_seq)
        # Accounted before the send so that a failure below still gives these records back.
        self._inflight.append(sent)
        self._inflight_bytes += size
        count = len(meta) // _META_SIZE
        with memoryview(chunk.body) as view, view[: chunk.used] as records:
            frame = encode_frame_body(
                self.vm_id, self.epoch, first_seq, last_seq, count, records, chunk.external
            )
        self._recycle(chunk)
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
        return not self._pending_bytes and not self._inflight

    async def close(self) -> None:
        self.active = False
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
