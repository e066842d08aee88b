"""Prometheus metrics of the NBD server.

Connections count requests in plain integers and add them here once per batch of
requests (see NbdConnection), so a 4 KiB write does not pay for a locked counter update.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from vib.nbd import protocol as p


class NbdMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # A private registry by default: two servers in one process must not collide.
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "nbd_requests",
            "NBD requests received, by command",
            ["command"],
            registry=self.registry,
        )
        self.read_bytes = Counter(
            "nbd_read_bytes", "Bytes returned to NBD READ requests", registry=self.registry
        )
        self.written_bytes = Counter(
            "nbd_written_bytes", "Bytes received in NBD WRITE requests", registry=self.registry
        )
        self.errors = Counter(
            "nbd_request_errors",
            "NBD requests answered with an error, by command and NBD error value",
            ["command", "error"],
            registry=self.registry,
        )
        self.protocol_violations = Counter(
            "nbd_protocol_violations",
            "Sessions or requests that broke the protocol, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.connections = Counter(
            "nbd_connections", "NBD connections accepted", registry=self.registry
        )
        self.active_connections = Gauge(
            "nbd_active_connections", "NBD connections open now", registry=self.registry
        )
        # Children resolved once: label lookups are the slow part of a counter update.
        self.requests_by_command = tuple(self.requests.labels(name) for name in p.COMMAND_NAMES)
        self.requests_unknown = self.requests.labels("unknown")

    def add_requests(self, counts: list[int]) -> None:
        """Fold per-command counts (indexed by command number) into the counters."""
        for command, count in enumerate(counts):
            if count:
                self.requests_by_command[command].inc(count)

    def request_error(self, command: int, error: int) -> None:
        name = p.COMMAND_NAMES[command] if command < len(p.COMMAND_NAMES) else "unknown"
        self.errors.labels(name, str(error)).inc()

    def violation(self, kind: str) -> None:
        self.protocol_violations.labels(kind).inc()
