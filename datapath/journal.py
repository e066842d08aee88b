"""The journal format: the binary contract between the tap, receiver, transceiver and applier.

Two message types travel on Kafka:

* a **frame** (magic ``DMJF``): what the tap publishes, one Kafka message per frame, a
  header plus uncompressed records of one VM;
* a **batch chunk** (magic ``DMJB``): what the receiver publishes, a consistency batch of
  folded records, zstd-compressed, split into one or more self-describing chunks.

Both share one record encoding and one header prefix (magic, version, flags, header
length), and every header ends with a CRC32C of itself, so a reader can verify a header
before trusting any field in it, even a header of a version it does not know.
``docs/journal-format.md`` is the byte-level specification; this module is its only
implementation in the product.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c as _crc32c
import zstandard

__all__ = [
    "CHUNK_MAGIC",
    "DATA_KINDS",
    "FORMAT_VERSION",
    "FRAME_MAGIC",
    "MAX_BATCH_PAYLOAD_BYTES",
    "RANGE_KINDS",
    "RECORD_HEADER_SIZE",
    "ZEROING_KINDS",
    "Batch",
    "BatchAssembler",
    "ChunkHeader",
    "ChunkOrderError",
    "CorruptRecord",
    "EncodeError",
    "Frame",
    "FrameHeader",
    "JournalError",
    "MarkerKind",
    "Record",
    "RecordKind",
    "UnsupportedVersion",
    "chunk_header_size",
    "decode_batch",
    "decode_frame",
    "encode_batch",
    "encode_frame",
    "encode_frame_body",
    "encode_record_header",
    "encoded_record_size",
    "frame_header_size",
    "peek_frame_header",
    "peek_header",
]

logger = logging.getLogger(__name__)

_crc = _crc32c.crc32c

FRAME_MAGIC = b"DMJF"
CHUNK_MAGIC = b"DMJB"
FORMAT_VERSION = 1

_U64_LIMIT = 1 << 64
_U32_LIMIT = 1 << 32
_VM_ID_MAX_BYTES = 255

# Every message starts with this prefix in every version, so any reader can find the
# header's end (its CRC is always the last 4 bytes of the header) before it knows the layout.
_PREFIX = struct.Struct("<4sBBH")  # magic, version, flags, header_len
_U32 = struct.Struct("<I")

# Record: crc32c, kind, marker, disk, data_len, seq, offset, length, ts_ns, marker_id, data.
# The CRC comes first so that it covers one contiguous range: the rest of the record.
_RECORD = struct.Struct("<IBBHIQQQQQ")
_RECORD_FIELDS = struct.Struct("<BBHIQQQQQ")
RECORD_HEADER_SIZE = _RECORD.size  # 52

# A batch's records, uncompressed, take at most this much. A reader holds a whole batch
# in memory (decompressed), and a chunk's header names the size before anything is
# decompressed: a larger one is refused as corrupt, so that a few bytes of zstd cannot
# make a reader allocate gigabytes.
MAX_BATCH_PAYLOAD_BYTES = 256 * 1024 * 1024

# Frame header (v1): prefix, epoch, first_seq, last_seq, record_count, body_len, vm_id_len,
# then vm_id bytes, then header crc32c.
_FRAME_FIXED = struct.Struct("<4sBBHQQQIIB")  # 41 bytes

# Chunk header (v1): prefix, epoch, first_seq, last_seq, min_ts_ns, max_ts_ns, resync_id,
# checkpoint_id, record_count, chunk_index, chunk_count, total_crc, payload_len, stored_len,
# piece_offset, piece_len, piece_crc, vm_id_len, then vm_id bytes, then header crc32c.
_CHUNK_FIXED = struct.Struct("<4sBBHQQQQQQQIIIIQQQIIB")  # 113 bytes

_CHUNK_FLAG_ZSTD = 0x01
_CHUNK_FLAG_RESYNC_COMPLETE = 0x02
_CHUNK_KNOWN_FLAGS = _CHUNK_FLAG_ZSTD | _CHUNK_FLAG_RESYNC_COMPLETE


class RecordKind(enum.IntEnum):
    WRITE = 1
    ZERO = 2
    TRIM = 3
    FLUSH = 4
    SYNC_BLOCK = 5
    MARKER = 6


class MarkerKind(enum.IntEnum):
    RESYNC_START = 1  # brackets a resync (initial full sync or after outage/crash)
    RESYNC_END = 2
    EPOCH_START = 3  # a tap (re)start with a new epoch
    # The tap wrote nothing for a while: everything numbered before this was published
    # by its ts_ns, so a target that applied it is complete as of then (bounds the RPO).
    HEARTBEAT = 4


_KIND_BY_CODE: dict[int, RecordKind] = {k.value: k for k in RecordKind}
_MARKER_BY_CODE: dict[int, MarkerKind] = {m.value: m for m in MarkerKind}
# The record-kind groupings every stage shares; defined once here, with the format.
# Kinds that carry data (length == len(data)).
DATA_KINDS = frozenset({RecordKind.WRITE, RecordKind.SYNC_BLOCK})
# Kinds that make a disk range read as zeros and carry no data.
ZEROING_KINDS = frozenset({RecordKind.ZERO, RecordKind.TRIM})
# Kinds that address a disk range and set its whole content (data or zeros); the others
# (FLUSH, MARKER) have offset 0, length 0 and change no byte.
RANGE_KINDS = DATA_KINDS | ZEROING_KINDS
_RESYNC_MARKERS = frozenset({MarkerKind.RESYNC_START, MarkerKind.RESYNC_END})


class JournalError(ValueError):
    """Base of every journal error; the message says what failed and where."""

    def __init__(
        self, message: str, *, offset: int | None = None, record_index: int | None = None
    ) -> None:
        where = []
        if record_index is not None:
            where.append(f"record #{record_index}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{message} (at {', '.join(where)})" if where else message)
        self.offset = offset
        self.record_index = record_index


class CorruptRecord(JournalError):
    """Bytes that are not a valid message: CRC mismatch, bad magic, bad lengths, truncation."""


class UnsupportedVersion(JournalError):
    """An intact header of a format version this reader does not know."""


class EncodeError(JournalError):
    """The encoder was given something the format cannot carry."""


class ChunkOrderError(JournalError):
    """Batch chunks that cannot be assembled: missing, out of order or conflicting."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: RecordKind
    seq: int  # u64, the VM's gapless sequence number
    disk: int  # u16, index of the disk within the VM
    offset: int  # u64 byte offset on that disk (0 for FLUSH/MARKER)
    length: int  # u64 byte length (== len(data) for WRITE/SYNC_BLOCK, at most u32 then)
    ts_ns: int  # u64 source timestamp, time.time_ns() when the tap acknowledged it
    data: bytes | memoryview = b""  # payload for WRITE and SYNC_BLOCK only
    marker: MarkerKind | None = None  # for MARKER only
    marker_id: int = 0  # u64 id pairing RESYNC_START/RESYNC_END


