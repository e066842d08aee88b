"""The applier worker: one supervised apply loop per protected VM."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from datapath.kafka import KafkaMetrics, backoff_delay
from datapath.protection import ProtectedVM, ProtectionPlan, load_protection_plan
from datapath.provisioning import plan_topic_spec
from datapath.service import wait_ended
from datapath.topics import Stream, TopicSpec, topic_name
from services.applier.kafka_source import KafkaJournalSource, KafkaStatusSink
from services.applier.metrics import ApplierMetrics
from services.applier.settings import ApplierSettings
from services.applier.state import StateStore
from services.applier.vm import VmApplier

log = logging.getLogger(__name__)


class ApplierWorker:
    def __init__(self, settings: ApplierSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = ApplierMetrics(self.registry)
        self.kafka_metrics = KafkaMetrics(self.registry)
        self.vms: dict[str, VmApplier] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sink: KafkaStatusSink | None = None
        self._store: StateStore | None = None
        self._started = False

    async def start(self) -> None:
        settings = self.settings
        plan = await asyncio.to_thread(load_protection_plan, settings.plan)
        store = self._store = StateStore(settings.state_dir)
        await asyncio.to_thread(store.prepare)
        self._sink = self._status_sink(plan)
        target = plan.sites.target.kafka
        for vm in plan.vms:
            topic = topic_name(Stream.BATCH, vm.id)
            source = KafkaJournalSource(
                target, topic, metrics=self.kafka_metrics, create=self._journal_spec(vm, topic)
            )
            applier = VmApplier(vm, source, store, self._sink, self.metrics, settings.tuning())
            self.vms[vm.id] = applier
            self._tasks[vm.id] = asyncio.create_task(self._supervise(applier), name=vm.id)
        self._started = True
        log.info(
            "applier started: %d VMs from %s, state in %s, journal on %s",
            len(plan.vms),
            settings.plan,
            settings.state_dir,
            target.describe(),
        )

    def _journal_spec(self, vm: ProtectedVM, topic: str) -> TopicSpec | None:
        return plan_topic_spec([vm], topic) if self.settings.create_topics else None

    def _status_sink(self, plan: ProtectionPlan) -> KafkaStatusSink | None:
        site = self.settings.status_site
        if site == "none":
            return None
        cluster = plan.sites.target.kafka if site == "target" else plan.sites.source.kafka
        create = None
        if self.settings.create_topics:
            create = plan_topic_spec(plan.vms, topic_name(Stream.STATUS))
        return KafkaStatusSink(cluster, metrics=self.kafka_metrics, create=create)

    async def _supervise(self, applier: VmApplier) -> None:
        """Runs a VM's loop; after an error, restarts it from the durable state (which
        re-applies an interrupted unit first)."""
        settings = self.settings
        failures = 0
        while True:
            try:
                await applier.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # One VM's failure (disk, Kafka, a refused batch) never stops the others.
                failures += 1
                delay = backoff_delay(
                    settings.restart_backoff_s, failures, settings.max_restart_backoff_s
                )
                log.exception("VM %s: apply loop failed; restarting in %.1fs", applier.vm_id, delay)
                applier.last_error = f"{type(exc).__name__}: {exc}"
                applier.phase = "error"
                self.metrics.errors.labels(vm=applier.vm_id).inc()
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await wait_ended(tasks, "applier")
        for applier in self.vms.values():
            await applier.close()
        if self._sink is not None:
            await self._sink.stop()
        if self._store is not None:
            self._store.close()  # no save is running: the loops have ended
        self._tasks.clear()

    def ready(self) -> bool:
        return self._started and all(
            applier.started and not self._tasks[vm_id].done() for vm_id, applier in self.vms.items()
        )

    def status(self) -> dict[str, Any]:
        return {
            "service": "applier",
            "plan": str(self.settings.plan),
            "state_dir": str(self.settings.state_dir),
            "vms": {vm_id: applier.status() for vm_id, applier in self.vms.items()},
        }

    def vm(self, vm_id: str) -> VmApplier:
        return self.vms[vm_id]
