"""A whole Datamover deployment on this machine: both sites and every service.

`LocalDeployment` is what `dmover local up`, `make demo` and the end-to-end tests run:
two single-node Kafka clusters (source and target site), then the tap, receiver,
transceiver and applier as child processes reading one protection plan. Its state
(endpoints and process ids) is written to `<root>/state.json` for `dmover local status`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from datapath.kafka.settings import KafkaClusterSettings
from datapath.localsite import (
    LocalSites,
    SiteError,
    die_with_parent,
    free_loopback_ports,
    log_tail,
)
from datapath.protection import (
    Disk,
    ProtectedVM,
    ProtectionPlan,
    Site,
    Sites,
    dump_protection_plan,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
DEFAULT_DISK_SIZE = 256 * 1024 * 1024


class DeploymentError(RuntimeError):
    """A part of the local deployment could not start; the message says which and why."""


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    http: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    # How long a SIGTERM is given before SIGKILL: the tap drains what it buffers to Kafka
    # (up to 10 s, then its producer's timeout) so that its restart resyncs nothing.
    stop_timeout: float = 20.0

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                # A supervisor killed (SIGKILL, the OOM killer) takes its services along,
                # as it does its brokers: none is left to fight the next `local up`.
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise DeploymentError(
                    f"{self.name} exited with {self.process.returncode}:\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.http}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise DeploymentError(
            f"{self.name} not healthy after {timeout}s:\n{log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        timeout = self.stop_timeout
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %ss; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


@dataclass
class Endpoints:
    source_kafka: str
    target_kafka: str
    nbd: str
    nbd_socket: str
    services: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    plan: str = ""


def default_plan(
    root: Path,
    source_bootstrap: str,
    target_bootstrap: str,
    *,
    vm_id: str = "demo-vm",
    disk_size: int = DEFAULT_DISK_SIZE,
) -> ProtectionPlan:
    """One VM with one thin disk: what the demo and `dmover local up` protect."""
    disks = root / "disks"
    return ProtectionPlan(
        sites=Sites(
            source=Site(kafka=KafkaClusterSettings(bootstrap_servers=source_bootstrap)),
            target=Site(kafka=KafkaClusterSettings(bootstrap_servers=target_bootstrap)),
        ),
        vms=[
            ProtectedVM(
                id=vm_id,
                disks=[
                    Disk(
                        name="disk0",
                        source=str(disks / "source" / f"{vm_id}-disk0.raw"),
                        target=str(disks / "target" / f"{vm_id}-disk0.raw"),
                        size=disk_size,
                    )
                ],
            )
        ],
    )


class LocalDeployment:
    """Both sites and the services, started in order and stopped in reverse.

    With `kafka=(source, target)` bootstrap addresses it uses running clusters (the test
    suite's) instead of starting its own; `env` adds settings for every service (their
    env prefixes apply), e.g. a consumer group of its own per deployment.
    """

    def __init__(
        self,
        root: Path,
        *,
        disk_size: int = DEFAULT_DISK_SIZE,
        vm_id: str = "demo-vm",
        kafka: tuple[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.disk_size = disk_size
        self.vm_id = vm_id
        self.kafka = kafka
        self.extra_env = env or {}
        self.sites: LocalSites | None = None
        self.services: list[ServiceProcess] = []
        self.endpoints: Endpoints | None = None
        self.plan_path = self.root / "plan.yaml"

    def start(self, *, timeout: float = 90.0) -> Endpoints:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            if self.kafka is None:
                try:
                    self.sites = LocalSites.start(self.root / "sites")
                except SiteError as exc:  # no jars, no Java, a broker that would not start
                    raise DeploymentError(f"the local Kafka sites did not start: {exc}") from exc
                source, target = self.sites.source.bootstrap, self.sites.target.bootstrap
            else:
                source, target = self.kafka
            plan = default_plan(
                self.root, source, target, vm_id=self.vm_id, disk_size=self.disk_size
            )
            for vm in plan.vms:
                for disk in vm.disks:
                    Path(disk.source).parent.mkdir(parents=True, exist_ok=True)
                    Path(disk.target).parent.mkdir(parents=True, exist_ok=True)
            dump_protection_plan(plan, self.plan_path)
            nbd_port, *http_ports = free_loopback_ports(5)
            nbd_socket = self.root / "tap.sock"
            self.services = self._service_processes(nbd_port, nbd_socket, http_ports)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
            for service in self.services:
                service.start(env)
            for service in self.services:
                service.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        self.endpoints = Endpoints(
            source_kafka=source,
            target_kafka=target,
            nbd=f"nbd://127.0.0.1:{nbd_port}",
            nbd_socket=str(nbd_socket),
            services={s.name: s.http for s in self.services},
            pids={
                "supervisor": os.getpid(),
                **{
                    f"kafka_{site.name}": site.process.pid
                    for site in self.sites or ()
                    if site.process is not None
                },
                **{s.name: s.process.pid for s in self.services if s.process is not None},
            },
            plan=str(self.plan_path),
        )
        # Written whole or not at all: `dmover local up` polls for it.
        partial = self.root / f"{STATE_FILE}.partial"
        partial.write_text(json.dumps(asdict(self.endpoints), indent=2))
        partial.replace(self.root / STATE_FILE)
        return self.endpoints

    @property
    def applier_state_dir(self) -> Path:
        """Where the applier keeps its per-VM state files (services.applier.state)."""
        return self.root / "state" / "applier"

    def _service_processes(
        self, nbd_port: int, nbd_socket: Path, http_ports: list[int]
    ) -> list[ServiceProcess]:
        dmover = [sys.executable, "-m", "dmover"]
        plan = ["--plan", str(self.plan_path)]
        state = self.root / "state"
        logs = self.root / "logs"
        specs: list[tuple[str, list[str]]] = [
            (
                "tap",
                [
                    "--state-dir",
                    str(state / "tap"),
                    "--nbd-port",
                    str(nbd_port),
                    "--nbd-socket",
                    str(nbd_socket),
                ],
            ),
            ("receiver", []),
            ("transceiver", []),
            ("applier", ["--state-dir", str(self.applier_state_dir)]),
        ]
        return [
            ServiceProcess(
                name=name,
                argv=[*dmover, name, *plan, "--host", "127.0.0.1", "--port", str(port), *extra],
                http=f"http://127.0.0.1:{port}",
                log_path=logs / f"{name}.log",
                stop_timeout=60.0 if name == "tap" else 20.0,
            )
            for (name, extra), port in zip(specs, http_ports, strict=True)
        ]

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.sites is not None:
            self.sites.stop()
            self.sites = None
        state = self.root / STATE_FILE
        state.unlink(missing_ok=True)


def read_state(root: Path) -> Endpoints | None:
    try:
        return Endpoints(**json.loads((root / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None


def replication_positions(
    http: httpx.Client, endpoints: Endpoints, vm_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tap's and the applier's view of one VM (their `/status` entries)."""
    tap = http.get(f"{endpoints.services['tap']}/status")
    tap.raise_for_status()
    applier = http.get(f"{endpoints.services['applier']}/status")
    applier.raise_for_status()
    tap_vm = next(v for v in tap.json()["vms"] if v["vm"] == vm_id)
    applier_vm: dict[str, Any] = applier.json()["vms"][vm_id]
    return tap_vm, applier_vm


def is_drained(tap_vm: dict[str, Any], applier_vm: dict[str, Any]) -> bool:
    """Everything the tap acknowledged is applied on the target and nothing is pending."""
    return bool(
        tap_vm["mode"] == "live"
        and not tap_vm["full_sync_pending"]
        and (tap_vm["resync"] is None or tap_vm["resync"]["state"] == "complete")
        and tap_vm["last_seq_acknowledged"] == tap_vm["last_seq_assigned"]
        and applier_vm["applied_seq"] >= tap_vm["last_seq_acknowledged"]
        and applier_vm["lag_batches"] == 0
    )


def wait_drained(
    http: httpx.Client, endpoints: Endpoints, vm_id: str, *, timeout: float = 300.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        tap_vm, applier_vm = replication_positions(http, endpoints, vm_id)
        if is_drained(tap_vm, applier_vm):
            return tap_vm, applier_vm
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"{vm_id} did not drain in {timeout:.0f}s: tap {tap_vm}, applier {applier_vm}"
            )
        time.sleep(0.1)