_WRITE = RecordKind.WRITE
# Record's field setters, in field order: building a record through them costs half of the
# frozen dataclass __init__ (the decoder here and the tap's write path build one per write).
RECORD_SLOT_SETTERS = tuple(
    getattr(Record, name).__set__
    for name in ("kind", "seq", "disk", "offset", "length", "ts_ns", "data", "marker", "marker_id")
)


@dataclass(frozen=True, slots=True)
class Frame:
    """What the tap publishes: one Kafka message is one frame of one VM's records."""

    vm_id: str
    epoch: int
    records: list[Record]

    @property
    def first_seq(self) -> int:
        return self.records[0].seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq


@dataclass(frozen=True, slots=True)
class Batch:
    """What the receiver produces: a consistency batch of folded records.

    ``first_seq..last_seq`` is the sequence range the batch covers; the records inside
    are a folded subset in non-decreasing seq order (a write split by folding keeps its
    seq, so equal seqs may repeat).
    """

    vm_id: str
    epoch: int
    first_seq: int
    last_seq: int
    min_ts_ns: int
    max_ts_ns: int
    records: list[Record]
    resync_id: int = 0  # non-zero: this batch is part of resync bracket N
    resync_complete: bool = False  # True on the batch that closes the bracket
    checkpoint_id: int = 0  # non-zero: the batch ends at group-consistency checkpoint N


@dataclass(frozen=True, slots=True)
class FrameHeader:
    vm_id: str
    epoch: int
    first_seq: int
    last_seq: int
    record_count: int
    body_len: int
    header_len: int


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """Everything a chunk says about itself and its batch, read without decompressing."""

    vm_id: str
    epoch: int
    first_seq: int
    last_seq: int
    min_ts_ns: int
    max_ts_ns: int
    resync_id: int
    resync_complete: bool
    checkpoint_id: int
    compressed: bool
    record_count: int
    chunk_index: int
    chunk_count: int
    total_crc: int  # CRC32C of the whole uncompressed payload
    payload_len: int  # uncompressed payload bytes (all records)
    stored_len: int  # stored stream bytes (compressed or not) across all chunks
    piece_offset: int  # where this chunk's piece starts in the stored stream
    piece_len: int
    piece_crc: int
    header_len: int

    @property
    def is_first(self) -> bool:
        return self.chunk_index == 0

    @property
    def is_last(self) -> bool:
        return self.chunk_index == self.chunk_count - 1

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Identifies one encoding of one batch: equal for all of its chunks."""
        return (
            self.vm_id,
            self.epoch,
            self.first_seq,
            self.last_seq,
            self.min_ts_ns,
            self.max_ts_ns,
            self.resync_id,
            self.resync_complete,
            self.checkpoint_id,
            self.compressed,
            self.record_count,
            self.chunk_count,
            self.total_crc,
            self.payload_len,
            self.stored_len,
        )


# ---------------------------------------------------------------------------------------
# Records


def _record_problem(
    code: int,
    kind: RecordKind | None,
    marker_code: int,
    offset: int,
    length: int,
    data_len: int,
    marker_id: int,
) -> str | None:
    """The one set of record rules, shared by encoder and decoder; None when valid."""
    if kind is None:
        return f"unknown record kind {code}"
    if kind in DATA_KINDS:
        if data_len != length:
            return f"{kind.name} carries {data_len} data bytes but its length is {length}"
    elif data_len:
        return f"{kind.name} must carry no data, has {data_len} bytes"
    if kind in RANGE_KINDS:
        if offset + length > _U64_LIMIT:
            return f"offset {offset} + length {length} overflows u64"
    elif offset or length:
        return f"{kind.name} must have offset 0 and length 0, has {offset} and {length}"
    if kind is RecordKind.MARKER:
        marker = _MARKER_BY_CODE.get(marker_code)
        if marker is None:
            return f"MARKER needs a known marker kind, has {marker_code}"
        if marker in _RESYNC_MARKERS and marker_id == 0:
            return f"{marker.name} needs a non-zero marker_id"
    elif marker_code or marker_id:
        return f"{kind.name} must have no marker, has marker {marker_code} id {marker_id}"
    return None


def _encode_record(parts: list[bytes | memoryview], rec: Record, index: int) -> int:
    """Append one record's wire parts to ``parts``; return the bytes appended."""
    data = rec.data
    parts.append(
        encode_record_header(
            rec.kind,
            rec.seq,
            rec.disk,
            rec.offset,
            rec.length,
            rec.ts_ns,
            data,
            rec.marker,
            rec.marker_id,
            record_index=index,
        )
    )
    data_len = data.nbytes if type(data) is memoryview else len(data)
    if data_len:
        parts.append(data)
    return RECORD_HEADER_SIZE + data_len


