"""The transceiver's Prometheus metrics, on the registry its worker owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TransceiverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        vm = ("vm",)
        self.messages = Counter(
            "datamover_transceiver_messages_total",
            "Batch chunks copied to the target (committed).",
            vm,
            registry=registry,
        )
        self.bytes = Counter(
            "datamover_transceiver_bytes_total",
            "Bytes of batch chunks copied to the target (the WAN payload).",
            vm,
            registry=registry,
        )
        self.batches = Counter(
            "datamover_transceiver_batches_total",
            "Complete batches copied (their last chunk committed on the target).",
            vm,
            registry=registry,
        )
        self.transactions = Counter(
            "datamover_transceiver_transactions_total",
            "Target transactions committed.",
            vm,
            registry=registry,
        )
        self.lag_records = Gauge(
            "datamover_transceiver_lag_records",
            "Source batch-topic offsets not yet copied (end offset - position).",
            vm,
            registry=registry,
        )
        self.lag_bytes = Gauge(
            "datamover_transceiver_lag_bytes",
            "Estimated bytes not yet copied (lag records x mean chunk size).",
            vm,
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "datamover_transceiver_lag_seconds",
            "Age of the oldest source write not yet on the target (0 when caught up).",
            vm,
            registry=registry,
        )
        self.last_seq = Gauge(
            "datamover_transceiver_last_copied_seq",
            "Last sequence number copied to the target.",
            vm,
            registry=registry,
        )
        self.target_up = Gauge(
            "datamover_transceiver_target_up",
            "1 while the VM's copy to the target works, 0 while it is failing.",
            vm,
            registry=registry,
        )
        self.backlog_lost = Counter(
            "datamover_transceiver_backlog_lost_records_total",
            "Source offsets deleted by retention before they were copied (needs a resync).",
            vm,
            registry=registry,
        )
        self.errors = Counter(
            "datamover_transceiver_errors_total",
            "Failures, by kind (open, copy, fenced, timeout).",
            ("vm", "kind"),
            registry=registry,
        )
        self.throttle_wait = Counter(
            "datamover_transceiver_throttle_wait_seconds_total",
            "Time spent waiting for the bandwidth throttle.",
            registry=registry,
        )
        self.transaction_seconds = Histogram(
            "datamover_transceiver_transaction_seconds",
            "Time to copy and commit one target transaction.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
