"""Encoders for transmission-phase replies that carry more than a 16-byte header:
structured reply chunks (data, errors, block status)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from vib.nbd import protocol as p

# Error messages are for humans; a short one says enough and bounds the reply.
MAX_ERROR_MESSAGE = 1024
_STATUS_BITS = p.STATE_HOLE | p.STATE_ZERO


def offset_data_header(cookie: int, offset: int, size: int) -> bytes:
    """Header of a final OFFSET_DATA chunk; `size` bytes of data follow it."""
    return p.OFFSET_DATA_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        p.REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + size,
        offset,
    )


def none_chunk(cookie: int) -> bytes:
    return p.CHUNK_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie, 0
    )


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode()
    return (
        p.ERROR_CHUNK_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC,
            p.REPLY_FLAG_DONE,
            p.REPLY_TYPE_ERROR,
            cookie,
            6 + len(text),
            error,
            len(text),
        )
        + text
    )


def block_status_descriptors(
    length: int, extents: Iterable[tuple[int, int]], *, req_one: bool
) -> list[int]:
    """Flat [length, status, ...] for a request of `length` bytes: the export's runs
    clipped to the request, equal neighbours merged, at most one descriptor with
    REQ_ONE and at most 2^20 otherwise. No usable run gives one run of status 0
    ("allocated, contents unknown"), which the spec says is always safe."""
    descriptors: list[int] = []
    remaining = length
    limit = 2 if req_one else 2 * p.MAX_BLOCK_STATUS_DESCRIPTORS
    for extent_length, extent_flags in extents:
        if extent_length <= 0:
            continue
        status = extent_flags & _STATUS_BITS
        take = min(extent_length, remaining)
        if descriptors and descriptors[-1] == status:
            descriptors[-2] += take
        elif len(descriptors) < limit:
            descriptors += (take, status)
        else:
            break
        remaining -= take
        if remaining == 0:
            break
    return descriptors or [length, 0]


def block_status_chunk(cookie: int, context_id: int, descriptors: list[int]) -> bytes:
    count = len(descriptors)
    return p.BLOCK_STATUS_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC,
        p.REPLY_FLAG_DONE,
        p.REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 4 * count,
        context_id,
    ) + struct.pack(f">{count}I", *descriptors)