def encode_record_header(
    kind: RecordKind,
    seq: int,
    disk: int,
    offset: int,
    length: int,
    ts_ns: int,
    data: bytes | bytearray | memoryview = b"",
    marker: MarkerKind | None = None,
    marker_id: int = 0,
    *,
    record_index: int | None = None,
) -> bytes:
    """The RECORD_HEADER_SIZE bytes that precede a record's data on the wire (their CRC
    covers the data too): a record is this header, then ``data``.

    For writers that lay records out back to back as they come (the tap), then wrap them
    with `encode_frame_body`; `encode_frame` does both for a list of Records."""
    data_len = data.nbytes if type(data) is memoryview else len(data)
    marker_code = 0 if marker is None else int(marker)
    # Fast path for the common record (a plain write); anything else gets the full rules.
    if not (
        kind is RecordKind.WRITE
        and marker_code == 0
        and marker_id == 0
        and data_len == length
        and offset + length <= _U64_LIMIT
    ):
        problem = _record_problem(
            kind, _KIND_BY_CODE.get(kind), marker_code, offset, length, data_len, marker_id
        )
        if problem is not None:
            raise EncodeError(f"invalid record: {problem}", record_index=record_index)
    try:
        fields = _RECORD_FIELDS.pack(
            kind, marker_code, disk, data_len, seq, offset, length, ts_ns, marker_id
        )
    except struct.error as exc:
        raise EncodeError(f"record field out of range: {exc}", record_index=record_index) from exc
    crc = _crc(data, _crc(fields)) if data_len else _crc(fields)
    return _U32.pack(crc) + fields


def encoded_record_size(record: Record) -> int:
    """Bytes ``record`` takes on the wire (header plus data), for sizing frames."""
    data = record.data
    return RECORD_HEADER_SIZE + (data.nbytes if type(data) is memoryview else len(data))


