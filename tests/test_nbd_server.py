"""The NBD server speaks the protocol exactly: handshake options, every command, the
error value the spec asks for on bad input, back-pressure, shutdown and metrics.

A raw client below drives the wire format directly; libnbd (the `nbd` module) checks
the same server from a real client's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import random
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from datapath.storage import FileBackend
from vib.nbd import ExportError, NbdServer, StorageExport
from vib.nbd import protocol as p
from vib.nbd.catalog import ExportCatalog
from vib.nbd.connection import NbdConnection, PayloadBudget, ServerContext
from vib.nbd.handshake import BlockSizes
from vib.nbd.metrics import NbdMetrics
from vib.nbd.rate_limited_log import RateLimitedLog
from vib.nbd.replies import block_status_descriptors

MiB = 1024 * 1024


# --- an in-memory export with knobs the protocol tests need ------------------------------


@dataclass
class MemoryExport:
    """RAM disk recording every call. `suspend` makes each call really await (so the
    server's task path and out-of-order replies are exercised); `fail` raises."""

    name: str = "mem"
    size: int = 4 * MiB
    description: str = "a memory disk"
    read_only: bool = False
    can_trim: bool = True
    can_zero: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_multi_conn: bool = True
    can_cache: bool = True
    supports_block_status: bool = True
    suspend: bool = False
    # While set and cleared, every call waits for it (requests pile up in the server).
    gate: asyncio.Event | None = None
    fail: BaseException | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    block: int = 4096

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.allocated = bytearray((self.size + self.block - 1) // self.block)

    async def _step(self, *call: Any) -> None:
        self.calls.append(call)
        if self.suspend:
            await asyncio.sleep(random.random() * 0.003)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail

    def _mark(self, offset: int, length: int, value: int) -> None:
        first, last = offset // self.block, (offset + length - 1) // self.block
        self.allocated[first : last + 1] = bytes([value]) * (last - first + 1)

    async def read(self, offset: int, length: int) -> bytes:
        await self._step("read", offset, length)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._step("write", offset, len(data), fua)
        self.data[offset : offset + len(data)] = data
        self._mark(offset, len(data), 1)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool) -> None:
        await self._step("write_zeroes", offset, length, may_trim, fua)
        self.data[offset : offset + length] = bytes(length)
        self._mark(offset, length, 0 if may_trim else 1)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._step("trim", offset, length, fua)
        self.data[offset : offset + length] = bytes(length)
        self._mark(offset, length, 0)

    async def flush(self) -> None:
        await self._step("flush")

    async def cache(self, offset: int, length: int) -> None:
        await self._step("cache", offset, length)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        await self._step("block_status", offset, length)
        runs: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // self.block
            run_end = min(end, (index + 1) * self.block)
            flags = 0 if self.allocated[index] else p.STATE_HOLE | p.STATE_ZERO
            runs.append((run_end - pos, flags))
            pos = run_end
        return runs


# --- a raw wire-level client ----------------------------------------------------------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.handshake_flags = 0

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def read(self, length: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(length), 10)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def greeting(self, client_flags: int = p.FLAG_C_FIXED_NEWSTYLE) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", await self.read(18))
        assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
        self.handshake_flags = flags
        self.send(struct.pack(">I", client_flags))

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, return its replies up to and including the final one."""
        self.send(struct.pack(">QII", p.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply_type, length = struct.unpack(">QIII", await self.read(20))
            assert magic == p.OPTION_REPLY_MAGIC
            assert opt == option
            payload = await self.read(length) if length else b""
            replies.append((reply_type, payload))
            if reply_type not in (p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT):
                return replies

    async def go(
        self,
        name: str = "",
        *,
        structured: bool = False,
        allocation: bool = False,
        option: int = p.OPT_GO,
    ) -> list[tuple[int, bytes]]:
        if structured:
            assert (await self.option(p.OPT_STRUCTURED_REPLY)) == [(p.REP_ACK, b"")]
            self.structured = True
        if allocation:
            replies = await self.option(
                p.OPT_SET_META_CONTEXT, meta_request(name, [p.BASE_ALLOCATION])
            )
            assert replies[-1][0] == p.REP_ACK
        encoded = name.encode()
        return await self.option(
            option, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        )

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        data: bytes = b"",
    ) -> None:
        self.send(
            struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, cookie, offset, length) + data
        )

    async def simple_reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(error, cookie, data); data only for a successful read of read_length."""
        magic, error, cookie = struct.unpack(">IIQ", await self.read(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        data = await self.read(read_length) if read_length and not error else b""
        return error, cookie, data

    async def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, cookie, payload) of one structured reply chunk."""
        magic, flags, reply_type, cookie, length = struct.unpack(">IHHQI", await self.read(20))
        assert magic == p.STRUCTURED_REPLY_MAGIC
        return flags, reply_type, cookie, await self.read(length) if length else b""

    async def error_of(self, command: int) -> int:
        """The error value of the next reply, 0 on success. With structured replies the
        server may still answer non-read commands with a simple reply: the magic says."""
        (magic,) = struct.unpack(">I", await self.read(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, _ = struct.unpack(">IQ", await self.read(12))
            return int(error)
        assert magic == p.STRUCTURED_REPLY_MAGIC and self.structured
        flags, reply_type, _, length = struct.unpack(">HHQI", await self.read(16))
        payload = await self.read(length) if length else b""
        assert flags & p.REPLY_FLAG_DONE
        if reply_type == p.REPLY_TYPE_ERROR:
            error, msg_len = struct.unpack_from(">IH", payload)
            assert len(payload) == 6 + msg_len
            return int(error)
        assert reply_type in (p.REPLY_TYPE_NONE, p.REPLY_TYPE_OFFSET_DATA)
        return 0

    async def closed_by_server(self, limit: float = 10) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 16), limit)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        if data:
            return await self.closed_by_server(limit)
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def meta_request(name: str, queries: list[str]) -> bytes:
    encoded = name.encode()
    out = struct.pack(">I", len(encoded)) + encoded + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


def info_request(name: str, requests: list[int]) -> bytes:
    encoded = name.encode()
    return (
        struct.pack(">I", len(encoded))
        + encoded
        + struct.pack(f">H{len(requests)}H", len(requests), *requests)
    )


def parse_infos(replies: list[tuple[int, bytes]]) -> dict[int, bytes]:
    return {struct.unpack_from(">H", data)[0]: data[2:] for kind, data in replies if kind == 3}


# --- fixtures --------------------------------------------------------------------------

StartServer = Callable[..., Awaitable[tuple[NbdServer, int]]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[NbdServer] = []

    async def start(exports: Any, **kwargs: Any) -> tuple[NbdServer, int]:
        server = NbdServer(exports, **kwargs)
        servers.append(server)
        return server, await server.serve_tcp("127.0.0.1", 0)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def mem_server(start_server: StartServer) -> tuple[NbdServer, int, MemoryExport]:
    export = MemoryExport()
    server, port = await start_server({"mem": export}, default_export="mem")
    return server, port, export


async def connected(port: int, **go: Any) -> RawClient:
    client = await RawClient.connect(port)
    await client.greeting(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    replies = await client.go(go.pop("name", "mem"), **go)
    assert replies[-1][0] == p.REP_ACK
    return client


# --- handshake ---------------------------------------------------------------------------


async def test_server_offers_fixed_newstyle_and_no_zeroes(mem_server: Any) -> None:
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    assert client.handshake_flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
    await client.close()


@pytest.mark.parametrize("no_zeroes", [False, True])
async def test_export_name_reply_has_zero_padding_unless_client_declines(
    mem_server: Any, no_zeroes: bool
) -> None:
    _, port, export = mem_server
    client = await RawClient.connect(port)
    await client.greeting(p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0))
    client.send(struct.pack(">QII", p.IHAVEOPT, p.OPT_EXPORT_NAME, 3) + b"mem")
    size, flags = struct.unpack(">QH", await client.read(10))
    assert size == export.size
    assert flags & p.FLAG_HAS_FLAGS and flags & p.FLAG_SEND_FLUSH
    if not no_zeroes:
        assert await client.read(124) == bytes(124)
    # Straight into transmission: a read works.
    client.request(p.CMD_READ, 0, 512, cookie=7)
    assert await client.simple_reply(512) == (0, 7, bytes(512))
    await client.close()


async def test_export_name_for_unknown_export_ends_the_session(mem_server: Any) -> None:
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    client.send(struct.pack(">QII", p.IHAVEOPT, p.OPT_EXPORT_NAME, 4) + b"nope")
    assert await client.closed_by_server()


async def test_unknown_option_is_unsupported_and_negotiation_continues(mem_server: Any) -> None:
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    assert (await client.option(4242, b"some data"))[0][0] == p.REP_ERR_UNSUP
    assert (await client.option(p.OPT_STARTTLS))[0][0] == p.REP_ERR_POLICY
    assert (await client.option(p.OPT_STARTTLS, b"x"))[0][0] == p.REP_ERR_INVALID
    assert (await client.go("mem"))[-1][0] == p.REP_ACK
    await client.close()


async def test_list_returns_every_export_then_ack(start_server: StartServer) -> None:
    exports = {"a": MemoryExport(name="a"), "b": MemoryExport(name="b", description="disk b")}
    _, port = await start_server(exports)
    client = await RawClient.connect(port)
    await client.greeting()
    replies = await client.option(p.OPT_LIST)
    assert replies[-1] == (p.REP_ACK, b"")
    names = []
    for kind, data in replies[:-1]:
        assert kind == p.REP_SERVER
        (length,) = struct.unpack_from(">I", data)
        names.append(data[4 : 4 + length].decode())
    assert names == ["a", "b"]
    assert replies[1][1].endswith(b"disk b")
    assert (await client.option(p.OPT_LIST, b"junk"))[0][0] == p.REP_ERR_INVALID
    await client.close()


async def test_info_reports_size_flags_name_description_and_block_sizes(mem_server: Any) -> None:
    _, port, export = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    replies = await client.option(
        p.OPT_INFO, info_request("", [p.INFO_NAME, p.INFO_DESCRIPTION, p.INFO_BLOCK_SIZE])
    )
    assert replies[-1][0] == p.REP_ACK
    infos = parse_infos(replies)
    size, flags = struct.unpack(">QH", infos[p.INFO_EXPORT])
    assert size == export.size
    expected = (
        p.FLAG_HAS_FLAGS
        | p.FLAG_SEND_FLUSH
        | p.FLAG_SEND_FUA
        | p.FLAG_SEND_TRIM
        | p.FLAG_SEND_WRITE_ZEROES
        | p.FLAG_CAN_MULTI_CONN
        | p.FLAG_SEND_CACHE
    )
    assert flags == expected
    assert infos[p.INFO_NAME] == b"mem"  # the default export's canonical name
    assert infos[p.INFO_DESCRIPTION] == b"a memory disk"
    assert struct.unpack(">III", infos[p.INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)
    # INFO does not end negotiation: GO still works afterwards.
    assert (await client.go("mem"))[-1][0] == p.REP_ACK
    await client.close()


async def test_go_for_unknown_export_is_an_error_the_client_can_recover_from(
    mem_server: Any,
) -> None:
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    assert (await client.go("missing"))[0][0] == p.REP_ERR_UNKNOWN
    for bad in (b"", b"\x00\x00\x00\x09mem\x00\x00", info_request("mem", [1])[:-1]):
        assert (await client.option(p.OPT_GO, bad))[0][0] == p.REP_ERR_INVALID
    not_utf8 = struct.pack(">I", 2) + b"m\xff" + struct.pack(">H", 0)
    assert (await client.option(p.OPT_GO, not_utf8))[0][0] == p.REP_ERR_INVALID
    assert (await client.go("mem"))[-1][0] == p.REP_ACK
    await client.close()


async def test_meta_contexts_need_structured_replies_and_offer_base_allocation(
    mem_server: Any,
) -> None:
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    request = meta_request("mem", [p.BASE_ALLOCATION])
    assert (await client.option(p.OPT_SET_META_CONTEXT, request))[0][0] == p.REP_ERR_INVALID
    assert (await client.option(p.OPT_STRUCTURED_REPLY)) == [(p.REP_ACK, b"")]
    for queries in ([], ["base:"], [p.BASE_ALLOCATION, "qemu:dirty-bitmap:x"]):
        replies = await client.option(p.OPT_LIST_META_CONTEXT, meta_request("mem", queries))
        assert [kind for kind, _ in replies] == [p.REP_META_CONTEXT, p.REP_ACK]
        assert replies[0][1][4:] == p.BASE_ALLOCATION.encode()
    replies = await client.option(p.OPT_LIST_META_CONTEXT, meta_request("mem", ["x-other:"]))
    assert replies == [(p.REP_ACK, b"")]
    replies = await client.option(p.OPT_LIST_META_CONTEXT, meta_request("mem", ["nocolon"]))
    assert replies[0][0] == p.REP_ERR_INVALID
    assert (await client.option(p.OPT_SET_META_CONTEXT, request[:-2]))[0][0] == p.REP_ERR_INVALID
    replies = await client.option(p.OPT_SET_META_CONTEXT, meta_request("missing", []))
    assert replies[0][0] == p.REP_ERR_UNKNOWN
    replies = await client.option(p.OPT_SET_META_CONTEXT, request)
    assert [kind for kind, _ in replies] == [p.REP_META_CONTEXT, p.REP_ACK]
    (context_id,) = struct.unpack_from(">I", replies[0][1])
    assert context_id != 0
    await client.close()


async def test_block_status_needs_a_context_selected_for_the_same_export(
    start_server: StartServer,
) -> None:
    exports = {"a": MemoryExport(name="a"), "b": MemoryExport(name="b")}
    _, port = await start_server(exports)
    client = await RawClient.connect(port)
    await client.greeting()
    assert (await client.option(p.OPT_STRUCTURED_REPLY))[0][0] == p.REP_ACK
    client.structured = True
    await client.option(p.OPT_SET_META_CONTEXT, meta_request("a", [p.BASE_ALLOCATION]))
    assert (await client.go("b"))[-1][0] == p.REP_ACK
    client.request(p.CMD_BLOCK_STATUS, 0, 4096)
    assert await client.error_of(p.CMD_BLOCK_STATUS) == p.NBD_EINVAL
    await client.close()


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(struct.pack(">I", 0x80), id="unknown-client-flag"),
        pytest.param(struct.pack(">I", 1) + b"NOTMAGIC" + bytes(8), id="bad-option-magic"),
        pytest.param(
            struct.pack(">IQII", 1, p.IHAVEOPT, p.OPT_LIST, 1 << 30), id="oversized-option"
        ),
        pytest.param(
            struct.pack(">I", 1)
            + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 0, 512),
            id="command-before-negotiation",
        ),
    ],
)
async def test_handshake_violations_disconnect_and_others_keep_working(
    mem_server: Any, stream: bytes
) -> None:
    server, port, _ = mem_server
    bad = await RawClient.connect(port)
    await bad.read(18)
    bad.send(stream)
    assert await bad.closed_by_server()
    good = await connected(port)
    good.request(p.CMD_READ, 0, 16, cookie=3)
    assert await good.simple_reply(16) == (0, 3, bytes(16))
    await good.close()
    assert sum(m.samples[0].value for m in _violations(server)) >= 1


def _violations(server: NbdServer) -> list[Any]:
    return [m for m in server.metrics.registry.collect() if m.name == "nbd_protocol_violations"]


async def test_pipelined_options_beyond_the_input_buffer_are_all_answered(
    mem_server: Any,
) -> None:
    # 12 unknown options of 60 KiB each (720 KiB) sent before any reply is read: more
    # than the server buffers during a handshake, so it must stop reading and resume.
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    count = 12
    for i in range(count):
        client.send(struct.pack(">QII", p.IHAVEOPT, 1000 + i, 60 * 1024) + bytes([i]) * 60 * 1024)
    for i in range(count):
        magic, opt, reply_type, length = struct.unpack(">QIII", await client.read(20))
        assert (magic, opt, reply_type) == (p.OPTION_REPLY_MAGIC, 1000 + i, p.REP_ERR_UNSUP)
        await client.read(length)
    assert (await client.go("mem"))[-1][0] == p.REP_ACK
    await client.close()


async def test_abort_is_acknowledged_then_closed(mem_server: Any) -> None:
    _, port, _ = mem_server
    client = await RawClient.connect(port)
    await client.greeting()
    assert (await client.option(p.OPT_ABORT)) == [(p.REP_ACK, b"")]
    assert await client.closed_by_server()


async def test_idle_handshake_times_out(start_server: StartServer) -> None:
    _, port = await start_server({"mem": MemoryExport()}, handshake_timeout=0.3)
    client = await RawClient.connect(port)
    await client.read(18)
    assert await client.closed_by_server(limit=10)


# --- transmission -------------------------------------------------------------------


@pytest.mark.parametrize("suspend", [False, True], ids=["inline", "suspending"])
async def test_pipelined_requests_are_all_answered_by_cookie(
    start_server: StartServer, suspend: bool
) -> None:
    export = MemoryExport(suspend=suspend)
    _, port = await start_server({"mem": export})
    client = await connected(port)
    rng = random.Random(5)
    blocks = {i: rng.randbytes(4096) for i in range(64)}
    for i, block in blocks.items():
        client.request(p.CMD_WRITE, i * 4096, 4096, cookie=1000 + i, data=block)
    acked = {(await client.simple_reply())[:2] for _ in blocks}
    assert acked == {(0, 1000 + i) for i in blocks}
    for i in blocks:
        client.request(p.CMD_READ, i * 4096, 4096, cookie=2000 + i)
    seen = {}
    for _ in blocks:
        # Simple replies carry no length: the cookie tells which read the data answers.
        magic, error, cookie = struct.unpack(">IIQ", await client.read(16))
        assert (magic, error) == (p.SIMPLE_REPLY_MAGIC, 0)
        seen[cookie - 2000] = await client.read(4096)
    assert seen == blocks
    await client.close()


async def test_structured_read_is_one_data_chunk_and_zero_length_reads_succeed(
    mem_server: Any,
) -> None:
    _, port, export = mem_server
    export.data[8192 : 8192 + 5] = b"hello"
    client = await connected(port, structured=True)
    client.request(p.CMD_READ, 8192, 5, cookie=9, flags=p.CMD_FLAG_DF)
    flags, kind, cookie, payload = await client.chunk()
    assert (flags, kind, cookie) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, 9)
    assert payload == struct.pack(">Q", 8192) + b"hello"
    client.request(p.CMD_READ, 0, 0, cookie=10)
    assert await client.chunk() == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, 10, b"")
    await client.close()


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    ("command", "offset", "length", "flags", "expected"),
    [
        (p.CMD_READ, 4 * MiB - 512, 1024, 0, p.NBD_EINVAL),
        (p.CMD_WRITE_ZEROES, 4 * MiB, 1, 0, p.NBD_ENOSPC),
        (p.CMD_TRIM, 4 * MiB - 1, 2, 0, p.NBD_EINVAL),
        (p.CMD_CACHE, 1 << 62, 1, 0, p.NBD_EINVAL),
        (p.CMD_READ, 0, 512, p.CMD_FLAG_REQ_ONE, p.NBD_EINVAL),
        (p.CMD_FLUSH, 0, 0, p.CMD_FLAG_NO_HOLE, p.NBD_EINVAL),
        (p.CMD_WRITE_ZEROES, 0, 512, p.CMD_FLAG_FAST_ZERO, p.NBD_EINVAL),
        (p.CMD_TRIM, 0, 512, 1 << 15, p.NBD_EINVAL),
        (9, 0, 0, 0, p.NBD_EINVAL),
        (0xFFFF, 0, 0, 0, p.NBD_EINVAL),
        (p.CMD_BLOCK_STATUS, 0, 512, 0, p.NBD_EINVAL),  # no context negotiated
        (p.CMD_WRITE, 4 * MiB + 1, 0, 0, p.NBD_ENOSPC),  # refused, no payload to skip
        (p.CMD_WRITE, 0, 0, 1 << 15, p.NBD_EINVAL),
    ],
)
async def test_bad_requests_get_the_error_the_spec_names(
    mem_server: Any,
    structured: bool,
    command: int,
    offset: int,
    length: int,
    flags: int,
    expected: int,
) -> None:
    _, port, export = mem_server
    client = await connected(port, structured=structured)
    client.request(command, offset, length, flags=flags, cookie=77)
    assert await client.error_of(command) == expected
    # The session goes on.
    client.request(p.CMD_WRITE, 0, 3, cookie=78, data=b"abc")
    assert await client.error_of(p.CMD_WRITE) == 0
    assert bytes(export.data[:3]) == b"abc"
    await client.close()


@pytest.mark.parametrize("structured", [False, True])
async def test_large_writes_arriving_in_pieces_are_written_whole(
    mem_server: Any, structured: bool
) -> None:
    # Large payloads are received into a buffer of their own; small ones pipelined
    # behind them must still parse from the right place.
    _, port, export = mem_server
    client = await connected(port, structured=structured)
    rng = random.Random(3)
    big = rng.randbytes(3 * MiB + 123)
    small = rng.randbytes(700)
    stream = (
        struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 4096, len(big))
        + big
        + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 2, 5, len(small))
        + small
        + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 3, 4096, 65536)
    )
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 27, 28, 1000, 65536, 200_000])
        client.send(stream[pos : pos + step])
        await client.writer.drain()
        pos += step
        if rng.random() < 0.1:
            await asyncio.sleep(0.001)
    assert await client.error_of(p.CMD_WRITE) == 0
    assert await client.error_of(p.CMD_WRITE) == 0
    if structured:
        _, kind, cookie, payload = await client.chunk()
        assert (kind, cookie) == (p.REPLY_TYPE_OFFSET_DATA, 3)
        assert payload[8:] == big[:65536]
    else:
        assert await client.simple_reply(65536) == (0, 3, big[:65536])
    assert bytes(export.data[4096 : 4096 + len(big)]) == big
    assert bytes(export.data[5:705]) == small
    await client.close()


async def test_write_beyond_the_end_is_enospc_and_payload_is_consumed(mem_server: Any) -> None:
    _, port, export = mem_server
    client = await connected(port)
    client.request(p.CMD_WRITE, export.size - 2, 4, cookie=1, data=b"WXYZ")
    client.request(p.CMD_WRITE, 0, 4, cookie=2, data=b"good")
    assert await client.simple_reply() == (p.NBD_ENOSPC, 1, b"")
    assert await client.simple_reply() == (0, 2, b"")
    assert bytes(export.data[:4]) == b"good"
    await client.close()


@pytest.mark.parametrize("structured", [False, True])
async def test_oversized_read_is_refused_without_disconnecting(
    start_server: StartServer, structured: bool
) -> None:
    _, port = await start_server({"mem": MemoryExport()}, max_request_bytes=64 * 1024)
    client = await connected(port, structured=structured)
    client.request(p.CMD_READ, 0, 65 * 1024)
    assert await client.error_of(p.CMD_READ) == (p.NBD_EOVERFLOW if structured else p.NBD_EINVAL)
    client.request(p.CMD_READ, 0, 64 * 1024)
    if structured:
        assert (await client.chunk())[1] == p.REPLY_TYPE_OFFSET_DATA
    else:
        assert (await client.simple_reply(64 * 1024))[0] == 0
    await client.close()


async def test_oversized_write_payload_is_skipped_with_einval(start_server: StartServer) -> None:
    export = MemoryExport()
    _, port = await start_server({"mem": export}, max_request_bytes=64 * 1024)
    client = await connected(port)
    client.request(p.CMD_WRITE, 0, 1 * MiB, cookie=1, data=b"\xee" * MiB)
    client.request(p.CMD_WRITE, 0, 2, cookie=2, data=b"ok")
    assert await client.simple_reply() == (p.NBD_EINVAL, 1, b"")
    assert await client.simple_reply() == (0, 2, b"")
    assert bytes(export.data[:3]) == b"ok\x00"
    await client.close()


async def test_write_larger_than_32_mib_disconnects(mem_server: Any) -> None:
    _, port, _ = mem_server
    client = await connected(port)
    client.request(p.CMD_WRITE, 0, 0xFFFFFFFF, data=bytes(4096))
    assert await client.closed_by_server()


async def test_bad_request_magic_disconnects(mem_server: Any) -> None:
    _, port, _ = mem_server
    client = await connected(port)
    client.send(b"\x00" * 28)
    assert await client.closed_by_server()


async def test_read_only_export_refuses_changes_with_eperm(start_server: StartServer) -> None:
    export = MemoryExport(read_only=True)
    _, port = await start_server({"mem": export})
    client = await connected(port)
    client.request(p.CMD_WRITE, 0, 2, cookie=1, data=b"no")
    client.request(p.CMD_TRIM, 0, 512, cookie=2)
    client.request(p.CMD_WRITE_ZEROES, 0, 512, cookie=3)
    replies = sorted([await client.simple_reply() for _ in range(3)], key=lambda r: r[1])
    assert [r[0] for r in replies] == [p.NBD_EPERM] * 3
    assert export.calls == []
    await client.close()


async def test_flags_reach_the_export(mem_server: Any) -> None:
    _, port, export = mem_server
    client = await connected(port)
    client.request(p.CMD_WRITE, 0, 4, flags=p.CMD_FLAG_FUA, data=b"data")
    client.request(p.CMD_WRITE_ZEROES, 4096, 8192, flags=p.CMD_FLAG_NO_HOLE)
    client.request(p.CMD_WRITE_ZEROES, 16384, 4096, flags=p.CMD_FLAG_FUA)
    client.request(p.CMD_TRIM, 32768, 4096)
    client.request(p.CMD_CACHE, 0, 4096)
    client.request(p.CMD_FLUSH)
    client.request(p.CMD_TRIM, 0, 0)  # zero length: success without a call
    for _ in range(7):
        assert (await client.simple_reply())[0] == 0
    assert export.calls == [
        ("write", 0, 4, True),
        ("write_zeroes", 4096, 8192, False, False),
        ("write_zeroes", 16384, 4096, True, True),
        ("trim", 32768, 4096, False),
        ("cache", 0, 4096),
        ("flush",),
    ]
    await client.close()


async def test_block_status_reports_holes_merged_and_req_one(mem_server: Any) -> None:
    _, port, export = mem_server
    export.data[8192:16384] = b"\x01" * 8192
    export.allocated[2:4] = b"\x01\x01"
    client = await connected(port, structured=True, allocation=True)
    client.request(p.CMD_BLOCK_STATUS, 0, 32768, cookie=4)
    flags, kind, cookie, payload = await client.chunk()
    assert (flags, kind, cookie) == (p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, 4)
    context, *descriptors = struct.unpack(f">{len(payload) // 4}I", payload)
    assert context != 0
    hole = p.STATE_HOLE | p.STATE_ZERO
    assert descriptors == [8192, hole, 8192, 0, 16384, hole]
    client.request(p.CMD_BLOCK_STATUS, 100, 20000, flags=p.CMD_FLAG_REQ_ONE, cookie=5)
    _, _, _, payload = await client.chunk()
    assert struct.unpack(">III", payload)[1:] == (8092, hole)
    client.request(p.CMD_BLOCK_STATUS, 0, 0, cookie=6)
    assert await client.error_of(p.CMD_BLOCK_STATUS) == p.NBD_EINVAL
    await client.close()


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (ExportError(errno.ENOSPC, "pool full"), p.NBD_ENOSPC),
        (ExportError(errno.EDQUOT), p.NBD_ENOSPC),
        (ExportError(errno.ENOTSUP), p.NBD_ENOTSUP),
        (ExportError(errno.ENOENT), p.NBD_EIO),
        (OSError(errno.EROFS, "read-only file system"), p.NBD_EPERM),
        (RuntimeError("bug in the export"), p.NBD_EIO),
    ],
)
@pytest.mark.parametrize("suspend", [False, True], ids=["inline", "suspending"])
async def test_export_failures_become_nbd_errors_and_the_session_goes_on(
    start_server: StartServer,
    failure: BaseException,
    expected: int,
    suspend: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    export = MemoryExport(suspend=suspend, fail=failure)
    _, port = await start_server({"mem": export})
    client = await connected(port, structured=True)
    client.request(p.CMD_WRITE, 0, 4, data=b"data")
    _flags, kind, _, payload = await client.chunk()
    assert kind == p.REPLY_TYPE_ERROR
    error, _msg_len = struct.unpack_from(">IH", payload)
    assert error == expected
    if isinstance(failure, ExportError) and failure.message:
        assert payload[6:] == failure.message.encode()
    client.request(p.CMD_READ, 0, 4)
    assert (await client.chunk())[1] == p.REPLY_TYPE_ERROR
    export.fail = None
    client.request(p.CMD_READ, 0, 4)
    assert (await client.chunk())[1] == p.REPLY_TYPE_OFFSET_DATA
    await client.close()


async def test_disconnect_waits_for_requests_in_flight(start_server: StartServer) -> None:
    export = MemoryExport(suspend=True)
    _, port = await start_server({"mem": export})
    client = await connected(port)
    for i in range(20):
        client.request(p.CMD_WRITE, i * 512, 512, cookie=i, data=bytes([i + 1]) * 512)
    client.request(p.CMD_DISC)
    cookies = {(await client.simple_reply())[1] for _ in range(20)}
    assert cookies == set(range(20))
    assert await client.closed_by_server()
    assert all(export.data[i * 512] == i + 1 for i in range(20))


async def test_close_finishes_requests_in_flight_and_refuses_new_options(
    start_server: StartServer,
) -> None:
    export = MemoryExport(suspend=True)
    server, port = await start_server({"mem": export})
    busy = await connected(port)
    negotiating = await RawClient.connect(port)
    await negotiating.greeting()
    for i in range(10):
        busy.request(p.CMD_WRITE, i * 512, 512, cookie=i, data=b"\x07" * 512)
    await asyncio.sleep(0)  # let the server start them
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(server.close())
    replies = [await busy.simple_reply() for _ in range(10)]
    assert {cookie for _, cookie, _ in replies} == set(range(10))
    await asyncio.wait_for(closing, 10)
    assert await busy.closed_by_server()
    assert await negotiating.closed_by_server()
    assert server.connection_count == 0
    with pytest.raises(OSError):
        await RawClient.connect(port)


async def test_client_vanishing_mid_request_does_not_disturb_others(mem_server: Any) -> None:
    server, port, export = mem_server
    steady = await connected(port)
    for cut in (10, 28, 28 + 100):
        vanishing = await connected(port)
        request = struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 4096)
        vanishing.send((request + b"\xff" * 4096)[:cut])
        await vanishing.writer.drain()
        vanishing.writer.transport.abort()
    steady.request(p.CMD_WRITE, 0, 4, cookie=5, data=b"safe")
    assert await steady.simple_reply() == (0, 5, b"")
    assert bytes(export.data[:4]) == b"safe"
    await steady.close()
    for _ in range(100):
        if server.connection_count == 0:
            break
        await asyncio.sleep(0.02)
    assert server.connection_count == 0


async def test_a_client_that_reads_nothing_cannot_grow_server_memory(
    start_server: StartServer,
) -> None:
    # 2,000 pipelined 64 KiB reads (125 MiB of replies) to a client that never reads:
    # the server must stop taking requests once its send buffer fills, then serve the
    # rest when the client catches up.
    export = MemoryExport()
    _server, port = await start_server({"mem": export})
    client = await connected(port)
    total = 2000
    for i in range(total):
        client.request(p.CMD_READ, 0, 65536, cookie=i)
    await client.writer.drain()
    await asyncio.sleep(0.5)
    started = sum(1 for call in export.calls if call[0] == "read")
    assert started < total
    for _ in range(total):
        error, _, data = await client.simple_reply(65536)
        assert error == 0 and len(data) == 65536
    await client.close()


async def test_lookup_function_serves_exports_and_declines_to_list(
    start_server: StartServer,
) -> None:
    export = MemoryExport(name="vm1-disk0")

    async def lookup(name: str) -> MemoryExport | None:
        await asyncio.sleep(0)
        return export if name == "vm1-disk0" else None

    _, port = await start_server(lookup)
    client = await RawClient.connect(port)
    await client.greeting()
    assert (await client.option(p.OPT_LIST))[0][0] == p.REP_ERR_POLICY
    assert (await client.go(""))[0][0] == p.REP_ERR_UNKNOWN  # no default export
    assert (await client.go("vm1-disk0"))[-1][0] == p.REP_ACK
    await client.close()


async def test_metrics_count_connections_requests_bytes_and_errors(
    start_server: StartServer,
) -> None:
    registry = CollectorRegistry()
    server, port = await start_server({"mem": MemoryExport()}, registry=registry)
    client = await connected(port)
    client.request(p.CMD_WRITE, 0, 1000, data=bytes(1000))
    client.request(p.CMD_READ, 0, 300)
    client.request(p.CMD_READ, 1 << 40, 1)
    await client.simple_reply()
    await client.simple_reply(300)
    await client.simple_reply()
    await client.close()

    def value(name: str, **labels: str) -> float:
        result = registry.get_sample_value(name, labels)
        return 0.0 if result is None else result

    for _ in range(100):
        if value("nbd_active_connections") == 0:
            break
        await asyncio.sleep(0.02)
    assert value("nbd_connections_total") == 1
    assert value("nbd_active_connections") == 0
    assert value("nbd_requests_total", command="write") == 1
    assert value("nbd_requests_total", command="read") == 2
    assert value("nbd_written_bytes_total") == 1000
    assert value("nbd_read_bytes_total") == 300
    assert value("nbd_request_errors_total", command="read", error="22") == 1
    assert server.metrics.registry is registry


async def test_libnbd_round_trip_over_a_file_export(
    start_server: StartServer, tmp_path: Path
) -> None:
    backend = FileBackend(tmp_path / "disk.img", create_size=8 * MiB)
    _, port = await start_server({"disk": StorageExport("disk", backend)})

    def session() -> list[tuple[int, int]]:
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
        assert h.get_size() == 8 * MiB
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"\x5a" * 65536, 5 * MiB, nbd.CMD_FLAG_FUA)
        assert h.pread(65536, 5 * MiB) == b"\x5a" * 65536
        h.pwrite(b"\x11" * (2 * MiB), 0)
        h.zero(1 * MiB, 65536)  # count, offset
        h.trim(1 * MiB, 1 * MiB)
        assert h.pread(4096, 65536 + 4096) == bytes(4096)
        h.flush()
        extents: list[tuple[int, int]] = []

        def collect(context: str, offset: int, entries: list[int], err: int) -> int:
            extents.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        h.block_status(8 * MiB, 0, collect)
        h.shutdown()
        return extents

    extents = await asyncio.to_thread(session)
    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
    assert extents == [
        (65536, 0),
        (5 * MiB - 65536, hole),
        (65536, 0),
        (3 * MiB - 65536, hole),
    ]
    backend.close()


async def test_logging_of_violations_is_rate_limited(
    mem_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, port, _ = mem_server
    caplog.set_level(logging.WARNING, logger="vib.nbd")
    for _ in range(60):
        client = await RawClient.connect(port)
        await client.read(18)
        client.send(struct.pack(">I", 0xF0))
        await client.closed_by_server()
    warnings = [r for r in caplog.records if r.name.startswith("vib.nbd")]
    # The first 20 in the minute are logged, the other 40 only counted.
    assert 20 <= len(warnings) <= 25


def test_suppressed_messages_are_counted_in_the_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("test.ratelimit"), burst=2, interval=60, clock=lambda: now[0]
    )
    caplog.set_level(logging.WARNING, logger="test.ratelimit")
    for index in range(5):
        limited.warning("violation %d", index)
    assert [r.getMessage() for r in caplog.records] == ["violation 0", "violation 1"]
    now[0] = 61.0
    limited.warning("violation 5")
    assert [r.getMessage() for r in caplog.records][2:] == [
        "3 similar messages suppressed in the last 61 s",
        "violation 5",
    ]


class RecordingTransport(asyncio.Transport):
    """Stands in for the socket so the test controls exactly when input arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.reading = True

    def write(self, data: Any) -> None:
        self.sent += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.sent += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def recording_connection(export: MemoryExport) -> tuple[NbdConnection, RecordingTransport]:
    """A connection to `export` whose socket the test plays (see RecordingTransport)."""
    context = ServerContext(
        catalog=ExportCatalog({"mem": export}),
        block_sizes=BlockSizes(),
        max_request_bytes=32 * MiB,
        handshake_timeout=10,
        metrics=NbdMetrics(),
        log=RateLimitedLog(logging.getLogger("test")),
        shutting_down=lambda: False,
        on_finished=lambda connection: None,
        payloads=PayloadBudget(256 * MiB),
    )
    connection = NbdConnection(context)
    transport = RecordingTransport()
    connection.connection_made(transport)
    return connection, transport


async def negotiated(connection: NbdConnection, transport: RecordingTransport) -> None:
    """Through the handshake (NBD_OPT_EXPORT_NAME "mem"), its replies dropped."""
    room = connection.get_buffer(-1)
    hello = struct.pack(">I", p.FLAG_C_NO_ZEROES) + struct.pack(">QII", p.IHAVEOPT, 1, 3) + b"mem"
    room[: len(hello)] = hello
    connection.buffer_updated(len(hello))
    for _ in range(10):
        await asyncio.sleep(0)
    del transport.sent[:]


async def test_input_held_back_by_a_pause_is_kept_and_served_later() -> None:
    # The event loop may offer more input after we asked it to pause; the receive
    # buffer must make room (compacting, then growing) rather than lose any of it.
    connection, transport = recording_connection(MemoryExport())

    def feed(data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = connection.get_buffer(-1)
            assert len(room) >= 64 * 1024 or len(room) >= len(view)
            step = min(len(room), len(view), 100_000)
            room[:step] = view[:step]
            connection.buffer_updated(step)
            view = view[step:]

    await negotiated(connection, transport)
    connection.pause_writing()  # as if the client stopped reading replies
    requests = 20_000  # 560 KiB of READ requests, more than the receive buffer
    feed(b"".join(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, 0, i, 0, 8) for i in range(requests)))
    assert not transport.reading
    assert transport.sent == b""
    connection.resume_writing()
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(transport.sent) == requests * (16 + 8)
    cookies = {struct.unpack_from(">Q", transport.sent, i * 24 + 8)[0] for i in range(requests)}
    assert cookies == set(range(requests))


async def test_back_to_back_large_writes_are_received_straight_into_their_own_buffers() -> None:
    # After a large payload, the next header is received alone: a large write behind it
    # then lands whole in a buffer of its own, none of it in the receive buffer to be
    # copied over. The kernel is played as one that fills every buffer it is offered.
    export = MemoryExport()
    connection, transport = recording_connection(export)
    await negotiated(connection, transport)
    rng = random.Random(5)
    writes = [(i * MiB, rng.randbytes(MiB)) for i in range(3)]
    small = rng.randbytes(512)
    stream = (
        b"".join(
            struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, i, offset, len(data)) + data
            for i, (offset, data) in enumerate(writes)
        )
        + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_WRITE, 9, 3 * MiB, len(small))
        + small
    )
    view = memoryview(stream)
    into_receive_buffer = 0
    while view:
        room = connection.get_buffer(-1)
        step = min(len(room), len(view))
        if room.obj is connection._rbuf:
            into_receive_buffer += step
        room[:step] = view[:step]
        connection.buffer_updated(step)
        view = view[step:]
    for _ in range(10):
        await asyncio.sleep(0)
    # The first write's header and the start of its payload, then two headers alone,
    # then the small write whole.
    first_receive = 256 * 1024
    assert into_receive_buffer == first_receive + 2 * 28 + 28 + len(small)
    assert len(transport.sent) == 4 * 16
    for offset, data in writes:
        assert bytes(export.data[offset : offset + MiB]) == data
    assert bytes(export.data[3 * MiB : 3 * MiB + 512]) == small


