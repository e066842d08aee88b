"""The tap's C write path (vib/_fast_writes.c): byte-identical to the journal's encoder,
and it stops, with nothing half done, at every request it must leave to Python."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.journal import (
    RECORD_HEADER_SIZE,
    RecordKind,
    decode_frame,
    encode_frame_body,
    encode_record_header,
)
from vib import _fast_writes
from vib._fast_writes import FastWrites
from vib.activity_log import Slot
from vib.nbd import protocol as p
from vib.publisher import META

EXTENT_SHIFT = 16  # 64 KiB extents
DISK_SHIFT = 48
DISK = 3
SIZE = 1 << 20


def request(offset: int, data: bytes, *, cookie: int, flags: int = 0, command: int = 1) -> bytes:
    header = p.REQUEST_HEADER.pack(p.REQUEST_MAGIC, flags, command, cookie, offset, len(data))
    return header + (data if command == p.CMD_WRITE else b"")


@dataclass
class Rig:
    """A disk file, a hot table and the buffers one run writes into."""

    path: Path
    fd: int
    hot: dict[int, Slot]
    fast: FastWrites
    body: bytearray = field(default_factory=lambda: bytearray(1 << 20))
    meta: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    used: int = 0

    def make_hot(self, offset: int, *, committed: bool = True) -> Slot:
        slot = Slot()
        slot.committed = committed
        self.hot[(DISK << DISK_SHIFT) | (offset >> EXTENT_SHIFT)] = slot
        return slot

    def run(
        self,
        buf: bytes,
        *,
        seq: int = 100,
        gen: int = 7,
        tick: int = 5,
        room: int = 1 << 30,
        length_max: int = 1 << 20,
    ) -> tuple[int, int, int, int, int]:
        data = bytearray(buf)
        pos, count, nbytes, self.used, seq, gen = self.fast.run(
            data,
            0,
            len(data),
            self.out,
            self.body,
            self.used,
            self.meta,
            seq,
            gen,
            tick,
            room,
            length_max,
        )
        return pos, count, nbytes, seq, gen

    def disk(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


def open_rig(path: Path, flags: int = os.O_RDWR) -> Rig:
    with path.open("wb") as f:
        f.truncate(SIZE)
    fd = os.open(path, flags)
    hot: dict[int, Slot] = {}
    fast = FastWrites(
        fd=fd, disk=DISK, size=SIZE, hot=hot, extent_shift=EXTENT_SHIFT, disk_shift=DISK_SHIFT
    )
    return Rig(path, fd, hot, fast)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = open_rig(tmp_path / "disk.img")
    yield r
    os.close(r.fd)


def test_the_metadata_layout_is_the_publishers() -> None:
    assert META.size == _fast_writes.META_SIZE


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=9000), value=st.integers(0, 2**32 - 1))
def test_crc32c_is_the_standard_one(data: bytes, value: int) -> None:
    assert _fast_writes.crc32c(data, value) == crc32c.crc32c(data, value)


@settings(max_examples=300, deadline=None)
@given(
    disk=st.integers(0, 0xFFFF),
    seq=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**63),
    data=st.binary(min_size=1, max_size=5000),
    ts=st.integers(0, 2**64 - 1),
)
def test_a_record_is_encoded_as_the_journal_encodes_it(
    disk: int, seq: int, offset: int, data: bytes, ts: int
) -> None:
    expected = encode_record_header(RecordKind.WRITE, seq, disk, offset, len(data), ts, data)
    assert _fast_writes.encode_write_record(disk, seq, offset, data, ts) == expected + data


@settings(max_examples=50, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, SIZE // 512 - 9), st.integers(1, 8)), min_size=1, max_size=40
    )
)
def test_a_run_writes_numbers_encodes_and_answers_every_write(
    tmp_path_factory: pytest.TempPathFactory, writes: list[tuple[int, int]]
) -> None:
    r = open_rig(tmp_path_factory.mktemp("run") / "disk.img")
    try:
        buf = b""
        expected = bytearray(SIZE)
        plan = []
        for index, (sector, sectors) in enumerate(writes):
            offset, length = sector * 512, sectors * 512
            if (offset >> EXTENT_SHIFT) != ((offset + length - 1) >> EXTENT_SHIFT):
                offset = ((offset >> EXTENT_SHIFT) << EXTENT_SHIFT) + (1 << EXTENT_SHIFT) - length
            data = os.urandom(length)
            r.make_hot(offset)
            buf += request(offset, data, cookie=1000 + index)
            expected[offset : offset + length] = data
            plan.append((offset, data))
        before = time.time_ns()
        pos, count, nbytes, seq, gen = r.run(buf, seq=100, gen=7)
        after = time.time_ns()
        assert (pos, count, nbytes) == (len(buf), len(plan), sum(len(d) for _, d in plan))
        assert (seq, gen) == (100 + len(plan), 7 + len(plan))
        assert r.disk(0, SIZE) == bytes(expected)
        replies = [struct.unpack_from(">IIQ", r.out, 16 * i) for i in range(len(plan))]
        assert replies == [(p.SIMPLE_REPLY_MAGIC, 0, 1000 + i) for i in range(len(plan))]
        frame = decode_frame(
            encode_frame_body("vm", 1, 100, seq - 1, count, bytes(r.body[: r.used]))
        )
        assert [(rec.seq, rec.disk, rec.offset, bytes(rec.data)) for rec in frame.records] == [
            (100 + i, DISK, offset, data) for i, (offset, data) in enumerate(plan)
        ]
        assert all(before <= rec.ts_ns <= after for rec in frame.records)
        metas = list(META.iter_unpack(r.meta))
        assert metas == [
            (100 + i, 8 + i, offset, len(data), RECORD_HEADER_SIZE + len(data), DISK,
             RecordKind.WRITE)
            for i, (offset, data) in enumerate(plan)
        ]  # fmt: skip
        for i, (offset, _) in enumerate(plan):
            slot = r.hot[(DISK << DISK_SHIFT) | (offset >> EXTENT_SHIFT)]
            last = max(
                j for j, (o, _) in enumerate(plan) if o >> EXTENT_SHIFT == offset >> EXTENT_SHIFT
            )
            assert (slot.last_gen, slot.tick) == (8 + last, 5), i  # fmt: skip
    finally:
        os.close(r.fd)


def _stoppers() -> dict[str, tuple[bytes, dict[str, int]]]:
    data = b"\xab" * 4096
    return {
        "fua": (request(0, data, cookie=2, flags=p.CMD_FLAG_FUA), {}),
        "a read": (request(0, b"", cookie=2, command=p.CMD_READ), {}),
        "a cold extent": (request(5 << EXTENT_SHIFT, data, cookie=2), {}),
        "an extent not committed yet": (request(2 << EXTENT_SHIFT, data, cookie=2), {}),
        "a write across two extents": (request((1 << EXTENT_SHIFT) - 512, data, cookie=2), {}),
        "a payload still arriving": (request(0, data, cookie=2)[:-1], {}),
        "no room in the buffer": (request(0, data, cookie=2), {"room": 4096 + 4096}),
        "a write beyond the frame bound": (request(0, data * 2, cookie=2), {"length_max": 4096}),
        "a write past the end": (request(SIZE - 2048, data, cookie=2), {}),
        "a bad magic": (b"\0" * 4 + request(0, data, cookie=2)[4:], {}),
        "a zero-length write": (request(0, b"", cookie=2), {}),
    }


@pytest.mark.parametrize("case", list(_stoppers()))
def test_a_run_stops_at_a_request_it_leaves_to_python_with_nothing_done(
    rig: Rig, case: str
) -> None:
    second, limits = _stoppers()[case]
    rig.make_hot(0)
    rig.make_hot(1 << EXTENT_SHIFT)
    rig.make_hot(2 << EXTENT_SHIFT, committed=False)
    rig.make_hot((SIZE - 1) >> EXTENT_SHIFT << EXTENT_SHIFT)
    first = request(4096, b"\x11" * 4096, cookie=1)
    # Nothing can follow a request still arriving.
    third = b"" if case == "a payload still arriving" else request(8192, b"\x22" * 4096, cookie=3)
    pos, count, nbytes, seq, gen = rig.run(first + second + third, **limits)
    assert (pos, count, nbytes, seq, gen) == (len(first), 1, 4096, 101, 8)
    assert rig.disk(0, 12288) == bytes(4096) + b"\x11" * 4096 + bytes(4096)
    assert rig.disk(2 << EXTENT_SHIFT, 4096) == bytes(4096)
    assert rig.disk(5 << EXTENT_SHIFT, 4096) == bytes(4096)
    assert len(rig.out) == 16 and len(rig.meta) == META.size
    assert rig.used == RECORD_HEADER_SIZE + 4096


def test_a_run_stops_where_the_body_is_full(rig: Rig) -> None:
    rig.make_hot(0)
    rig.body = bytearray(2 * (RECORD_HEADER_SIZE + 4096) + 100)
    buf = b"".join(request(4096 * i, bytes([i]) * 4096, cookie=i) for i in range(3))
    pos, count, *_ = rig.run(buf)
    assert (pos, count) == (2 * (p.REQUEST_HEADER.size + 4096), 2)
    assert rig.disk(8192, 4096) == bytes(4096)


def test_a_failed_pwrite_stops_the_run_and_leaves_it_to_python(tmp_path: Path) -> None:
    r = open_rig(tmp_path / "disk.img", os.O_RDONLY)  # every pwrite fails (EBADF)
    try:
        r.make_hot(0)
        assert r.run(request(0, b"x" * 512, cookie=1)) == (0, 0, 0, 100, 7)
        assert (r.used, bytes(r.meta), bytes(r.out)) == (0, b"", b"")
    finally:
        os.close(r.fd)


def test_bad_arguments_are_refused_before_anything_is_done(rig: Rig) -> None:
    rig.make_hot(0)
    buf = bytearray(request(0, b"y" * 512, cookie=1))
    limits = (1, 0, 0, 1 << 20, 1 << 20)  # seq, gen, tick, room, length_max
    body, meta = rig.body, rig.meta
    with pytest.raises(TypeError):
        rig.fast.run(buf, 0, len(buf), b"", body, 0, meta, *limits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside the buffer"):
        rig.fast.run(buf, 0, len(buf) + 1, rig.out, body, 0, meta, *limits)
    with pytest.raises(ValueError, match="outside the body"):
        rig.fast.run(buf, 0, len(buf), rig.out, body, len(body) + 1, meta, *limits)
    with pytest.raises(ValueError):
        FastWrites(fd=rig.fd, disk=1 << 16, size=SIZE, hot={}, extent_shift=16, disk_shift=48)
    assert rig.disk(0, 512) == bytes(512)


@settings(max_examples=1000, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, SIZE + 4096), st.integers(0, 9000), st.integers(0, 3)),
        max_size=8,
    ),
    damage=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 2**16),
)
def test_any_input_is_parsed_safely(
    tmp_path_factory: pytest.TempPathFactory,
    requests: list[tuple[int, int, int]],
    damage: list[tuple[int, int]],
    cut: int,
) -> None:
    """Hostile bytes (requests with any offset, length and command, then bytes flipped
    and the tail cut) never crash the run: it takes a prefix of well-formed writes, no
    more, and the disk holds exactly those."""
    r = open_rig(tmp_path_factory.mktemp("fuzz") / "disk.img")
    try:
        for extent in range(SIZE >> EXTENT_SHIFT):
            r.make_hot(extent << EXTENT_SHIFT)
        buf = bytearray(
            b"".join(
                request(offset, bytes([i + 1]) * length, cookie=i, command=command)
                for i, (offset, length, command) in enumerate(requests)
            )
        )
        for at, value in damage:
            if buf:
                buf[at % len(buf)] = value
        del buf[len(buf) - cut % (len(buf) + 1) :]
        pos, count, nbytes, seq, gen = r.run(bytes(buf), seq=1, gen=0, length_max=8192)
        # What the run must have taken: the longest prefix of plain, complete writes.
        expected = bytearray(SIZE)
        at = taken = taken_bytes = 0
        while len(buf) - at >= p.REQUEST_HEADER.size:
            magic, flags, command, _, offset, length = p.REQUEST_HEADER.unpack_from(buf, at)
            end = at + p.REQUEST_HEADER.size + length
            if (magic, flags, command) != (p.REQUEST_MAGIC, 0, p.CMD_WRITE) or not (
                0 < length <= 8192 and offset + length <= SIZE and end <= len(buf)
            ):
                break
            if offset >> EXTENT_SHIFT != (offset + length - 1) >> EXTENT_SHIFT:
                break
            expected[offset : offset + length] = buf[end - length : end]
            at, taken, taken_bytes = end, taken + 1, taken_bytes + length
        assert (pos, count, nbytes, seq, gen) == (at, taken, taken_bytes, 1 + taken, taken)
        assert r.disk(0, SIZE) == bytes(expected)
        assert r.used == taken * RECORD_HEADER_SIZE + taken_bytes and len(r.out) == 16 * taken
    finally:
        os.close(r.fd)


def test_payload_buffer_is_a_bytearray_of_the_size_asked() -> None:
    buf = _fast_writes.payload_buffer(3 * 4096 + 1)
    assert type(buf) is bytearray and len(buf) == 3 * 4096 + 1
    assert len(_fast_writes.payload_buffer(0)) == 0
    with pytest.raises(ValueError, match="negative"):
        _fast_writes.payload_buffer(-1)