def _decode_records(
    mv: memoryview,
    pos: int,
    end: int,
    count: int,
    *,
    what: str,
    min_seq: int,
    max_seq: int,
    strictly_increasing: bool,
    min_ts: int = 0,
    max_ts: int = _U64_LIMIT - 1,
) -> list[Record]:
    """Decode ``count`` records from ``mv[pos:end]``, which they must fill exactly."""
    records: list[Record] = []
    append = records.append
    unpack_from = _RECORD.unpack_from
    kinds = _KIND_BY_CODE
    markers = _MARKER_BY_CODE
    crc = _crc
    write = _WRITE
    u64_limit = _U64_LIMIT
    prev_seq = -1
    new_record = object.__new__
    (
        set_kind,
        set_seq,
        set_disk,
        set_offset,
        set_length,
        set_ts,
        set_data,
        set_marker,
        set_marker_id,
    ) = RECORD_SLOT_SETTERS
    for index in range(count):
        if end - pos < RECORD_HEADER_SIZE:
            raise CorruptRecord(
                f"{what} truncated: record header needs {RECORD_HEADER_SIZE} bytes, "
                f"{end - pos} left",
                offset=pos,
                record_index=index,
            )
        stored, code, marker_code, disk, data_len, seq, offset, length, ts, marker_id = unpack_from(
            mv, pos
        )
        data_start = pos + RECORD_HEADER_SIZE
        data_end = data_start + data_len
        if data_end > end:
            raise CorruptRecord(
                f"{what} truncated: record declares {data_len} data bytes, {end - data_start} left",
                offset=pos,
                record_index=index,
            )
        computed = crc(mv[pos + 4 : data_end])
        if computed != stored:
            raise CorruptRecord(
                f"{what} record CRC32C mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}",
                offset=pos,
                record_index=index,
            )
        kind = kinds.get(code)
        # Fast path for the common record (a plain write); anything else gets the full rules.
        if not (
            kind is write
            and marker_code == 0
            and marker_id == 0
            and data_len == length
            and offset + length <= u64_limit
        ):
            problem = _record_problem(code, kind, marker_code, offset, length, data_len, marker_id)
            if problem is not None:
                raise CorruptRecord(
                    f"{what} invalid record: {problem}", offset=pos, record_index=index
                )
        if seq < min_seq or seq > max_seq:
            raise CorruptRecord(
                f"{what} record seq {seq} outside the header's range {min_seq}..{max_seq}",
                offset=pos,
                record_index=index,
            )
        if seq < prev_seq or (strictly_increasing and seq == prev_seq):
            order = "strictly increasing" if strictly_increasing else "non-decreasing"
            raise CorruptRecord(
                f"{what} record seq {seq} after {prev_seq}: seqs must be {order}",
                offset=pos,
                record_index=index,
            )
        if ts < min_ts or ts > max_ts:
            raise CorruptRecord(
                f"{what} record ts_ns {ts} outside the header's range {min_ts}..{max_ts}",
                offset=pos,
                record_index=index,
            )
        prev_seq = seq
        # Built field by field through the slot descriptors: a frozen dataclass __init__
        # costs twice as much, and this loop runs once per record on every decode.
        rec = new_record(Record)
        set_kind(rec, kind)
        set_seq(rec, seq)
        set_disk(rec, disk)
        set_offset(rec, offset)
        set_length(rec, length)
        set_ts(rec, ts)
        set_data(rec, mv[data_start:data_end] if data_len else b"")
        set_marker(rec, markers.get(marker_code))  # code 0 (no marker) maps to None
        set_marker_id(rec, marker_id)
        append(rec)
        pos = data_end
    if pos != end:
        raise CorruptRecord(
            f"{what} has {end - pos} bytes after its {count} records", offset=pos, record_index=None
        )
    return records


# ---------------------------------------------------------------------------------------
# Shared header handling


def _encode_vm_id(vm_id: str) -> bytes:
    raw = vm_id.encode("utf-8")
    if not 1 <= len(raw) <= _VM_ID_MAX_BYTES:
        raise EncodeError(f"vm_id must be 1..{_VM_ID_MAX_BYTES} UTF-8 bytes, got {len(raw)}")
    return raw


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value < _U64_LIMIT:
        raise EncodeError(f"{name} {value} does not fit u64")


def _open_header(mv: memoryview, magic: bytes, what: str) -> tuple[int, int, int]:
    """Check the version-independent prefix and the header CRC; return (version, flags, len).

    The CRC is checked before the version so that a bit flip in the version byte is
    reported as corruption, and an intact header of a newer version as unsupported.
    """
    size = len(mv)
    if size < _PREFIX.size:
        raise CorruptRecord(f"{what} truncated: {size} bytes, shorter than its prefix", offset=0)
    found, version, flags, header_len = _PREFIX.unpack_from(mv, 0)
    if found != magic:
        raise CorruptRecord(f"{what} bad magic {bytes(found)!r}, expected {magic!r}", offset=0)
    if header_len < _PREFIX.size + 4:
        raise CorruptRecord(f"{what} header length {header_len} is too small", offset=6)
    if header_len > size:
        raise CorruptRecord(
            f"{what} truncated: header needs {header_len} bytes, message has {size}", offset=size
        )
    crc_at = header_len - 4
    (stored,) = _U32.unpack_from(mv, crc_at)
    computed = _crc(mv[:crc_at])
    if computed != stored:
        raise CorruptRecord(
            f"{what} header CRC32C mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}",
            offset=crc_at,
        )
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"{what} format version {version}; this reader supports version {FORMAT_VERSION}",
            offset=4,
        )
    return version, flags, header_len