@given(
    length=st.integers(1, (1 << 32) - 1),
    extents=st.lists(st.tuples(st.integers(-5, 1 << 33), st.integers(0, 0xFFFFFFFF)), max_size=50),
    req_one=st.booleans(),
)
def test_block_status_descriptors_stay_within_the_request(
    length: int, extents: list[tuple[int, int]], req_one: bool
) -> None:
    descriptors = block_status_descriptors(length, extents, req_one=req_one)
    lengths, statuses = descriptors[::2], descriptors[1::2]
    assert lengths and all(0 < n <= 0xFFFFFFFF for n in lengths)
    assert sum(lengths) <= length
    assert all(status & ~3 == 0 for status in statuses)
    assert all(a != b for a, b in itertools.pairwise(statuses))  # merged
    if req_one:
        assert len(lengths) == 1
    if not any(n > 0 for n, _ in extents):
        assert descriptors == [length, 0]


# --- memory a client can make the server hold ---------------------------------------------


async def test_announced_payloads_take_buffers_only_within_the_budget(
    start_server: StartServer,
) -> None:
    export = MemoryExport(size=64 * MiB)
    server, port = await start_server(
        {"mem": export}, default_export="mem", payload_budget_bytes=8 * MiB
    )
    clients = [await connected(port) for _ in range(8)]
    tracemalloc.start()
    try:
        for client in clients:  # a 32 MiB write announced, one byte of it sent
            client.request(p.CMD_WRITE, 0, 32 * MiB, data=b"x")
        await asyncio.sleep(0.3)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 16 * MiB, f"{held >> 20} MiB held for 8 bytes of payload"
    # The writes still complete once their payload arrives (the last one past the budget).
    payload = b"x" + bytes(range(256)) * (32 * MiB // 256 - 1) + bytes(255)
    clients[-1].send(payload[1:])
    error, _, _ = await clients[-1].simple_reply()
    assert error == 0 and export.data[: 32 * MiB] == payload
    # The connection's buffer, grown to hold that payload, is not kept for its life.
    clients[-1].request(p.CMD_READ, 0, 4096, cookie=2)
    assert (await clients[-1].simple_reply(4096))[0] == 0
    assert max(len(c._rbuf) for c in server._connections) <= 1024 * 1024
    for client in clients:
        await client.close()


async def test_a_refused_write_skips_its_payload_without_buffering_it(
    start_server: StartServer,
) -> None:
    export = MemoryExport(size=4 * MiB, read_only=True)
    server, port = await start_server({"mem": export}, default_export="mem")
    client = await connected(port)
    client.request(p.CMD_WRITE, 0, 2 * MiB, data=b"x")
    await asyncio.sleep(0.1)
    assert server._context.payloads.used == 0
    client.send(bytes(2 * MiB - 1))
    error, _, _ = await client.simple_reply()
    assert error == p.NBD_EPERM
    client.request(p.CMD_READ, 0, 4096, cookie=2)
    assert (await client.simple_reply(4096))[0] == 0
    await client.close()


async def test_suspended_writes_are_bounded_by_bytes_as_well_as_by_count(
    start_server: StartServer,
) -> None:
    gate = asyncio.Event()
    export = MemoryExport(size=512 * MiB, gate=gate)
    _, port = await start_server({"mem": export}, default_export="mem")
    client = await connected(port)
    size = 4 * MiB
    for index in range(48):  # 192 MiB of writes the export does not finish yet
        client.request(p.CMD_WRITE, index * size, size, cookie=index, data=bytes(size))
    drained = asyncio.ensure_future(client.writer.drain())
    await asyncio.sleep(0.5)
    started = sum(1 for call in export.calls if call[0] == "write")
    assert started <= 64 * MiB // size + 1, f"{started} writes held by the server at once"
    gate.set()
    await drained
    cookies = {(await client.simple_reply())[1] for _ in range(48)}
    assert cookies == set(range(48))
    await client.close()


async def test_replies_reach_a_client_that_shut_down_its_sending_side(
    start_server: StartServer,
) -> None:
    export = MemoryExport(suspend=True)
    _, port = await start_server({"mem": export}, default_export="mem")
    client = await connected(port)
    for index in range(8):
        client.request(
            p.CMD_WRITE,
            index * 4096,
            4096,
            flags=p.CMD_FLAG_FUA,
            cookie=index,
            data=bytes([index]) * 4096,
        )
    client.writer.write_eof()
    cookies = {(await client.simple_reply())[1] for _ in range(8)}
    assert cookies == set(range(8))
    assert await client.closed_by_server()
    await client.close()


async def test_connections_over_the_limit_are_closed_on_arrival(
    start_server: StartServer,
) -> None:
    registry = CollectorRegistry()
    _, port = await start_server(
        {"mem": MemoryExport()}, default_export="mem", max_connections=2, registry=registry
    )
    first, second = await connected(port), await connected(port)
    third = await RawClient.connect(port)
    assert await third.closed_by_server()
    assert (
        registry.get_sample_value("nbd_protocol_violations_total", {"kind": "too_many_connections"})
        == 1
    )
    first.request(p.CMD_READ, 0, 512)
    assert (await first.simple_reply(512))[0] == 0
    for client in (first, second, third):
        await client.close()
