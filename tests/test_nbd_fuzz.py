"""Malformed input never takes the NBD server down.

Well over a thousand hostile or broken sessions (random bytes, mutated handshakes, bad
option lengths, bad command headers, huge lengths, truncated payloads, abrupt closes,
stalls) run against one server. Afterwards a real client still reads and writes, every
connection has been cleaned up, and nothing was logged as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from datapath.storage import FileBackend
from vib.nbd import NbdServer, StorageExport
from vib.nbd import protocol as p

MiB = 1024 * 1024
SESSIONS = 1500
CONCURRENCY = 24
EXPORT = "fz"


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, opt, len(data)) + data


def go_data(name: str = EXPORT, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        out += struct.pack(">I", len(query)) + query.encode()
    return out


def request(command: int, offset: int, length: int, flags: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, command, cookie, offset, length)


def valid_handshake(rng: random.Random) -> bytes:
    """Client flags and options that take a client into transmission."""
    out = struct.pack(">I", rng.choice([1, 3]))
    if rng.random() < 0.6:
        out += option(p.OPT_STRUCTURED_REPLY)
        if rng.random() < 0.7:
            out += option(p.OPT_SET_META_CONTEXT, meta_data(EXPORT, [p.BASE_ALLOCATION]))
    if rng.random() < 0.3:
        out += option(p.OPT_LIST) + option(p.OPT_INFO, go_data(EXPORT, (1, 2, 3)))
    if rng.random() < 0.8:
        return out + option(p.OPT_GO, go_data(rng.choice([EXPORT, ""])))
    return out + option(p.OPT_EXPORT_NAME, EXPORT.encode())


def valid_requests(rng: random.Random) -> bytes:
    out = b""
    for cookie in range(rng.randrange(1, 8)):
        command = rng.choice([0, 1, 3, 4, 5, 6, 7])
        offset = rng.randrange(0, 8 * MiB - 65536)
        length = rng.randrange(1, 65536)
        out += request(command, offset, length, cookie=cookie)
        if command == p.CMD_WRITE:
            out += rng.randbytes(length)
    return out


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(0, 400))


def mutated_handshake(rng: random.Random) -> bytes:
    data = bytearray(valid_handshake(rng) + valid_requests(rng))
    for _ in range(rng.randrange(1, 6)):
        choice = rng.random()
        pos = rng.randrange(len(data))
        if choice < 0.6:
            data[pos] ^= 1 << rng.randrange(8)
        elif choice < 0.8:
            data[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        else:
            del data[pos : pos + rng.randrange(1, 16)]
    return bytes(data)


def bad_option_lengths(rng: random.Random) -> bytes:
    out = struct.pack(">I", 1)
    for _ in range(rng.randrange(1, 5)):
        opt = rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0, 0xFFFFFFFF, rng.getrandbits(32)])
        declared = rng.choice([0, 1, 3, 5, 6, 7, 64 * 1024 + 1, 1 << 31, 0xFFFFFFFF])
        body = rng.randbytes(rng.randrange(0, 40))
        if opt in (p.OPT_GO, p.OPT_INFO, p.OPT_SET_META_CONTEXT, p.OPT_LIST_META_CONTEXT):
            # A plausible body whose inner lengths disagree with the option length.
            body = struct.pack(">I", rng.choice([0, 2, 100, 0xFFFFFFFF])) + b"fz" + body[:6]
        out += struct.pack(">QII", p.IHAVEOPT, opt, declared) + body
    return out


def bad_command_headers(rng: random.Random) -> bytes:
    out = valid_handshake(rng)
    for cookie in range(rng.randrange(1, 10)):
        magic = p.REQUEST_MAGIC if rng.random() < 0.9 else rng.getrandbits(32)
        flags = rng.choice([0, 1, 2, 4, 8, 16, 32, 0xFFFF, rng.getrandbits(16)])
        command = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xFFFF, rng.getrandbits(16)])
        offset = rng.choice([0, 8 * MiB - 1, 8 * MiB, 1 << 63, (1 << 64) - 1, rng.getrandbits(64)])
        length = rng.choice([0, 1, 4096, 8 * MiB, 32 * MiB + 1, rng.getrandbits(32)])
        out += struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)
        if command == p.CMD_WRITE:
            out += rng.randbytes(min(length, rng.randrange(0, 9000)))
    return out


def huge_lengths(rng: random.Random) -> bytes:
    out = valid_handshake(rng)
    command = rng.choice([0, 1, 4, 5, 6, 7])
    out += request(command, rng.choice([0, (1 << 64) - 1]), 0xFFFFFFFF)
    if command == p.CMD_WRITE:
        out += rng.randbytes(rng.randrange(0, 70000))
    return out


def truncated(rng: random.Random) -> bytes:
    data = valid_handshake(rng) + valid_requests(rng)
    return data[: rng.randrange(0, len(data))]


def commands_before_negotiation(rng: random.Random) -> bytes:
    return struct.pack(">I", 1) + valid_requests(rng)


GENERATORS: list[Callable[[random.Random], bytes]] = [
    random_bytes,
    mutated_handshake,
    bad_option_lengths,
    bad_command_headers,
    huge_lengths,
    truncated,
    commands_before_negotiation,
]


async def one_session(port: int, rng: random.Random) -> str:
    """Send one malformed stream and end the session some way; returns how it ended."""
    payload = rng.choice(GENERATORS)(rng)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ending = rng.choice(["half_close", "abort", "close", "abort_before_greeting"])
    try:
        if ending == "abort_before_greeting":
            writer.transport.abort()
            return ending
        await asyncio.wait_for(reader.readexactly(18), 5)
        cuts = sorted(rng.sample(range(len(payload) + 1), k=min(2, len(payload) + 1)))
        for start, end in zip([0, *cuts], [*cuts, len(payload)], strict=True):
            writer.write(payload[start:end])
            await writer.drain()
            await asyncio.sleep(0)
        if ending == "abort":
            writer.transport.abort()
        elif ending == "half_close":
            writer.write_eof()
            # The server hangs up once it sees end of input; read what it said till then.
            while await asyncio.wait_for(reader.read(1 << 16), 10):
                pass
        return ending
    except (ConnectionError, asyncio.IncompleteReadError):
        return "reset_by_server"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def stalled_session(port: int) -> None:
    """A client that greets and then says nothing: the handshake timeout must end it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(18)
        writer.write(struct.pack(">I", 1) + option(p.OPT_GO)[:10])
        assert await asyncio.wait_for(reader.read(1), 10) == b""
    finally:
        writer.close()


