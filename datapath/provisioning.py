"""Makes sure the topics of a protection plan exist on a cluster.

The design gives topic creation to the control plane. Until it exists, each service
ensures, when it starts, the topics of the VMs it serves on the clusters it uses: every
per-VM topic (tap, batch, dead-letter, offsets) and the site-wide ones, on both sites,
so a later reversal of direction needs no new topics. Creation is idempotent; a topic
that exists with other settings is used as it is (an operator may have tuned it) and the
difference is logged, never silently reconfigured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from datapath.kafka import (
    Admin,
    KafkaClusterSettings,
    KafkaMetrics,
    KafkaUnavailable,
    TopicExists,
    UnknownTopic,
    retrying,
)
from datapath.protection import ProtectedVM
from datapath.topics import TopicSpec, site_topic_specs, vm_topic_specs

log = logging.getLogger(__name__)


def plan_topic_specs(vms: Iterable[ProtectedVM]) -> list[TopicSpec]:
    vms = list(vms)
    specs: list[TopicSpec] = []
    for vm in vms:
        journal = vm.journal
        specs += vm_topic_specs(
            vm.id,
            replication_factor=journal.replication_factor,
            retention_ms=journal.retention_ms,
            max_message_bytes=journal.max_message_bytes,
        )
    replication = max((vm.journal.replication_factor for vm in vms), default=1)
    return specs + site_topic_specs(replication_factor=replication)


def plan_topic_spec(vms: Iterable[ProtectedVM], name: str) -> TopicSpec:
    """The spec of one of the plan's topics (a per-VM or a site-wide one)."""
    return next(spec for spec in plan_topic_specs(vms) if spec.name == name)


async def ensure_plan_topics(
    cluster: KafkaClusterSettings,
    vms: Iterable[ProtectedVM],
    *,
    metrics: KafkaMetrics,
    attempts: int = 10,
    backoff: float = 0.5,
) -> list[str]:
    """Creates what is missing; returns the names created. Retries while the cluster
    is unreachable (counted in the retry metric), then raises KafkaUnavailable."""
    specs = plan_topic_specs(vms)

    async def create() -> list[str]:
        async with Admin(cluster) as admin:
            try:
                return await admin.create_topics(specs)
            except TopicExists as exc:
                log.warning("using existing topics as they are on %s: %s", cluster.describe(), exc)
                return []
            except UnknownTopic as exc:
                # Another service created it a moment ago and the metadata does not show it
                # yet: transient, so the retry policy tries again.
                raise KafkaUnavailable(f"topics not yet visible: {exc}") from exc

    return await retrying(
        create, what="ensure_topics", attempts=attempts, backoff=backoff, metrics=metrics
    )
