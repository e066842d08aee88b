"""The transceiver's worker: one :class:`VmCopier` task per VM of its gateway pair."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from datapath.kafka import KafkaMetrics
from datapath.protection import ProtectionPlan, load_protection_plan
from datapath.provisioning import ensure_plan_topics
from datapath.service import wait_ended

from .copier import VmCopier
from .metrics import TransceiverMetrics
from .settings import TransceiverSettings
from .throttle import TokenBucket

log = logging.getLogger(__name__)


class Transceiver:
    """The transceiver service's worker (see :class:`datapath.service.Worker`)."""

    def __init__(self, settings: TransceiverSettings, plan: ProtectionPlan | None = None) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = TransceiverMetrics(self.registry)
        self.kafka_metrics = KafkaMetrics(self.registry)
        self._plan = plan
        self._copiers: dict[str, VmCopier] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.throttle: TokenBucket | None = None

    async def start(self) -> None:
        plan = self._plan or load_protection_plan(self.settings.plan)
        self._plan = plan
        settings = self.settings
        source = settings.source_kafka or plan.sites.source.kafka
        target = settings.target_kafka or plan.sites.target.kafka
        wanted = set(settings.vms) if settings.vms is not None else None
        vms = [vm for vm in plan.vms if wanted is None or vm.id in wanted]
        if wanted is not None and (unknown := wanted - {vm.id for vm in vms}):
            raise ValueError(f"VMs not in the plan: {sorted(unknown)}")
        for cluster in (source, target):
            await ensure_plan_topics(cluster, vms, metrics=self.kafka_metrics)
        if settings.bandwidth_bytes_per_s is not None:
            self.throttle = TokenBucket(
                settings.bandwidth_bytes_per_s, burst_bytes=settings.burst_bytes
            )
        for vm in vms:
            copier = VmCopier(
                vm.id,
                settings=settings,
                source=source,
                target=target,
                max_message_bytes=vm.journal.max_message_bytes,
                metrics=self.metrics,
                kafka_metrics=self.kafka_metrics,
                throttle=self.throttle,
            )
            self._copiers[vm.id] = copier
            self._tasks.append(asyncio.create_task(copier.run(), name=f"copy-{vm.id}"))
        log.info(
            "transceiver %s started: %d VMs, %s -> %s, %s mode%s",
            settings.gateway_pair,
            len(vms),
            source.describe(),
            target.describe(),
            settings.mode,
            f", throttled to {settings.bandwidth_bytes_per_s} B/s"
            if settings.bandwidth_bytes_per_s
            else "",
        )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Every copier is closed, whatever one of their tasks ended with.
        await wait_ended(tasks, f"transceiver {self.settings.gateway_pair}")
        await asyncio.gather(*(copier.close() for copier in self._copiers.values()))
        log.info("transceiver %s stopped", self.settings.gateway_pair)

    def ready(self) -> bool:
        return (
            bool(self._tasks)
            and all(not task.done() for task in self._tasks)
            and all(copier.healthy for copier in self._copiers.values())
        )

    def status(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "service": "transceiver",
            "gateway_pair": settings.gateway_pair,
            "mode": settings.mode,
            "interval_s": settings.interval_s if settings.mode == "periodic" else None,
            "bandwidth_bytes_per_s": settings.bandwidth_bytes_per_s,
            "throttle_waited_s": self.throttle.waited_s if self.throttle else 0.0,
            "ready": self.ready(),
            "vms": {vm_id: copier.status() for vm_id, copier in self._copiers.items()},
        }
