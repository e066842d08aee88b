"""`python -m vib.producer_child FD PARENT_PID`: the producer of one publishing session.

Started by `vib.producer_process`; see there for the protocol. It reaches the tap topic
(creating it if asked), reports the last sequence number in it, then sends every frame
it receives, in order, and reports acknowledgements. It exits when its parent asks
(after flushing), when its parent goes away, or on the first Kafka error it reports.

Frames are received straight into their own buffers (a buffered protocol), with no
intermediate stream buffer: each byte is copied once by the kernel, once into the bytes
the Kafka client takes, then by librdkafka.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, cast

import uvloop

from datapath.journal import JournalError
from datapath.kafka import KafkaClusterSettings, KafkaError, KafkaFatal
from datapath.malloc_tuning import tune_malloc
from datapath.protection import ProtectedVM
from vib.producer_process import FRAME_LENGTH
from vib.tap_topic import TapTopic, TopicSession

log = logging.getLogger("vib.producer_child")

PR_SET_PDEATHSIG = 1
# Frames received but not yet handed to the producer before reading pauses.
_QUEUE_HIGH = 32 * 1024 * 1024


def die_with_parent(parent_pid: int) -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


class FrameReceiver(asyncio.BufferedProtocol):
    """Length-prefixed messages from the parent, each received into its own bytearray.

    The first message is the configuration; a zero length means "finish"; the end of
    the stream means the parent is gone."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._header = bytearray(FRAME_LENGTH.size)
        self._target: bytearray = self._header
        self._filled = 0
        self._in_header = True
        self.messages: collections.deque[bytearray | None] = collections.deque()
        self.queued_bytes = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._target)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < len(self._target):
            return
        if self._in_header:
            (length,) = FRAME_LENGTH.unpack(self._header)
            if length == 0:
                self._deliver(None)
                self._target, self._filled = self._header, 0
                return
            self._target, self._filled, self._in_header = bytearray(length), 0, False
            return
        self._deliver(self._target)
        self._target, self._filled, self._in_header = self._header, 0, True

    def _deliver(self, message: bytearray | None) -> None:
        self.messages.append(message)
        if message is not None:
            self.queued_bytes += len(message)
            if self.queued_bytes > _QUEUE_HIGH and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    async def next(self) -> bytearray | None:
        """The next message; None for "finish"; EOFError when the parent is gone."""
        while not self.messages:
            if self.closed:
                raise EOFError
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        message = self.messages.popleft()
        if message is not None:
            self.queued_bytes -= len(message)
            if self._paused and self.queued_bytes < _QUEUE_HIGH // 2 and self.transport:
                self._paused = False
                self.transport.resume_reading()
        return message

    def send_line(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(message).encode() + b"\n")


class Acks:
    """Counts acknowledged frames (they complete in order) and reports them in batches."""

    def __init__(self, receiver: FrameReceiver) -> None:
        self._receiver = receiver
        self.count = 0
        self.failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._scheduled = False

    def done(self, fut: asyncio.Future[Any]) -> None:
        if self.failed.done():
            # A frame after a failed one: counting it would tell the parent, which maps
            # the count onto its oldest frames, that the failed one was acknowledged.
            return
        if fut.cancelled():
            self.fail(KafkaError("a send was cancelled"))
            return
        exc = fut.exception()
        if exc is not None:
            self.fail(exc)
            return
        self.count += 1
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.report)

    def report(self) -> None:
        self._scheduled = False
        self._receiver.send_line({"acked": self.count})

    def fail(self, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_result(exc)


async def serve(receiver: FrameReceiver) -> int:
    raw = await receiver.next()
    if raw is None:
        return 0
    config = json.loads(raw)
    cluster = KafkaClusterSettings.model_validate(config["cluster"])
    vm = ProtectedVM.model_validate(config["vm"])
    topic = TapTopic(
        cluster, vm, create=config["create"], request_timeout_s=config["request_timeout_s"]
    )
    try:
        session = await topic.connect()
    except (KafkaError, JournalError, OSError) as exc:
        receiver.send_line({"error": str(exc), "fatal": isinstance(exc, KafkaFatal | JournalError)})
        return 1
    receiver.send_line({"ready": session.last_seq, "epoch": session.last_epoch})
    acks = Acks(receiver)
    pump = asyncio.create_task(pump_frames(receiver, session, acks))
    waiting: list[asyncio.Future[Any]] = [pump, acks.failed]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if acks.failed in done:
        error = acks.failed.result()
        pump.cancel()
        receiver.send_line({"error": str(error), "fatal": isinstance(error, KafkaFatal)})
        await session.abort()
        return 1
    if pump.result():  # asked to finish: everything sent was acknowledged
        await session.close(config["request_timeout_s"])
        acks.report()
        return 0
    await session.abort()  # the parent went away
    return 1


async def pump_frames(receiver: FrameReceiver, session: TopicSession, acks: Acks) -> bool:
    """Sends frames until asked to finish (True, after all were acknowledged) or EOF."""
    pending: list[asyncio.Future[Any]] = []
    while True:
        try:
            frame = await receiver.next()
        except EOFError:
            return False
        if frame is None:
            if pending:
                await asyncio.wait(pending)
            return True
        # librdkafka takes read-only bytes only: one copy, here in the child.
        fut = await session.send(bytes(frame))
        fut.add_done_callback(acks.done)
        pending.append(fut)
        if len(pending) > 256:
            pending = [f for f in pending if not f.done()]


async def main(fd: int, parent_pid: int) -> int:
    die_with_parent(parent_pid)
    tune_malloc()
    sock = socket.socket(fileno=fd)
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.connect_accepted_socket(FrameReceiver, sock=sock)
    try:
        return await serve(receiver)
    finally:
        # Let the last lines reach the parent before the socket closes.
        await asyncio.sleep(0)
        transport.close()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]))))