async def test_malformed_sessions_never_take_the_server_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vib")
    caplog.set_level(logging.WARNING, logger="asyncio")
    backend = FileBackend(tmp_path / "fuzz.img", create_size=8 * MiB)
    server = NbdServer(
        {EXPORT: StorageExport(EXPORT, backend)}, default_export=EXPORT, handshake_timeout=2.0
    )
    port = await server.serve_tcp("127.0.0.1", 0)
    try:
        rng = random.Random(20240601)
        seeds = [rng.getrandbits(64) for _ in range(SESSIONS)]
        limiter = asyncio.Semaphore(CONCURRENCY)

        async def limited(seed: int) -> str:
            async with limiter:
                return await one_session(port, random.Random(seed))

        stalls = [asyncio.create_task(stalled_session(port)) for _ in range(5)]
        endings = await asyncio.wait_for(asyncio.gather(*map(limited, seeds)), 240)
        await asyncio.wait_for(asyncio.gather(*stalls), 30)
        assert len(endings) == SESSIONS
        assert {"half_close", "abort", "close"} <= set(endings)

        # Every session is gone from the server.
        for _ in range(200):
            if server.connection_count == 0:
                break
            await asyncio.sleep(0.05)
        assert server.connection_count == 0

        # A real client is served normally afterwards.
        if shutil.which("qemu-io"):
            proc = await asyncio.create_subprocess_exec(
                "qemu-io",
                "-f",
                "raw",
                f"nbd://127.0.0.1:{port}/{EXPORT}",
                "-c",
                "write -P 0x6b 1M 64k",
                "-c",
                "read -P 0x6b 1M 64k",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0 and b"fail" not in out.lower(), out
            assert backend.read(1 * MiB, 65536) == b"\x6b" * 65536

        registry = server.metrics.registry
        assert (registry.get_sample_value("nbd_connections_total") or 0) >= SESSIONS
        violations = sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "nbd_protocol_violations"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
        assert violations > SESSIONS / 10
    finally:
        await server.close()
        backend.close()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
