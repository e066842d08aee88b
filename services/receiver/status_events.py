"""What the receiver publishes besides batches: status events and dead letters.

Status events go to the site-wide, compacted status topic (``dm.status``) as JSON; their
key names the event itself, so a receiver that reports the same event again after a crash
(it is re-derived from the same tap messages) overwrites the first report instead of
adding a second. The shapes are documented in ``docs/receiver.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .batcher import (
    BracketAbandoned,
    Event,
    QuarantinedMessage,
    SequenceGap,
    SequenceRegression,
)

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def status_event(
    event: Event, *, instance: str, tap_topic: str, deadletter_topic: str
) -> tuple[str, dict[str, Any]]:
    """The status topic key and JSON body for ``event``."""
    body: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "source": "receiver",
        "instance": instance,
        "vm_id": event.vm_id,
        "ts_ns": time.time_ns(),
    }
    if isinstance(event, SequenceGap):
        body.update(
            type="resync_request",
            reason="sequence_gap",
            epoch=event.epoch,
            first_seq=event.first_seq,
            last_seq=event.last_seq,
            tap_topic=tap_topic,
            tap_offset=event.offset,
            detail=f"tap records {event.first_seq}..{event.last_seq} never arrived",
        )
        key = f"receiver/{event.vm_id}/resync_request/gap/{event.first_seq}"
    elif isinstance(event, QuarantinedMessage):
        body.update(
            type="resync_request",
            reason="corrupt_record",
            epoch=event.epoch,
            first_seq=event.first_seq,
            last_seq=event.last_seq,
            tap_topic=tap_topic,
            tap_offset=event.offset,
            deadletter_topic=deadletter_topic,
            detail=event.error,
        )
        key = f"receiver/{event.vm_id}/resync_request/corrupt/{tap_topic}/{event.offset}"
    elif isinstance(event, SequenceRegression):
        body.update(
            type="resync_request",
            reason="sequence_regression",
            epoch=event.epoch,
            previous_epoch=event.previous_epoch,
            first_seq=event.first_seq,
            last_seq=event.next_seq - 1,
            tap_topic=tap_topic,
            tap_offset=event.offset,
            detail=(
                f"epoch {event.epoch} reused sequence numbers from {event.first_seq}; epoch "
                f"{event.previous_epoch} already reached {event.next_seq - 1}"
            ),
        )
        key = f"receiver/{event.vm_id}/resync_request/regression/{event.epoch}"
    else:
        assert isinstance(event, BracketAbandoned)
        body.update(
            type="resync_abandoned",
            resync_id=event.resync_id,
            superseded_by=event.superseded_by,
            seq=event.seq,
            detail=(
                f"resync {event.resync_id} never completed; resync {event.superseded_by} "
                "replaces it"
            ),
        )
        key = f"receiver/{event.vm_id}/resync_abandoned/{event.resync_id}"
    return key, body


def outgoing_for(
    event: Event,
    *,
    instance: str,
    tap_topic: str,
    deadletter_topic: str,
    status_topic: str,
) -> list[OutgoingMessage]:
    """The messages one event becomes: the dead letter (if any), then the status event."""
    messages: list[OutgoingMessage] = []
    if isinstance(event, QuarantinedMessage):
        messages.append(
            OutgoingMessage(
                topic=deadletter_topic,
                key=event.vm_id.encode(),
                value=event.value,
                headers=[
                    ("dm-source", b"receiver"),
                    ("dm-vm", event.vm_id.encode()),
                    ("dm-topic", tap_topic.encode()),
                    ("dm-partition", b"0"),
                    ("dm-offset", str(event.offset).encode()),
                    ("dm-error", event.error.encode()[:1024]),
                ],
            )
        )
    key, body = status_event(
        event, instance=instance, tap_topic=tap_topic, deadletter_topic=deadletter_topic
    )
    messages.append(
        OutgoingMessage(
            topic=status_topic,
            key=key.encode(),
            value=json.dumps(body, separators=(",", ":")).encode(),
            headers=[("content-type", b"application/json")],
        )
    )
    return messages
