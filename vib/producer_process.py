"""The tap's Kafka producer in a child process.

Where there are cores to spare, the producer's work (its calls, its delivery reports,
librdkafka's threads) need not share a process with the loop that serves guest I/O. So
each publishing session gets a child process
(`python -m vib.producer_child`) that owns the producer; the tap hands it encoded frames
over a socket pair and gets acknowledgements back, in order.

A session that fails is ended by killing the child: nothing it still holds can reach
Kafka after that, so the next session reads a tail that no stale retry will extend.
The child also dies with its parent (PR_SET_PDEATHSIG), e.g. when the tap is SIGKILLed.

Parent -> child: messages, each a u32 length and the bytes: first the configuration
(JSON), then frames; a length of 0 asks the child to flush and exit.
Child -> parent: JSON lines: {"ready": last_seq, "epoch": epoch of that frame},
{"acked": count} (cumulative, in order), {"error": text, "fatal": bool}.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
import sys
from typing import Any

from datapath.kafka import KafkaClusterSettings, KafkaFatal, KafkaUnavailable
from datapath.protection import ProtectedVM, dump_with_secrets
from datapath.topics import Stream, topic_name

log = logging.getLogger(__name__)

FRAME_LENGTH = struct.Struct("<I")
SOCKET_BUFFER = 8 * 1024 * 1024
# Frames queued on the socket before send() waits for the child to take them.
_HIGH_WATER = 16 * 1024 * 1024


class ProducerProcess:
    """One publishing session whose producer runs in a child process."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        topic: str,
        last_seq: int,
        last_epoch: int,
    ) -> None:
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self.topic = topic
        self.last_seq = last_seq
        self.last_epoch = last_epoch
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._acked = 0
        self._failure: BaseException | None = None
        self._acks = asyncio.create_task(self._read_acks(), name=f"acks-{topic}")

    async def send(self, frame: bytes) -> asyncio.Future[Any]:
        if self._failure is not None:
            raise self._failure
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        writer = self._writer
        writer.writelines((FRAME_LENGTH.pack(len(frame)), frame))
        if writer.transport.get_write_buffer_size() > _HIGH_WATER:
            await writer.drain()
        return fut

    async def _read_acks(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    raise KafkaUnavailable("the producer process exited")
                message = json.loads(line)
                if "acked" in message:
                    self._resolve(int(message["acked"]))
                elif "error" in message:
                    kind = KafkaFatal if message.get("fatal") else KafkaUnavailable
                    raise kind(str(message["error"]))
        except (KafkaUnavailable, KafkaFatal, OSError, ValueError) as exc:
            self._fail(exc)

    def _resolve(self, acked: int) -> None:
        pending = self._pending
        while self._acked < acked and pending:
            fut = pending.popleft()
            self._acked += 1
            if not fut.done():
                fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    async def close(self, grace_s: float) -> None:
        """Lets the child send what it holds and exit; kills it after `grace_s`."""
        try:
            self._writer.write(FRAME_LENGTH.pack(0))
            async with asyncio.timeout(grace_s):
                await self._writer.drain()
                await self._proc.wait()
        except (TimeoutError, OSError):
            log.warning("producer process of %s did not finish in %.0fs", self.topic, grace_s)
        await self.abort()

    async def abort(self) -> None:
        """Kills the child at once: whatever it still holds never reaches Kafka."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._proc.wait()
        self._acks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._acks
        self._fail(KafkaUnavailable("the producer process was stopped"))
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class ProcessTapTopic:
    """Connects publishing sessions whose producer runs in a child process."""

    def __init__(
        self,
        cluster: KafkaClusterSettings,
        vm: ProtectedVM,
        *,
        create: bool = True,
        request_timeout_s: float = 15.0,
    ) -> None:
        self.topic = topic_name(Stream.TAP, vm.id)
        self._config = {
            "cluster": dump_with_secrets(cluster),
            "vm": vm.model_dump(mode="json"),
            "create": create,
            "request_timeout_s": request_timeout_s,
        }
        self._startup_timeout = 3 * request_timeout_s + 30

    async def connect(self) -> ProducerProcess:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (parent_sock, child_sock):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vib.producer_child",
                str(child_sock.fileno()),
                str(os.getpid()),
                pass_fds=(child_sock.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        try:
            config = json.dumps(self._config).encode()
            writer.write(FRAME_LENGTH.pack(len(config)) + config)
            async with asyncio.timeout(self._startup_timeout):
                line = await reader.readline()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            writer.close()
            raise
        message = json.loads(line) if line else {"error": "the producer process exited"}
        if "ready" not in message:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            writer.close()
            kind = KafkaFatal if message.get("fatal") else KafkaUnavailable
            raise kind(str(message.get("error")))
        return ProducerProcess(
            proc, reader, writer, self.topic, int(message["ready"]), int(message["epoch"])
        )
