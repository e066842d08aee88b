"""Services ensure the topics of their plan: created once, idempotent, tolerant of topics
an operator tuned, and safe when several services race to create them."""

from __future__ import annotations

import asyncio
from collections import Counter

from datapath.kafka import Admin, KafkaClusterSettings, KafkaMetrics
from datapath.protection import Disk, Journal, ProtectedVM
from datapath.provisioning import ensure_plan_topics, plan_topic_specs
from datapath.topics import Stream, topic_name


def _vm(vm_id: str, retention_ms: int = 3_600_000) -> ProtectedVM:
    return ProtectedVM(
        id=vm_id,
        disks=[Disk(name="d0", source="/s", target="/t", size=1 << 20)],
        journal=Journal(retention_ms=retention_ms),
    )


async def test_plan_topics_are_created_once_even_by_racing_services(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    vm = _vm(vm_id)
    metrics = KafkaMetrics()
    created = await asyncio.gather(
        *(ensure_plan_topics(source_cluster, [vm], metrics=metrics) for _ in range(3))
    )
    names = {spec.name for spec in plan_topic_specs([vm])}
    assert {topic_name(Stream.TAP, vm_id), topic_name(Stream.BATCH, vm_id)} <= names
    async with Admin(source_cluster) as admin:
        assert names <= await admin.list_topics()
    per_vm = {n for n in names if vm_id in n}
    # Each topic was created by exactly one of the racing calls (the others found it).
    assert Counter(name for batch in created for name in batch if name in per_vm) == Counter(per_vm)
    assert await ensure_plan_topics(source_cluster, [vm], metrics=metrics) == []


async def test_existing_topics_with_tuned_settings_are_used_as_they_are(
    source_cluster: KafkaClusterSettings, vm_id: str
) -> None:
    metrics = KafkaMetrics()
    await ensure_plan_topics(source_cluster, [_vm(vm_id)], metrics=metrics)
    tuned = _vm(vm_id, retention_ms=7_200_000)
    assert await ensure_plan_topics(source_cluster, [tuned], metrics=metrics) == []
