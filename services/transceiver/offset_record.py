"""The transceiver's progress record, kept in the target's compacted offsets topic.

One key per source partition; the value says where the copy resumes. It is written in
the same target transaction as the messages it covers, so "copied" and "recorded as
copied" can never disagree, whatever crashes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

SCHEMA_VERSION = 1


class OffsetRecordError(ValueError):
    """An offsets-topic value that is not a transceiver progress record."""


@dataclass(frozen=True, slots=True)
class CopyProgress:
    source_topic: str
    partition: int
    next_offset: int  # the first source offset not yet copied
    last_seq: int | None  # the last batch sequence number copied (None before any batch)
    epoch: int | None
    source_cluster: str  # bootstrap servers of the source, for operators reading the topic
    ts_ns: int
    # The source topic's id (datapath.kafka.topic_id): the offsets above are of that topic,
    # not of one created again under its name. None in records of earlier versions.
    source_topic_id: str | None = None


def progress_key(source_topic: str, partition: int) -> bytes:
    return f"transceiver/{source_topic}/{partition}".encode()


def encode_progress(progress: CopyProgress) -> bytes:
    return json.dumps(
        {"schema": SCHEMA_VERSION, **asdict(progress)}, separators=(",", ":")
    ).encode()


def decode_progress(value: bytes) -> CopyProgress:
    try:
        raw = json.loads(value)
        if raw.pop("schema") != SCHEMA_VERSION:
            raise OffsetRecordError(f"unknown progress record schema in {value[:200]!r}")
        progress = CopyProgress(**raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise OffsetRecordError(f"not a transceiver progress record: {value[:200]!r}") from exc
    if not isinstance(progress.next_offset, int) or progress.next_offset < 0:
        raise OffsetRecordError(f"progress record has a bad next_offset: {value[:200]!r}")
    return progress