def _decode_vm_id(mv: memoryview, start: int, vm_len: int, header_len: int, what: str) -> str:
    if vm_len == 0 or start + vm_len + 4 != header_len:
        raise CorruptRecord(
            f"{what} vm_id length {vm_len} disagrees with header length {header_len}",
            offset=start - 1,
        )
    try:
        return str(mv[start : start + vm_len], "utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptRecord(f"{what} vm_id is not UTF-8: {exc}", offset=start) from exc


# ---------------------------------------------------------------------------------------
# Frames


def frame_header_size(vm_id: str) -> int:
    """Bytes of a frame header for ``vm_id`` (records follow it)."""
    return _FRAME_FIXED.size + len(vm_id.encode("utf-8")) + 4


def encode_frame(vm_id: str, epoch: int, records: Sequence[Record]) -> bytes:
    """Encode one frame: a header then ``records`` (at least one, seq strictly increasing)."""
    if not records:
        raise EncodeError("a frame carries at least one record")
    parts: list[bytes | memoryview] = [b""]  # the header goes here once the body is known
    body_len = 0
    prev_seq = records[0].seq - 1
    for index, rec in enumerate(records):
        if rec.seq <= prev_seq:
            raise EncodeError(
                f"record seq {rec.seq} after {prev_seq}: seqs in a frame must be strictly "
                "increasing",
                record_index=index,
            )
        prev_seq = rec.seq
        body_len += _encode_record(parts, rec, index)
    parts[0] = _frame_header(vm_id, epoch, records[0].seq, prev_seq, len(records), body_len)
    return b"".join(parts)


def encode_frame_body(
    vm_id: str,
    epoch: int,
    first_seq: int,
    last_seq: int,
    count: int,
    *body: bytes | bytearray | memoryview,
) -> bytes:
    """Encode one frame around ``body`` (the pieces of it in order): ``count`` records
    already encoded back to back (each `encode_record_header` then its data), numbered
    ``first_seq``..``last_seq``.

    The caller vouches for the body (the tap builds it record by record); a reader checks
    every record's CRC and the numbering anyway."""
    if count < 1 or last_seq - first_seq + 1 < count:
        raise EncodeError(f"a frame of {count} records cannot span seqs {first_seq}..{last_seq}")
    body_len = sum(part.nbytes if type(part) is memoryview else len(part) for part in body)
    head = _frame_header(vm_id, epoch, first_seq, last_seq, count, body_len)
    return b"".join((head, *body))


def _frame_header(
    vm_id: str, epoch: int, first_seq: int, last_seq: int, count: int, body_len: int
) -> bytes:
    vm = _encode_vm_id(vm_id)
    _check_u64("epoch", epoch)
    if body_len >= _U32_LIMIT:
        raise EncodeError(f"frame body of {body_len} bytes exceeds the u32 limit")
    header_len = _FRAME_FIXED.size + len(vm) + 4
    head = (
        _FRAME_FIXED.pack(
            FRAME_MAGIC,
            FORMAT_VERSION,
            0,
            header_len,
            epoch,
            first_seq,
            last_seq,
            count,
            body_len,
            len(vm),
        )
        + vm
    )
    return head + _U32.pack(_crc(head))


def _parse_frame_header(mv: memoryview) -> FrameHeader:
    what = "frame"
    _version, flags, header_len = _open_header(mv, FRAME_MAGIC, what)
    if header_len < _FRAME_FIXED.size + 4:
        raise CorruptRecord(f"{what} header length {header_len} is too small", offset=6)
    (_m, _v, _f, _hl, epoch, first_seq, last_seq, count, body_len, vm_len) = (
        _FRAME_FIXED.unpack_from(mv, 0)
    )
    if flags:
        raise CorruptRecord(f"{what} has unknown flags 0x{flags:02x}", offset=5)
    vm_id = _decode_vm_id(mv, _FRAME_FIXED.size, vm_len, header_len, what)
    if count == 0 or first_seq > last_seq:
        raise CorruptRecord(
            f"{what} header is inconsistent: {count} records, seq {first_seq}..{last_seq}",
            offset=16,
        )
    return FrameHeader(vm_id, epoch, first_seq, last_seq, count, body_len, header_len)


def peek_frame_header(message: bytes | memoryview) -> FrameHeader:
    """Read and verify a frame's header (CRC included) without decoding its records."""
    mv = memoryview(message).cast("B")
    header = _parse_frame_header(mv)
    _check_total_size(mv, header.header_len + header.body_len, "frame")
    return header


def _check_total_size(mv: memoryview, expected: int, what: str) -> None:
    size = len(mv)
    if size < expected:
        raise CorruptRecord(
            f"{what} truncated: header promises {expected} bytes, message has {size}",
            offset=size,
        )
    if size > expected:
        raise CorruptRecord(
            f"{what} has {size - expected} trailing bytes after its declared end",
            offset=expected,
        )


def decode_frame(buf: bytes | memoryview) -> Frame:
    """Decode and verify a frame; WRITE/SYNC_BLOCK data are memoryviews into ``buf``."""
    mv = memoryview(buf).cast("B")
    header = _parse_frame_header(mv)
    end = header.header_len + header.body_len
    _check_total_size(mv, end, "frame")
    records = _decode_records(
        mv,
        header.header_len,
        end,
        header.record_count,
        what="frame",
        min_seq=header.first_seq,
        max_seq=header.last_seq,
        strictly_increasing=True,
    )
    if records[0].seq != header.first_seq or records[-1].seq != header.last_seq:
        raise CorruptRecord(
            f"frame header says seq {header.first_seq}..{header.last_seq}, records hold "
            f"{records[0].seq}..{records[-1].seq}",
            offset=16,
        )
    return Frame(header.vm_id, header.epoch, records)


# ---------------------------------------------------------------------------------------
# Batches


def chunk_header_size(vm_id: str) -> int:
    """Bytes of a batch chunk header for ``vm_id`` (the chunk's piece follows it)."""
    return _CHUNK_FIXED.size + len(vm_id.encode("utf-8")) + 4


def _check_batch(batch: Batch) -> None:
    for name in ("epoch", "first_seq", "last_seq", "min_ts_ns", "max_ts_ns", "resync_id"):
        _check_u64(name, getattr(batch, name))
    _check_u64("checkpoint_id", batch.checkpoint_id)
    if batch.first_seq > batch.last_seq:
        raise EncodeError(f"batch first_seq {batch.first_seq} > last_seq {batch.last_seq}")
    if batch.min_ts_ns > batch.max_ts_ns:
        raise EncodeError(f"batch min_ts_ns {batch.min_ts_ns} > max_ts_ns {batch.max_ts_ns}")
    if batch.resync_complete and not batch.resync_id:
        raise EncodeError("resync_complete needs a non-zero resync_id")
    if len(batch.records) >= _U32_LIMIT:
        raise EncodeError(f"batch of {len(batch.records)} records exceeds the u32 limit")


def encode_batch(
    batch: Batch, *, max_message_bytes: int = 1_000_000, compress: bool = True, level: int = 3
) -> list[bytes]:
    """Encode ``batch`` as one or more chunk messages, each at most ``max_message_bytes``.

    The records are serialized, zstd-compressed as one stream (kept raw when compression
    does not make it smaller, or when ``compress`` is False), and the stream is cut into
    pieces; each chunk is a full header plus one piece.
    """
    vm = _encode_vm_id(batch.vm_id)
    _check_batch(batch)
    header_len = _CHUNK_FIXED.size + len(vm) + 4
    room = max_message_bytes - header_len
    if room < 1:
        raise EncodeError(
            f"max_message_bytes {max_message_bytes} leaves no room after a {header_len}-byte "
            "chunk header"
        )
    parts: list[bytes | memoryview] = []
    prev_seq = batch.first_seq
    for index, rec in enumerate(batch.records):
        if rec.seq < prev_seq or rec.seq > batch.last_seq:
            raise EncodeError(
                f"record seq {rec.seq} must be non-decreasing within the batch range "
                f"{batch.first_seq}..{batch.last_seq} (previous {prev_seq})",
                record_index=index,
            )
        if not batch.min_ts_ns <= rec.ts_ns <= batch.max_ts_ns:
            raise EncodeError(
                f"record ts_ns {rec.ts_ns} outside the batch range "
                f"{batch.min_ts_ns}..{batch.max_ts_ns}",
                record_index=index,
            )
        prev_seq = rec.seq
        _encode_record(parts, rec, index)
    payload = b"".join(parts)
    if len(payload) > MAX_BATCH_PAYLOAD_BYTES:
        raise EncodeError(
            f"batch records take {len(payload)} bytes, more than the format's limit of "
            f"{MAX_BATCH_PAYLOAD_BYTES}: cut smaller batches"
        )
    total_crc = _crc(payload)
    stored = payload
    flags = _CHUNK_FLAG_RESYNC_COMPLETE if batch.resync_complete else 0
    if compress:
        try:
            compressed = zstandard.ZstdCompressor(level=level).compress(payload)
        except zstandard.ZstdError as exc:
            raise EncodeError(f"zstd compression failed at level {level}: {exc}") from exc
        if len(compressed) < len(payload):
            stored = compressed
            flags |= _CHUNK_FLAG_ZSTD
    stored_len = len(stored)
    chunk_count = max(1, -(-stored_len // room))
    if chunk_count >= _U32_LIMIT:
        raise EncodeError(f"batch needs {chunk_count} chunks, more than the u32 limit")
    smv = memoryview(stored)
    messages: list[bytes] = []
    for chunk_index in range(chunk_count):
        piece_offset = chunk_index * room
        piece = smv[piece_offset : piece_offset + room]
        head = (
            _CHUNK_FIXED.pack(
                CHUNK_MAGIC,
                FORMAT_VERSION,
                flags,
                header_len,
                batch.epoch,
                batch.first_seq,
                batch.last_seq,
                batch.min_ts_ns,
                batch.max_ts_ns,
                batch.resync_id,
                batch.checkpoint_id,
                len(batch.records),
                chunk_index,
                chunk_count,
                total_crc,
                len(payload),
                stored_len,
                piece_offset,
                len(piece),
                _crc(piece),
                len(vm),
            )
            + vm
        )
        messages.append(b"".join((head, _U32.pack(_crc(head)), piece)))
    return messages


def _parse_chunk_header(mv: memoryview) -> ChunkHeader:
    what = "batch chunk"
    _version, flags, header_len = _open_header(mv, CHUNK_MAGIC, what)
    if header_len < _CHUNK_FIXED.size + 4:
        raise CorruptRecord(f"{what} header length {header_len} is too small", offset=6)
    (
        _m,
        _v,
        _f,
        _hl,
        epoch,
        first_seq,
        last_seq,
        min_ts,
        max_ts,
        resync_id,
        checkpoint_id,
        record_count,
        chunk_index,
        chunk_count,
        total_crc,
        payload_len,
        stored_len,
        piece_offset,
        piece_len,
        piece_crc,
        vm_len,
    ) = _CHUNK_FIXED.unpack_from(mv, 0)
    if flags & ~_CHUNK_KNOWN_FLAGS:
        raise CorruptRecord(f"{what} has unknown flags 0x{flags:02x}", offset=5)
    vm_id = _decode_vm_id(mv, _CHUNK_FIXED.size, vm_len, header_len, what)
    compressed = bool(flags & _CHUNK_FLAG_ZSTD)
    resync_complete = bool(flags & _CHUNK_FLAG_RESYNC_COMPLETE)
    problem = None
    if first_seq > last_seq:
        problem = f"first_seq {first_seq} > last_seq {last_seq}"
    elif min_ts > max_ts:
        problem = f"min_ts_ns {min_ts} > max_ts_ns {max_ts}"
    elif resync_complete and not resync_id:
        problem = "resync_complete without a resync_id"
    elif not chunk_index < chunk_count:
        problem = f"chunk index {chunk_index} not below chunk count {chunk_count}"
    elif piece_offset + piece_len > stored_len:
        problem = f"piece {piece_offset}+{piece_len} runs past the stored length {stored_len}"
    elif not compressed and stored_len != payload_len:
        problem = f"uncompressed stream of {stored_len} bytes but payload of {payload_len}"
    elif payload_len > MAX_BATCH_PAYLOAD_BYTES:
        problem = f"payload of {payload_len} bytes, over the limit of {MAX_BATCH_PAYLOAD_BYTES}"
    if problem is not None:
        raise CorruptRecord(f"{what} header is inconsistent: {problem}", offset=8)
    return ChunkHeader(
        vm_id=vm_id,
        epoch=epoch,
        first_seq=first_seq,
        last_seq=last_seq,
        min_ts_ns=min_ts,
        max_ts_ns=max_ts,
        resync_id=resync_id,
        resync_complete=resync_complete,
        checkpoint_id=checkpoint_id,
        compressed=compressed,
        record_count=record_count,
        chunk_index=chunk_index,
        chunk_count=chunk_count,
        total_crc=total_crc,
        payload_len=payload_len,
        stored_len=stored_len,
        piece_offset=piece_offset,
        piece_len=piece_len,
        piece_crc=piece_crc,
        header_len=header_len,
    )


def peek_header(message: bytes | memoryview, *, verify_piece: bool = False) -> ChunkHeader:
    """Read a batch chunk's header without decompressing anything.

    Always verifies the header CRC and that the message length matches the header;
    ``verify_piece`` also checks the piece CRC (one CRC32C pass over the message).
    """
    mv = memoryview(message).cast("B")
    header = _parse_chunk_header(mv)
    _check_total_size(mv, header.header_len + header.piece_len, "batch chunk")
    if verify_piece:
        _check_piece(mv, header)
    return header


def _check_piece(mv: memoryview, header: ChunkHeader) -> memoryview:
    piece = mv[header.header_len :]
    computed = _crc(piece)
    if computed != header.piece_crc:
        raise CorruptRecord(
            f"batch chunk {header.chunk_index}/{header.chunk_count} piece CRC32C mismatch: "
            f"stored 0x{header.piece_crc:08x}, computed 0x{computed:08x}",
            offset=header.header_len,
        )
    return piece


def _open_chunk(message: bytes | memoryview) -> tuple[ChunkHeader, memoryview]:
    mv = memoryview(message).cast("B")
    header = _parse_chunk_header(mv)
    _check_total_size(mv, header.header_len + header.piece_len, "batch chunk")
    return header, _check_piece(mv, header)


def _describe(header: ChunkHeader) -> str:
    return (
        f"batch vm={header.vm_id!r} epoch={header.epoch} seq={header.first_seq}..{header.last_seq}"
    )


def _build_batch(header: ChunkHeader, pieces: list[memoryview]) -> Batch:
    what = f"{_describe(header)} payload"
    stored: bytes | memoryview = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(stored) != header.stored_len:
        raise ChunkOrderError(
            f"{_describe(header)}: pieces add up to {len(stored)} bytes, header says "
            f"{header.stored_len}"
        )
    payload: bytes | memoryview
    if header.compressed:
        # The content size inside the zstd frame decides the allocation, so check it first.
        try:
            content_size = zstandard.frame_content_size(stored)
        except zstandard.ZstdError as exc:
            raise CorruptRecord(f"{what}: not a zstd frame: {exc}") from exc
        if content_size != header.payload_len:
            raise CorruptRecord(
                f"{what}: zstd frame holds {content_size} bytes, header says {header.payload_len}"
            )
        try:
            payload = zstandard.ZstdDecompressor().decompress(
                stored, max_output_size=header.payload_len, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise CorruptRecord(f"{what}: zstd decompression failed: {exc}") from exc
    else:
        payload = stored
    computed = _crc(payload)
    if len(payload) != header.payload_len or computed != header.total_crc:
        raise CorruptRecord(
            f"{what}: total CRC32C mismatch: stored 0x{header.total_crc:08x}, computed "
            f"0x{computed:08x} over {len(payload)} bytes (header says {header.payload_len})"
        )
    pmv = memoryview(payload)
    records = _decode_records(
        pmv,
        0,
        len(pmv),
        header.record_count,
        what=what,
        min_seq=header.first_seq,
        max_seq=header.last_seq,
        strictly_increasing=False,
        min_ts=header.min_ts_ns,
        max_ts=header.max_ts_ns,
    )
    return Batch(
        vm_id=header.vm_id,
        epoch=header.epoch,
        first_seq=header.first_seq,
        last_seq=header.last_seq,
        min_ts_ns=header.min_ts_ns,
        max_ts_ns=header.max_ts_ns,
        records=records,
        resync_id=header.resync_id,
        resync_complete=header.resync_complete,
        checkpoint_id=header.checkpoint_id,
    )


class BatchAssembler:
    """Reassembles batch chunks in arrival order (one Kafka partition, one consumer).

    Rules:
    * chunks of a batch must arrive in index order 0..n-1; a gap, a chunk out of order,
      or a non-first chunk with no batch in progress raises ChunkOrderError and drops the
      partial batch (the assembler is then empty and ready for the next chunk 0);
    * an exact duplicate of a chunk already taken (same batch, index and piece CRC) is
      ignored: at-least-once redelivery is harmless;
    * a chunk 0 of another batch (or another encoding of the same batch) while a batch
      is in progress drops the partial batch with a warning (counted in
      ``discarded_batches``) and starts over: a writer that died mid-batch re-sends it
      from its first chunk, and a batch that was never re-sent leaves a sequence gap the
      applier refuses anyway;
    * a corrupt chunk raises CorruptRecord and leaves the batch in progress as it was.
    """

    def __init__(self) -> None:
        self._header: ChunkHeader | None = None
        self._pieces: list[memoryview] = []
        self._piece_crcs: list[int] = []
        self._stream_offset = 0
        self.discarded_batches = 0

    @property
    def pending(self) -> ChunkHeader | None:
        """First chunk's header of the batch in progress, if any."""
        return self._header

    @property
    def pending_chunks(self) -> int:
        return len(self._pieces)

    def reset(self) -> None:
        """Drop any batch in progress (e.g. after the consumer seeks)."""
        self._header = None
        self._pieces = []
        self._piece_crcs = []
        self._stream_offset = 0

    def add(self, message: bytes | memoryview) -> Batch | None:
        header, piece = _open_chunk(message)
        current = self._header
        if current is not None:
            if header.batch_key == current.batch_key and header.chunk_index < len(self._pieces):
                if header.piece_crc == self._piece_crcs[header.chunk_index]:
                    logger.debug(
                        "ignoring duplicate chunk %d/%d of %s",
                        header.chunk_index,
                        header.chunk_count,
                        _describe(header),
                    )
                    return None
                if header.chunk_index != 0:
                    self.reset()
                    raise ChunkOrderError(
                        f"chunk {header.chunk_index}/{header.chunk_count} of "
                        f"{_describe(header)} conflicts with the one already received; "
                        "partial batch dropped"
                    )
            if header.chunk_index == 0:
                self.discarded_batches += 1
                logger.warning(
                    "dropping incomplete %s (%d of %d chunks): %s starts before it ended",
                    _describe(current),
                    len(self._pieces),
                    current.chunk_count,
                    _describe(header),
                )
                self.reset()
                current = None
            elif header.batch_key != current.batch_key:
                self.reset()
                raise ChunkOrderError(
                    f"chunk {header.chunk_index}/{header.chunk_count} of {_describe(header)} "
                    f"arrived while {_describe(current)} was incomplete; partial batch dropped"
                )
            elif header.chunk_index != len(self._pieces):
                expected = len(self._pieces)
                self.reset()
                raise ChunkOrderError(
                    f"chunk {header.chunk_index}/{header.chunk_count} of {_describe(header)} "
                    f"arrived but chunk {expected} was expected; partial batch dropped"
                )
        if current is None:
            if header.chunk_index != 0:
                raise ChunkOrderError(
                    f"chunk {header.chunk_index}/{header.chunk_count} of {_describe(header)} "
                    "arrived without its first chunk"
                )
            self._header = header
        expected_offset = self._stream_offset
        if header.piece_offset != expected_offset:
            self.reset()
            raise ChunkOrderError(
                f"chunk {header.chunk_index}/{header.chunk_count} of {_describe(header)} "
                f"starts at stream offset {header.piece_offset}, expected {expected_offset}"
            )
        self._pieces.append(piece)
        self._piece_crcs.append(header.piece_crc)
        self._stream_offset += len(piece)
        if len(self._pieces) < header.chunk_count:
            return None
        first = self._header
        pieces = self._pieces
        self.reset()
        assert first is not None
        return _build_batch(first, pieces)


def decode_batch(messages: Sequence[bytes | memoryview]) -> Batch:
    """Decode exactly the chunks of one batch, in order (duplicates tolerated)."""
    assembler = BatchAssembler()
    batch: Batch | None = None
    for position, message in enumerate(messages):
        if batch is not None:
            raise ChunkOrderError(
                f"message {position} follows a complete batch; expected exactly one batch"
            )
        batch = assembler.add(message)
        if assembler.discarded_batches:
            raise ChunkOrderError(
                f"message {position} starts a new batch before the previous one was complete"
            )
    if batch is None:
        pending = assembler.pending
        if pending is None:
            raise ChunkOrderError("no batch chunks given")
        raise ChunkOrderError(
            f"{_describe(pending)} incomplete: {assembler.pending_chunks} of "
            f"{pending.chunk_count} chunks"
        )
    return batch
