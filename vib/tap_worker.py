"""The tap service's worker: one `VmTap` per protected VM, one NBD server for them all."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry

from datapath.kafka import KafkaClusterSettings
from datapath.protection import ProtectedVM, load_protection_plan
from vib.nbd.export import Export
from vib.nbd.server import NbdServer
from vib.producer_process import ProcessTapTopic
from vib.resync_requests import ResyncRequestFollower
from vib.settings import TapSettings
from vib.tap_export import TapExport, export_name
from vib.tap_metrics import TapMetrics
from vib.tap_topic import TapTopic
from vib.vm_tap import VmTap

log = logging.getLogger(__name__)


class TapWorker:
    """Starts every protected VM's tap, then serves their disks over NBD (TCP and Unix)."""

    def __init__(self, settings: TapSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        self.taps: dict[str, VmTap] = {}
        self.metrics = TapMetrics(self.registry, lambda: list(self.taps.values()))
        self.exports: dict[str, Export] = {}
        self.nbd_server: NbdServer | None = None
        self.nbd_port: int | None = None
        self.resync_requests: list[ResyncRequestFollower] = []
        self._ready = False

    async def start(self) -> None:
        settings = self.settings
        plan = load_protection_plan(settings.plan)
        try:
            for vm in plan.vms:
                tap = self._build_tap(vm, plan.sites.source.kafka)
                await tap.start()
                self.taps[vm.id] = tap
                for disk in tap.disks:
                    self.exports[export_name(vm.id, disk.name)] = TapExport(tap, disk)
            default = next(iter(self.exports)) if len(self.exports) == 1 else None
            server = NbdServer(self.exports, default_export=default, registry=self.registry)
            self.nbd_server = server
            self.nbd_port = await server.serve_tcp(settings.nbd_host, settings.nbd_port)
            if settings.nbd_unix_socket is not None:
                await server.serve_unix(str(settings.nbd_unix_socket))
            if settings.act_on_resync_requests and self.taps:
                sites = {"source": plan.sites.source.kafka, "target": plan.sites.target.kafka}
                if sites["target"].bootstrap_servers == sites["source"].bootstrap_servers:
                    del sites["target"]  # one cluster for both (a test, a demo): read once
                for site, cluster in sites.items():
                    follower = ResyncRequestFollower(
                        cluster,
                        site,
                        self.taps,
                        request_timeout_s=settings.kafka_request_timeout_s,
                        retry_s=settings.reconnect_interval_s,
                        failures=self.metrics.resync_request_failures,
                    )
                    follower.start()
                    self.resync_requests.append(follower)
        except BaseException:
            await self.stop()
            raise
        self._ready = True
        log.info(
            "tap serving %d disks of %d VMs on nbd://%s:%d%s",
            len(self.exports),
            len(self.taps),
            settings.nbd_host,
            self.nbd_port,
            f" and {settings.nbd_unix_socket}" if settings.nbd_unix_socket else "",
        )

    def _build_tap(self, vm: ProtectedVM, cluster: KafkaClusterSettings) -> VmTap:
        kind = ProcessTapTopic if self.settings.use_producer_process() else TapTopic
        topic = kind(
            cluster,
            vm,
            create=self.settings.create_topics,
            request_timeout_s=self.settings.kafka_request_timeout_s,
        )
        return VmTap(vm, self.settings, topic, on_frame_acked=self.metrics.frame_acked)

    async def stop(self) -> None:
        self._ready = False
        for follower in self.resync_requests:
            await follower.stop()
        self.resync_requests.clear()
        # Guests first: requests in progress finish, then the taps drain and close.
        if self.nbd_server is not None:
            await self.nbd_server.close()
            self.nbd_server = None
        for tap in list(self.taps.values()):
            try:
                await tap.stop()
            except Exception as exc:
                # The other VMs' taps are stopped (their bitmaps flushed) all the same.
                log.error("VM %s: tap did not stop cleanly: %r", tap.vm_id, exc)
        self.taps.clear()
        self.exports.clear()

    def ready(self) -> bool:
        return self._ready

    def status(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "nbd": {
                "host": settings.nbd_host,
                "port": self.nbd_port,
                "unix_socket": str(settings.nbd_unix_socket) if settings.nbd_unix_socket else None,
                "exports": sorted(self.exports),
                "connections": self.nbd_server.connection_count if self.nbd_server else 0,
            },
            "vms": [tap.status() for tap in self.taps.values()],
        }

    async def full_sync(self, vm_id: str) -> None:
        """Starts a full sync of one VM (KeyError if it is not protected here)."""
        await self.taps[vm_id].request_full_sync()
