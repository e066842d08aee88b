"""Datamover's Kafka topics: their names (from ONE function) and their explicit configs.

Every protected VM has one topic per :class:`Stream`; the site-wide streams (control,
status) have one topic per cluster. All per-VM topics exist on both clusters: the source's
batch topic is the WAN backlog, the target's is the journal the applier reads, and after a
migration reverses the direction the roles swap without creating anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

TOPIC_PREFIX = "dm"
# Kafka's limit; longer names are refused by the broker.
MAX_TOPIC_NAME_LENGTH = 249
# Kafka allows [a-zA-Z0-9._-] but treats '.' and '_' as the same in metric names and refuses
# topics that collide that way. Keeping '.' as our separator only (never inside a VM id)
# makes every generated name collision-free.
_VM_ID = re.compile(r"[A-Za-z0-9_-]+")

DAY_MS = 24 * 60 * 60 * 1000
DEADLETTER_MIN_RETENTION_MS = 7 * DAY_MS
# Offsets, control and status records are small key/value state.
STATE_MAX_MESSAGE_BYTES = 1024 * 1024


class Stream(StrEnum):
    TAP = "tap"
    """Sequenced guest writes, as the tap publishes them (source cluster)."""
    BATCH = "batch"
    """Consistency batches: the WAN backlog on the source, the journal on the target."""
    DEADLETTER = "deadletter"
    """Records a service could not process (corrupt, unreadable), kept for inspection."""
    OFFSETS = "offsets"
    """Per-VM progress checkpoints (compacted: the latest per key)."""
    CONTROL = "control"
    """Site-wide desired state published by the control plane (compacted)."""
    STATUS = "status"
    """Site-wide status reports of the data-path services (compacted)."""


VM_STREAMS = (Stream.TAP, Stream.BATCH, Stream.DEADLETTER, Stream.OFFSETS)
SITE_STREAMS = (Stream.CONTROL, Stream.STATUS)
COMPACTED_STREAMS = frozenset({Stream.OFFSETS, Stream.CONTROL, Stream.STATUS})

_LONGEST_VM_PREFIX = max(len(f"{TOPIC_PREFIX}.{s}.") for s in VM_STREAMS)
MAX_VM_ID_LENGTH = MAX_TOPIC_NAME_LENGTH - _LONGEST_VM_PREFIX


def topic_name(stream: Stream, vm_id: str | None = None) -> str:
    """The topic of ``stream``: ``dm.<stream>.<vm_id>`` per VM, ``dm.<stream>`` site-wide.

    Raises ValueError for a VM id that is empty, too long or not made of
    ``[A-Za-z0-9_-]``, and for a VM id given to a site-wide stream or missing for a VM one.
    """
    stream = Stream(stream)
    if stream in SITE_STREAMS:
        if vm_id is not None:
            raise ValueError(f"stream {stream} is site-wide: it takes no VM id")
        return f"{TOPIC_PREFIX}.{stream}"
    if vm_id is None:
        raise ValueError(f"stream {stream} is per VM: a VM id is needed")
    if not _VM_ID.fullmatch(vm_id):
        raise ValueError(f"VM id {vm_id!r} must be non-empty and made of A-Z a-z 0-9 _ -")
    if len(vm_id) > MAX_VM_ID_LENGTH:
        raise ValueError(f"VM id {vm_id[:20]!r}... is longer than {MAX_VM_ID_LENGTH} characters")
    return f"{TOPIC_PREFIX}.{stream}.{vm_id}"


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the control plane creates it: every config explicit."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


def default_min_insync_replicas(replication_factor: int) -> int:
    """Writes (acks=all) need this many replicas in sync: 2 of 3, 1 of 1 or 2."""
    if replication_factor < 1:
        raise ValueError(f"replication factor must be >= 1, not {replication_factor}")
    return max(1, min(2, replication_factor - 1))


def _common_configs(replication_factor: int, min_insync_replicas: int | None) -> dict[str, str]:
    min_isr = min_insync_replicas or default_min_insync_replicas(replication_factor)
    if not 1 <= min_isr <= replication_factor:
        raise ValueError(f"min.insync.replicas {min_isr} not in 1..{replication_factor}")
    return {
        "min.insync.replicas": str(min_isr),
        # An out-of-sync replica must never become leader: it would drop acknowledged writes.
        "unclean.leader.election.enable": "false",
    }


def vm_topic_specs(
    vm_id: str,
    *,
    replication_factor: int,
    retention_ms: int,
    max_message_bytes: int,
    min_insync_replicas: int | None = None,
) -> list[TopicSpec]:
    """The topics of one protected VM, one partition each (one partition keeps one order).

    ``retention_ms`` is the journal history of the VM's resiliency group; it applies to the
    tap and batch topics. ``max_message_bytes`` bounds one record (a journal batch).
    """
    if retention_ms < 1 and retention_ms != -1:
        raise ValueError(f"retention_ms must be positive or -1 (forever), not {retention_ms}")
    if max_message_bytes < 1024:
        raise ValueError(f"max_message_bytes {max_message_bytes} is too small")
    common = _common_configs(replication_factor, min_insync_replicas)
    journal = {
        **common,
        "cleanup.policy": "delete",
        "retention.ms": str(retention_ms),
        "max.message.bytes": str(max_message_bytes),
    }
    deadletter_retention = (
        -1 if retention_ms == -1 else max(retention_ms, DEADLETTER_MIN_RETENTION_MS)
    )
    configs = {
        Stream.TAP: journal,
        Stream.BATCH: journal,
        Stream.DEADLETTER: {
            **journal,
            "retention.ms": str(deadletter_retention),
        },
        Stream.OFFSETS: {
            **common,
            "cleanup.policy": "compact",
            "max.message.bytes": str(STATE_MAX_MESSAGE_BYTES),
        },
    }
    return [
        TopicSpec(topic_name(stream, vm_id), 1, replication_factor, dict(configs[stream]))
        for stream in VM_STREAMS
    ]


def site_topic_specs(
    *, replication_factor: int, min_insync_replicas: int | None = None
) -> list[TopicSpec]:
    """The site-wide topics of one cluster: control and status, compacted, one partition."""
    configs = {
        **_common_configs(replication_factor, min_insync_replicas),
        "cleanup.policy": "compact",
        "max.message.bytes": str(STATE_MAX_MESSAGE_BYTES),
    }
    return [
        TopicSpec(topic_name(stream), 1, replication_factor, dict(configs))
        for stream in SITE_STREAMS
    ]
