"""The journal format: round trips, corruption detection, chunking, and the written spec.

The `_raw_*` helpers build messages from the byte layouts in docs/journal-format.md,
independently of datapath.journal, so the tests also prove the document matches the code.
"""

from __future__ import annotations

import array
import logging
import os
import struct
from typing import Any

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath import journal
from datapath.journal import (
    CHUNK_MAGIC,
    FRAME_MAGIC,
    Batch,
    BatchAssembler,
    ChunkOrderError,
    CorruptRecord,
    EncodeError,
    JournalError,
    MarkerKind,
    Record,
    RecordKind,
    UnsupportedVersion,
    chunk_header_size,
    decode_batch,
    decode_frame,
    encode_batch,
    encode_frame,
    encoded_record_size,
    frame_header_size,
    peek_frame_header,
    peek_header,
)

U64_MAX = 2**64 - 1
DATA_KINDS = (RecordKind.WRITE, RecordKind.SYNC_BLOCK)
RESYNC_MARKERS = (MarkerKind.RESYNC_START, MarkerKind.RESYNC_END)

PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FLIPS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


# --- independent writer and reader, straight from docs/journal-format.md ----------------

RAW_RECORD_FIELDS = struct.Struct("<BBHIQQQQQ")
RAW_FRAME_FIXED = struct.Struct("<4sBBHQQQIIB")
RAW_CHUNK_FIXED = struct.Struct("<4sBBHQQQQQQQIIIIQQQIIB")


def _raw_record(
    kind: int,
    seq: int,
    *,
    disk: int = 0,
    offset: int = 0,
    length: int | None = None,
    ts: int = 0,
    data: bytes = b"",
    marker: int = 0,
    marker_id: int = 0,
) -> bytes:
    length = len(data) if length is None else length
    rest = (
        RAW_RECORD_FIELDS.pack(kind, marker, disk, len(data), seq, offset, length, ts, marker_id)
        + data
    )
    return struct.pack("<I", crc32c.crc32c(rest)) + rest


def _raw_frame(
    body: bytes,
    *,
    count: int,
    first_seq: int,
    last_seq: int,
    vm_id: bytes = b"vm",
    epoch: int = 1,
    version: int = 1,
    flags: int = 0,
) -> bytes:
    header_len = RAW_FRAME_FIXED.size + len(vm_id) + 4
    head = (
        RAW_FRAME_FIXED.pack(
            b"DMJF",
            version,
            flags,
            header_len,
            epoch,
            first_seq,
            last_seq,
            count,
            len(body),
            len(vm_id),
        )
        + vm_id
    )
    return head + struct.pack("<I", crc32c.crc32c(head)) + body


