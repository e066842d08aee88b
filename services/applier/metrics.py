"""The applier's Prometheus metrics, on the registry its worker owns. Every series is
labelled by VM."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_AGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)
_APPLY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApplierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        vm = ("vm",)
        self.rpo = Gauge(
            "datamover_rpo_seconds",
            "Age of the oldest write acknowledged on the source and not yet applied on the "
            "target; when nothing read is waiting, the age of the newest record applied (an "
            "upper bound, kept tight by the tap's heartbeats).",
            vm,
            registry=registry,
        )
        self.apply_age = Histogram(
            "datamover_applier_apply_age_seconds",
            "Age of the oldest write of each unit (batches, resync bracket) when it became "
            "durable on the target: the RPO each apply closed.",
            vm,
            buckets=_AGE_BUCKETS,
            registry=registry,
        )
        self.apply_seconds = Histogram(
            "datamover_applier_apply_seconds",
            "Time to write and fsync one unit on the target disks.",
            vm,
            buckets=_APPLY_BUCKETS,
            registry=registry,
        )
        self.applied_seq = Gauge(
            "datamover_applier_applied_seq", "Last sequence number applied.", vm, registry=registry
        )
        self.applied_source_ts = Gauge(
            "datamover_applier_applied_source_timestamp_seconds",
            "Source time the target equals (newest write applied).",
            vm,
            registry=registry,
        )
        self.batches = Counter(
            "datamover_applier_batches_applied_total", "Batches applied.", vm, registry=registry
        )
        self.units = Counter(
            "datamover_applier_units_applied_total",
            "Units (groups of batches or resync brackets) applied, each one intent and fsync.",
            vm,
            registry=registry,
        )
        self.data_bytes = Counter(
            "datamover_applier_data_bytes_total",
            "Data bytes written to target disks.",
            vm,
            registry=registry,
        )
        self.zero_bytes = Counter(
            "datamover_applier_zeroed_bytes_total",
            "Bytes zeroed or trimmed (holes punched) on target disks.",
            vm,
            registry=registry,
        )
        self.duplicates = Counter(
            "datamover_applier_duplicate_batches_total",
            "Batches refused because their sequence range was already applied.",
            vm,
            registry=registry,
        )
        self.gaps = Counter(
            "datamover_applier_gaps_total",
            "Sequence gaps (and corrupt or stale batches) that stopped the VM.",
            ("vm", "reason"),
            registry=registry,
        )
        self.skipped = Counter(
            "datamover_applier_skipped_batches_total",
            "Batches passed over while the VM waits for a resync.",
            vm,
            registry=registry,
        )
        self.redos = Counter(
            "datamover_applier_redo_total",
            "Units re-applied from Kafka after a crash or an error in the middle of them.",
            vm,
            registry=registry,
        )
        self.errors = Counter(
            "datamover_applier_errors_total",
            "Errors that restarted a VM's apply loop (storage, Kafka).",
            vm,
            registry=registry,
        )
        self.lag_messages = Gauge(
            "datamover_applier_lag_messages",
            "Kafka messages in the VM's target journal after the applied position.",
            vm,
            registry=registry,
        )
        self.lag_batches = Gauge(
            "datamover_applier_lag_batches",
            "Batches read from the journal and not yet applied (staged resync included).",
            vm,
            registry=registry,
        )
        self.lag_bytes = Gauge(
            "datamover_applier_lag_bytes",
            "Bytes (decompressed) of the batches read and not yet applied.",
            vm,
            registry=registry,
        )
        self.staged_resync_seconds = Gauge(
            "datamover_applier_staged_resync_seconds",
            "Age of the oldest write in the resync bracket being staged (0 when none): a "
            "bracket is applied only whole, so this grows until it completes.",
            vm,
            registry=registry,
        )
        self.staged_resync_bytes = Gauge(
            "datamover_applier_staged_resync_bytes",
            "Bytes (decompressed) of the resync bracket being staged (0 when none).",
            vm,
            registry=registry,
        )
        self.paused = Gauge(
            "datamover_applier_paused", "1 while the VM is paused.", vm, registry=registry
        )
        self.needs_resync = Gauge(
            "datamover_applier_needs_resync",
            "1 while the VM waits for a resync (nothing is applied).",
            vm,
            registry=registry,
        )