def _with_header_field(message: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Rewrite one header field and re-seal the header CRC, as a buggy or newer writer would."""
    buf = bytearray(message)
    struct.pack_into(fmt, buf, offset, value)
    (header_len,) = struct.unpack_from("<H", buf, 6)
    struct.pack_into("<I", buf, header_len - 4, crc32c.crc32c(bytes(buf[: header_len - 4])))
    return bytes(buf)


def _spec_read_frame(buf: bytes) -> tuple[str, int, list[tuple[Any, ...]]]:
    magic, version, flags, header_len, epoch, first, last, count, body_len, vm_len = (
        RAW_FRAME_FIXED.unpack_from(buf, 0)
    )
    assert (magic, version, flags) == (b"DMJF", 1, 0)
    assert crc32c.crc32c(buf[: header_len - 4]) == struct.unpack_from("<I", buf, header_len - 4)[0]
    vm_id = buf[RAW_FRAME_FIXED.size : RAW_FRAME_FIXED.size + vm_len].decode()
    assert len(buf) == header_len + body_len
    pos, records = header_len, []
    for _ in range(count):
        (crc,) = struct.unpack_from("<I", buf, pos)
        fields = RAW_RECORD_FIELDS.unpack_from(buf, pos + 4)
        data_len = fields[3]
        end = pos + 52 + data_len
        assert crc32c.crc32c(buf[pos + 4 : end]) == crc
        records.append((*fields, buf[pos + 52 : end]))
        pos = end
    assert pos == len(buf)
    assert records[0][4] == first and records[-1][4] == last
    return vm_id, epoch, records


# --- strategies --------------------------------------------------------------------------

u64 = st.integers(0, U64_MAX)
payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 120)),
)
vm_ids = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 255)


@st.composite
def record_lists(draw: st.DrawFn, *, min_size: int, strictly_increasing: bool) -> list[Record]:
    count = draw(st.integers(min_size, 10))
    seq = draw(st.integers(0, U64_MAX - 3 * 10))
    records = []
    for index in range(count):
        if index:
            seq += draw(st.integers(1 if strictly_increasing else 0, 3))
        kind = draw(st.sampled_from(RecordKind))
        ts = draw(u64)
        disk = draw(st.integers(0, 0xFFFF))
        if kind in DATA_KINDS:
            data = draw(payloads)
            offset = draw(st.integers(0, min(U64_MAX, 2**64 - len(data))))
            records.append(Record(kind, seq, disk, offset, len(data), ts, data))
        elif kind in (RecordKind.ZERO, RecordKind.TRIM):
            length = draw(u64)
            offset = draw(st.integers(0, min(U64_MAX, 2**64 - length)))
            records.append(Record(kind, seq, disk, offset, length, ts))
        elif kind is RecordKind.FLUSH:
            records.append(Record(kind, seq, disk, 0, 0, ts))
        else:
            marker = draw(st.sampled_from(MarkerKind))
            marker_id = draw(st.integers(1 if marker in RESYNC_MARKERS else 0, U64_MAX))
            records.append(Record(kind, seq, disk, 0, 0, ts, b"", marker, marker_id))
    return records


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    records = draw(record_lists(min_size=0, strictly_increasing=False))
    if records:
        first_seq = draw(st.integers(0, records[0].seq))
        last_seq = draw(st.integers(records[-1].seq, U64_MAX))
        stamps = [r.ts_ns for r in records]
        min_ts = draw(st.integers(0, min(stamps)))
        max_ts = draw(st.integers(max(stamps), U64_MAX))
    else:
        first_seq = draw(u64)
        last_seq = draw(st.integers(first_seq, U64_MAX))
        min_ts = draw(u64)
        max_ts = draw(st.integers(min_ts, U64_MAX))
    resync_id = draw(st.one_of(st.just(0), u64))
    return Batch(
        vm_id=draw(vm_ids),
        epoch=draw(u64),
        first_seq=first_seq,
        last_seq=last_seq,
        min_ts_ns=min_ts,
        max_ts_ns=max_ts,
        records=records,
        resync_id=resync_id,
        resync_complete=bool(resync_id) and draw(st.booleans()),
        checkpoint_id=draw(st.one_of(st.just(0), u64)),
    )


def _small_records() -> list[Record]:
    return [
        Record(RecordKind.WRITE, 10, 0, 4096, 5, 1_000, b"hello"),
        Record(RecordKind.ZERO, 11, 1, 0, 1 << 30, 1_001),
        Record(RecordKind.MARKER, 12, 0, 0, 0, 1_002, b"", MarkerKind.RESYNC_START, 7),
    ]


def _small_batch(records: list[Record] | None = None) -> Batch:
    return Batch(
        vm_id="vm-7",
        epoch=3,
        first_seq=10,
        last_seq=12,
        min_ts_ns=1_000,
        max_ts_ns=1_002,
        records=_small_records() if records is None else records,
        resync_id=7,
    )


def _big_batch(count: int = 40) -> Batch:
    records = [
        Record(RecordKind.WRITE, 100 + i, 0, i * 4096, 4096, 5_000 + i, os.urandom(4096))
        for i in range(count)
    ]
    return Batch("vm-big", 1, 100, 100 + count - 1, 5_000, 5_000 + count, records)


def _flip(message: bytes, bit: int) -> bytes:
    buf = bytearray(message)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


# --- round trips -------------------------------------------------------------------------


@PROPERTY
@given(vm_id=vm_ids, epoch=u64, records=record_lists(min_size=1, strictly_increasing=True))
def test_frame_round_trip_preserves_every_field(
    vm_id: str, epoch: int, records: list[Record]
) -> None:
    buf = encode_frame(vm_id, epoch, records)
    frame = decode_frame(buf)
    assert (frame.vm_id, frame.epoch, frame.records) == (vm_id, epoch, records)
    assert (frame.first_seq, frame.last_seq) == (records[0].seq, records[-1].seq)
    assert len(buf) == frame_header_size(vm_id) + sum(encoded_record_size(r) for r in records)
    header = peek_frame_header(buf)
    assert (header.vm_id, header.epoch, header.record_count) == (vm_id, epoch, len(records))
    assert (header.first_seq, header.last_seq) == (records[0].seq, records[-1].seq)


@PROPERTY
@given(batch=batches(), room=st.integers(1, 3000), compress=st.booleans())
def test_batch_round_trip_across_random_chunk_limits(
    batch: Batch, room: int, compress: bool
) -> None:
    limit = chunk_header_size(batch.vm_id) + room
    messages = encode_batch(batch, max_message_bytes=limit, compress=compress)
    assert messages
    assert all(len(m) <= limit for m in messages)
    assert decode_batch(messages) == batch
    for index, message in enumerate(messages):
        header = peek_header(message, verify_piece=True)
        assert (header.chunk_index, header.chunk_count) == (index, len(messages))
        assert (header.vm_id, header.epoch) == (batch.vm_id, batch.epoch)
        assert (header.first_seq, header.last_seq) == (batch.first_seq, batch.last_seq)
        assert (header.resync_id, header.resync_complete) == (
            batch.resync_id,
            batch.resync_complete,
        )


def test_decoded_write_data_is_a_view_into_the_frame() -> None:
    buf = encode_frame("vm", 1, _small_records())
    data = decode_frame(buf).records[0].data
    assert isinstance(data, memoryview)
    assert data.obj is buf
    assert bytes(data) == b"hello"


def test_single_chunk_raw_batch_data_is_a_view_into_the_message() -> None:
    batch = _small_batch()
    (message,) = encode_batch(batch, compress=False)
    data = decode_batch([message]).records[0].data
    assert isinstance(data, memoryview)
    assert data.obj is message


def test_memoryview_payloads_of_any_format_encode_as_their_bytes() -> None:
    words = array.array("I", [1, 2, 3, 4])
    record = Record(RecordKind.WRITE, 1, 0, 0, 16, 0, memoryview(words))
    decoded = decode_frame(encode_frame("vm", 1, [record])).records[0]
    assert decoded.data == words.tobytes()


def test_vm_id_of_255_utf8_bytes_round_trips() -> None:
    vm_id = "é" * 127 + "x"  # 255 bytes
    assert decode_frame(encode_frame(vm_id, 1, _small_records())).vm_id == vm_id
    assert decode_batch(encode_batch(_small_batch())).vm_id == "vm-7"


def test_compressible_batches_are_compressed_and_random_ones_stored_raw() -> None:
    zeros = Record(RecordKind.WRITE, 1, 0, 0, 65536, 0, bytes(65536))
    noise = Record(RecordKind.WRITE, 1, 0, 0, 65536, 0, os.urandom(65536))
    for record, compressed in ((zeros, True), (noise, False)):
        batch = Batch("vm", 1, 1, 1, 0, 0, [record])
        (message,) = encode_batch(batch)
        assert peek_header(message).compressed is compressed
        assert decode_batch([message]) == batch
    (zeros_message,) = encode_batch(Batch("vm", 1, 1, 1, 0, 0, [zeros]))
    assert len(zeros_message) < 1000


# --- corruption: bit flips, truncation, garbage --------------------------------------------


def test_every_bit_flip_in_a_small_frame_is_detected() -> None:
    buf = encode_frame("vm-1", 9, _small_records())
    for bit in range(len(buf) * 8):
        with pytest.raises(JournalError):
            decode_frame(_flip(buf, bit))


@pytest.mark.parametrize("compress", [True, False])
def test_every_bit_flip_in_a_small_batch_chunk_is_detected(compress: bool) -> None:
    records = [*_small_records(), Record(RecordKind.WRITE, 12, 0, 0, 64, 1_002, b"ab" * 32)]
    (message,) = encode_batch(_small_batch(records), compress=compress)
    assert peek_header(message).compressed is compress
    for bit in range(len(message) * 8):
        with pytest.raises(JournalError):
            decode_batch([_flip(message, bit)])


@FLIPS
@given(
    records=record_lists(min_size=1, strictly_increasing=True),
    position=st.floats(0, 1, exclude_max=True),
)
def test_sampled_bit_flips_in_frames_are_detected(records: list[Record], position: float) -> None:
    buf = encode_frame("vm-x", 2, records)
    with pytest.raises(JournalError):
        decode_frame(_flip(buf, int(position * len(buf) * 8)))


@FLIPS
@given(
    batch=batches(),
    room=st.integers(50, 800),
    chunk=st.floats(0, 1, exclude_max=True),
    position=st.floats(0, 1, exclude_max=True),
)
def test_sampled_bit_flips_in_batch_chunks_are_detected(
    batch: Batch, room: int, chunk: float, position: float
) -> None:
    messages = encode_batch(batch, max_message_bytes=chunk_header_size(batch.vm_id) + room)
    target = int(chunk * len(messages))
    bit = int(position * len(messages[target]) * 8)
    messages[target] = _flip(messages[target], bit)
    with pytest.raises(JournalError):
        decode_batch(messages)
    with pytest.raises(JournalError):
        peek_header(messages[target], verify_piece=True)


def test_every_truncation_of_a_frame_is_detected() -> None:
    buf = encode_frame("vm-1", 9, _small_records())
    for size in range(len(buf)):
        with pytest.raises(JournalError):
            decode_frame(buf[:size])
        with pytest.raises(JournalError):
            peek_frame_header(buf[:size])


def test_every_truncation_of_a_batch_chunk_is_detected() -> None:
    (message,) = encode_batch(_small_batch())
    for size in range(len(message)):
        with pytest.raises(JournalError):
            decode_batch([message[:size]])
        with pytest.raises(JournalError):
            peek_header(message[:size])


def test_concatenated_frames_and_trailing_garbage_are_rejected() -> None:
    buf = encode_frame("vm-1", 9, _small_records())
    for bad in (buf + buf, buf + b"\x00", buf + os.urandom(100)):
        with pytest.raises(CorruptRecord, match="trailing bytes"):
            decode_frame(bad)
    (message,) = encode_batch(_small_batch())
    with pytest.raises(CorruptRecord, match="trailing bytes"):
        decode_batch([message + message])


@PROPERTY
@given(garbage=st.binary(max_size=400), prefix=st.sampled_from([b"", FRAME_MAGIC, CHUNK_MAGIC]))
def test_random_garbage_is_rejected_by_every_reader(garbage: bytes, prefix: bytes) -> None:
    data = prefix + garbage
    with pytest.raises(JournalError):
        decode_frame(data)
    with pytest.raises(JournalError):
        peek_frame_header(data)
    with pytest.raises(JournalError):
        decode_batch([data])
    with pytest.raises(JournalError):
        peek_header(data)


def test_a_frame_is_not_mistaken_for_a_batch_chunk_or_vice_versa() -> None:
    frame = encode_frame("vm", 1, _small_records())
    (chunk,) = encode_batch(_small_batch())
    with pytest.raises(CorruptRecord, match="bad magic"):
        decode_batch([frame])
    with pytest.raises(CorruptRecord, match="bad magic"):
        decode_frame(chunk)


def test_corruption_error_names_the_record_and_byte_offset() -> None:
    records = _small_records()
    buf = encode_frame("vm", 1, records)
    second = frame_header_size("vm") + encoded_record_size(records[0])
    with pytest.raises(CorruptRecord) as caught:
        decode_frame(_flip(buf, (second + 20) * 8))
    assert caught.value.record_index == 1
    assert caught.value.offset == second
    assert "record CRC32C mismatch" in str(caught.value)
    assert f"record #1, byte offset {second}" in str(caught.value)
    with pytest.raises(CorruptRecord, match="header CRC32C mismatch"):
        decode_frame(_flip(buf, 8 * 8))


# --- versioning ----------------------------------------------------------------------------


def test_intact_header_of_a_newer_version_is_unsupported_not_corrupt() -> None:
    buf = encode_frame("vm", 1, _small_records())
    (message,) = encode_batch(_small_batch())
    for reader, original in ((decode_frame, buf), (lambda m: decode_batch([m]), message)):
        with pytest.raises(UnsupportedVersion, match="version 2"):
            reader(_with_header_field(original, 4, "<B", 2))
        with pytest.raises(CorruptRecord, match="header CRC32C"):
            reader(_flip(original, 4 * 8 + 1))  # version byte changed, header CRC not resealed


def test_newer_version_with_a_longer_header_is_still_recognised() -> None:
    # A future version may append header fields: the prefix and trailing CRC still work.
    head = struct.pack("<4sBBH", b"DMJF", 2, 0, 100) + bytes(88)
    message = head + struct.pack("<I", crc32c.crc32c(head)) + b"future body"
    with pytest.raises(UnsupportedVersion):
        decode_frame(message)


# --- decoder validation of CRC-intact but invalid content -----------------------------------


@pytest.mark.parametrize(
    ("records", "first", "last", "message"),
    [
        ([_raw_record(9, 1)], 1, 1, "unknown record kind 9"),
        ([_raw_record(RecordKind.ZERO, 1, length=8, data=b"x" * 8)], 1, 1, "no data"),
        ([_raw_record(RecordKind.WRITE, 1, data=b"abc", length=4)], 1, 1, "length is 4"),
        ([_raw_record(RecordKind.FLUSH, 1, offset=512)], 1, 1, "offset 0 and length 0"),
        ([_raw_record(RecordKind.TRIM, 1, offset=2**63, length=2**63 + 1)], 1, 1, "overflows u64"),
        ([_raw_record(RecordKind.MARKER, 1)], 1, 1, "marker kind"),
        ([_raw_record(RecordKind.MARKER, 1, marker=1)], 1, 1, "non-zero marker_id"),
        ([_raw_record(RecordKind.ZERO, 1, marker=1, marker_id=3)], 1, 1, "no marker"),
        ([_raw_record(RecordKind.FLUSH, 5), _raw_record(RecordKind.FLUSH, 5)], 5, 5, "strictly"),
        ([_raw_record(RecordKind.FLUSH, 6), _raw_record(RecordKind.FLUSH, 5)], 5, 6, "strictly"),
        ([_raw_record(RecordKind.FLUSH, 6)], 5, 5, "outside the header's range"),
        (
            [_raw_record(RecordKind.FLUSH, 5), _raw_record(RecordKind.FLUSH, 6)],
            5,
            7,
            "records hold",
        ),
    ],
)
def test_decoder_rejects_records_that_break_the_rules(
    records: list[bytes], first: int, last: int, message: str
) -> None:
    frame = _raw_frame(b"".join(records), count=len(records), first_seq=first, last_seq=last)
    with pytest.raises(CorruptRecord, match=message):
        decode_frame(frame)


def test_decoder_rejects_frame_headers_that_break_the_rules() -> None:
    body = _raw_record(RecordKind.FLUSH, 1)
    good = _raw_frame(body, count=1, first_seq=1, last_seq=1)
    assert decode_frame(good).records == [Record(RecordKind.FLUSH, 1, 0, 0, 0, 0)]
    cases = {
        "unknown flags": _raw_frame(body, count=1, first_seq=1, last_seq=1, flags=4),
        "not UTF-8": _raw_frame(body, count=1, first_seq=1, last_seq=1, vm_id=b"\xff\xfe"),
        "vm_id length 0": _raw_frame(body, count=1, first_seq=1, last_seq=1, vm_id=b""),
        "0 records": _raw_frame(b"", count=0, first_seq=1, last_seq=1),
        "record header needs": _raw_frame(body, count=2, first_seq=1, last_seq=1),
        "bytes after": _raw_frame(body + body, count=1, first_seq=1, last_seq=1),
    }
    for expected, frame in cases.items():
        with pytest.raises(CorruptRecord, match=expected):
            decode_frame(frame)


def test_decoder_rejects_batch_headers_that_break_the_rules() -> None:
    (message,) = encode_batch(_small_batch(), compress=False)
    cases = {
        "first_seq 99 > last_seq": (16, "<Q", 99),  # first_seq
        "outside the header's range": (32, "<Q", 1_001),  # min_ts_ns above a record's ts
        "chunk index 1 not below": (68, "<I", 1),  # chunk_index
        "unknown flags": (5, "<B", 0x80),
        "uncompressed stream": (80, "<Q", 1),  # payload_len
    }
    for expected, (offset, fmt, value) in cases.items():
        with pytest.raises(CorruptRecord, match=expected):
            decode_batch([_with_header_field(message, offset, fmt, value)])


def test_a_batch_claiming_more_than_the_payload_limit_is_refused_before_decompressing() -> None:
    zeros = Record(RecordKind.WRITE, 1, 0, 0, 65536, 0, bytes(65536))
    (message,) = encode_batch(Batch("vm", 1, 1, 1, 0, 0, [zeros]))
    assert peek_header(message).compressed
    # A few bytes of zstd can stand for terabytes: the header's size is checked first.
    bomb = _with_header_field(message, 80, "<Q", 2**40)  # payload_len
    with pytest.raises(CorruptRecord, match="over the limit"):
        decode_batch([bomb])
    with pytest.raises(CorruptRecord, match="over the limit"):
        BatchAssembler().add(bomb)


def test_the_encoder_refuses_a_batch_over_the_payload_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(journal, "MAX_BATCH_PAYLOAD_BYTES", 4096)
    big = Record(RecordKind.WRITE, 1, 0, 0, 8192, 0, bytes(8192))
    with pytest.raises(EncodeError, match="limit"):
        encode_batch(Batch("vm", 1, 1, 1, 0, 0, [big]))


def test_spec_reader_decodes_what_the_encoder_writes() -> None:
    records = _small_records()
    vm_id, epoch, raw = _spec_read_frame(encode_frame("vm-ß", 42, records))
    assert (vm_id, epoch) == ("vm-ß", 42)
    for record, fields in zip(records, raw, strict=True):
        kind, marker, disk, _data_len, seq, offset, length, ts, marker_id, data = fields
        assert (kind, marker, disk, seq, offset, length, ts, marker_id, data) == (
            record.kind,
            record.marker or 0,
            record.disk,
            record.seq,
            record.offset,
            record.length,
            record.ts_ns,
            record.marker_id,
            record.data,
        )
    batch = _small_batch()
    (message,) = encode_batch(batch, compress=False)
    chunk = RAW_CHUNK_FIXED.unpack_from(message, 0)
    (magic, version, flags, header_len, epoch, first, last, min_ts, max_ts, resync_id) = chunk[:10]
    (checkpoint, count, index, chunks, total_crc, payload_len, stored_len) = chunk[10:17]
    (piece_offset, piece_len, piece_crc, vm_len) = chunk[17:]
    assert (magic, version, flags) == (b"DMJB", 1, 0)
    assert header_len == RAW_CHUNK_FIXED.size + vm_len + 4 == chunk_header_size("vm-7")
    assert message[RAW_CHUNK_FIXED.size : RAW_CHUNK_FIXED.size + vm_len] == b"vm-7"
    assert (epoch, first, last, min_ts, max_ts) == (3, 10, 12, 1_000, 1_002)
    assert (resync_id, checkpoint, count, index, chunks) == (7, 0, 3, 0, 1)
    payload = message[header_len:]
    assert piece_offset == 0
    assert piece_len == stored_len == payload_len == len(payload)
    assert crc32c.crc32c(payload) == piece_crc == total_crc
    assert payload == b"".join(_raw_record_of(r) for r in batch.records)


def _raw_record_of(record: Record) -> bytes:
    return _raw_record(
        record.kind,
        record.seq,
        disk=record.disk,
        offset=record.offset,
        length=record.length,
        ts=record.ts_ns,
        data=bytes(record.data),
        marker=record.marker or 0,
        marker_id=record.marker_id,
    )


# --- encoder validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "at least one record"),
        (
            [Record(RecordKind.FLUSH, 2, 0, 0, 0, 0), Record(RecordKind.FLUSH, 2, 0, 0, 0, 0)],
            "strictly",
        ),
        ([Record(RecordKind.WRITE, 1, 0, 0, 5, 0, b"abc")], "length is 5"),
        ([Record(RecordKind.ZERO, 1, 0, 0, 3, 0, b"abc")], "no data"),
        ([Record(RecordKind.TRIM, 1, 0, U64_MAX, 2, 0)], "overflows u64"),
        ([Record(RecordKind.WRITE, 1, 0, 0, 3, 0, b"abc", MarkerKind.EPOCH_START)], "no marker"),
        ([Record(RecordKind.MARKER, 1, 0, 0, 0, 0, b"", MarkerKind.RESYNC_END)], "non-zero"),
        ([Record(RecordKind.FLUSH, -1, 0, 0, 0, 0)], "out of range"),
        ([Record(RecordKind.FLUSH, 1, 70_000, 0, 0, 0)], "out of range"),
        ([Record(RecordKind.FLUSH, 2**64, 0, 0, 0, 0)], "out of range"),
    ],
)
def test_encoder_rejects_what_the_format_cannot_carry(records: list[Record], message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        encode_frame("vm", 1, records)


def test_encoder_rejects_bad_vm_ids_and_batch_fields() -> None:
    for vm_id in ("", "x" * 256, "é" * 128):
        with pytest.raises(EncodeError, match="vm_id"):
            encode_frame(vm_id, 1, _small_records())
    base = _small_batch()
    bad = {
        "first_seq": Batch("vm", 1, 13, 12, 1_000, 1_002, base.records),
        "min_ts_ns": Batch("vm", 1, 10, 12, 1_003, 1_002, []),
        "non-zero resync_id": Batch("vm", 1, 10, 12, 0, 0, [], resync_complete=True),
        "non-decreasing": Batch("vm", 1, 11, 12, 1_000, 1_002, base.records),
        "ts_ns": Batch("vm", 1, 10, 12, 1_001, 1_002, base.records),
        "epoch": Batch("vm", -1, 10, 12, 1_000, 1_002, []),
    }
    for message, batch in bad.items():
        with pytest.raises(EncodeError, match=message):
            encode_batch(batch)
    with pytest.raises(EncodeError, match="no room"):
        encode_batch(base, max_message_bytes=chunk_header_size("vm-7"))


# --- chunking and reassembly --------------------------------------------------------------------


def test_large_batch_splits_within_the_limit_and_reassembles() -> None:
    batch = _big_batch()
    messages = encode_batch(batch, max_message_bytes=20_000)
    assert len(messages) > 5
    assert all(len(m) <= 20_000 for m in messages)
    assembler = BatchAssembler()
    results = [assembler.add(m) for m in messages]
    assert results[:-1] == [None] * (len(messages) - 1)
    assert results[-1] == batch
    assert assembler.pending is None


def test_out_of_order_chunk_raises_and_the_assembler_recovers() -> None:
    first = encode_batch(_big_batch(), max_message_bytes=40_000)
    assembler = BatchAssembler()
    assembler.add(first[0])
    with pytest.raises(ChunkOrderError, match="chunk 1 was expected"):
        assembler.add(first[2])
    assert assembler.pending is None
    with pytest.raises(ChunkOrderError, match="without its first chunk"):
        assembler.add(first[1])
    results = [assembler.add(m) for m in first]
    assert results[-1] == decode_batch(first)


def test_missing_chunk_is_reported_as_incomplete() -> None:
    messages = encode_batch(_big_batch(), max_message_bytes=40_000)
    with pytest.raises(ChunkOrderError, match=f"incomplete: {len(messages) - 1} of"):
        decode_batch(messages[:-1])
    with pytest.raises(ChunkOrderError, match="chunk 1 was expected"):
        decode_batch([messages[0], *messages[2:]])
    with pytest.raises(ChunkOrderError, match="no batch chunks"):
        decode_batch([])


def test_duplicate_chunks_are_ignored() -> None:
    batch = _big_batch()
    messages = encode_batch(batch, max_message_bytes=40_000)
    redelivered = [messages[0], messages[0], messages[1], messages[0], messages[1], *messages[2:]]
    assert decode_batch(redelivered) == batch


def test_conflicting_chunk_with_a_taken_index_raises() -> None:
    batch = _big_batch()
    messages = encode_batch(batch, max_message_bytes=40_000)
    assembler = BatchAssembler()
    assembler.add(messages[0])
    assembler.add(messages[1])
    forged = bytearray(messages[1])
    forged[-1] ^= 0xFF  # same batch and index, different piece, both CRCs re-sealed
    piece_crc = crc32c.crc32c(bytes(forged[chunk_header_size(batch.vm_id) :]))
    with pytest.raises(ChunkOrderError, match="conflicts"):
        assembler.add(_with_header_field(bytes(forged), 108, "<I", piece_crc))


def test_new_batch_start_drops_an_unfinished_one_and_assembles(
    caplog: pytest.LogCaptureFixture,
) -> None:
    abandoned = encode_batch(_big_batch(), max_message_bytes=40_000)
    replacement = encode_batch(_big_batch(), max_message_bytes=40_000)  # new random data
    assembler = BatchAssembler()
    assembler.add(abandoned[0])
    assembler.add(abandoned[1])
    with caplog.at_level(logging.WARNING, logger="datapath.journal"):
        results = [assembler.add(m) for m in replacement]
    assert results[-1] == decode_batch(replacement)
    assert assembler.discarded_batches == 1
    assert "dropping incomplete batch" in caplog.text
    with pytest.raises(ChunkOrderError, match="before the previous one was complete"):
        decode_batch([abandoned[0], *replacement])


def test_chunk_of_another_batch_mid_assembly_raises() -> None:
    one = encode_batch(_big_batch(), max_message_bytes=40_000)
    other = encode_batch(_big_batch(), max_message_bytes=40_000)
    assembler = BatchAssembler()
    assembler.add(one[0])
    with pytest.raises(ChunkOrderError, match="was incomplete"):
        assembler.add(other[1])


def test_corrupt_chunk_leaves_the_partial_batch_for_a_redelivery() -> None:
    batch = _big_batch()
    messages = encode_batch(batch, max_message_bytes=40_000)
    assembler = BatchAssembler()
    assembler.add(messages[0])
    with pytest.raises(CorruptRecord, match="piece CRC32C mismatch"):
        assembler.add(_flip(messages[1], len(messages[1]) * 8 - 3))
    results = [assembler.add(m) for m in messages[1:]]
    assert results[-1] == batch


def test_extra_message_after_a_complete_batch_is_rejected() -> None:
    (message,) = encode_batch(_small_batch())
    with pytest.raises(ChunkOrderError, match="follows a complete batch"):
        decode_batch([message, message])


def test_peek_reads_the_header_without_touching_the_payload() -> None:
    messages = encode_batch(_big_batch(), max_message_bytes=40_000)
    damaged = _flip(messages[2], len(messages[2]) * 8 - 1)
    header = peek_header(damaged)
    assert (header.vm_id, header.first_seq, header.last_seq) == ("vm-big", 100, 139)
    assert (header.chunk_index, header.chunk_count) == (2, len(messages))
    assert not header.is_first and not header.is_last
    with pytest.raises(CorruptRecord, match="piece CRC32C"):
        peek_header(damaged, verify_piece=True)


def test_zstd_content_size_that_disagrees_with_the_header_is_rejected() -> None:
    zeros = Record(RecordKind.WRITE, 1, 0, 0, 8192, 0, bytes(8192))
    (message,) = encode_batch(Batch("vm", 1, 1, 1, 0, 0, [zeros]))
    assert peek_header(message).compressed
    with pytest.raises(CorruptRecord, match="zstd frame holds"):
        decode_batch([_with_header_field(message, 80, "<Q", 8192 + 52 + 1)])


def test_known_frame_encodes_to_the_documented_bytes() -> None:
    # The worked example in docs/journal-format.md: a silent layout change breaks readers
    # written in other languages, so it must break this test first.
    expected = bytes.fromhex(
        "444d4a460100310003000000000000000a000000000000000a00000000000000010000003900000004"
        "766d2d313bf09596ae6ffdc801000000050000000a000000000000000010000000000000050000000000"
        "0000e803000000000000000000000000000068656c6c6f"
    )
    record = Record(RecordKind.WRITE, 10, 0, 4096, 5, 1000, b"hello")
    assert encode_frame("vm-1", 3, [record]) == expected
    assert decode_frame(expected).records == [record]
