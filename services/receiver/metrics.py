"""The receiver's Prometheus metrics, on the registry its worker owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ReceiverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        vm = ("vm",)
        self.tap_messages = Counter(
            "datamover_receiver_tap_messages_total",
            "Tap messages (frames) consumed.",
            vm,
            registry=registry,
        )
        self.tap_bytes = Counter(
            "datamover_receiver_tap_bytes_total",
            "Bytes of tap messages consumed (bytes in).",
            vm,
            registry=registry,
        )
        self.batches = Counter(
            "datamover_receiver_batches_total",
            "Consistency batches committed to the batch topic.",
            vm,
            registry=registry,
        )
        self.batch_bytes = Counter(
            "datamover_receiver_batch_bytes_total",
            "Bytes of batch chunks committed to the batch topic (bytes out).",
            vm,
            registry=registry,
        )
        self.records_in = Counter(
            "datamover_receiver_records_in_total",
            "Tap records taken into committed batches, before folding.",
            vm,
            registry=registry,
        )
        self.records_out = Counter(
            "datamover_receiver_records_out_total",
            "Records in committed batches, after folding.",
            vm,
            registry=registry,
        )
        self.data_in = Counter(
            "datamover_receiver_data_bytes_in_total",
            "Guest data bytes (WRITE/SYNC_BLOCK payload) taken into committed batches.",
            vm,
            registry=registry,
        )
        self.data_out = Counter(
            "datamover_receiver_data_bytes_out_total",
            "Guest data bytes left after folding.",
            vm,
            registry=registry,
        )
        self.payload = Counter(
            "datamover_receiver_payload_bytes_total",
            "Encoded batch payload bytes before compression.",
            vm,
            registry=registry,
        )
        self.fold_ratio = Gauge(
            "datamover_receiver_fold_ratio",
            "Guest data bytes after folding / before, since start (1 = nothing folded).",
            vm,
            registry=registry,
        )
        self.compression_ratio = Gauge(
            "datamover_receiver_compression_ratio",
            "Batch bytes / uncompressed payload bytes, since start (1 = incompressible).",
            vm,
            registry=registry,
        )
        self.lag_messages = Gauge(
            "datamover_receiver_lag_messages",
            "Tap messages not yet covered by a committed batch (log end - committed offset).",
            vm,
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "datamover_receiver_lag_seconds",
            "Age of the oldest tap record not yet in a committed batch (0 when caught up).",
            vm,
            registry=registry,
        )
        self.duplicates = Counter(
            "datamover_receiver_duplicate_records_total",
            "Tap records skipped because an earlier batch already carries them.",
            vm,
            registry=registry,
        )
        self.gaps = Counter(
            "datamover_receiver_sequence_gaps_total",
            "Sequence gaps found in the tap stream (each one requests a resync).",
            vm,
            registry=registry,
        )
        self.quarantined = Counter(
            "datamover_receiver_quarantined_messages_total",
            "Corrupt tap messages moved to the dead-letter topic.",
            vm,
            registry=registry,
        )
        self.status_events = Counter(
            "datamover_receiver_status_events_total",
            "Status events published, by type.",
            ("type",),
            registry=registry,
        )
        self.errors = Counter(
            "datamover_receiver_errors_total",
            "Failures, by kind (transaction, fenced, kafka, encode).",
            ("kind",),
            registry=registry,
        )
        self.transaction_seconds = Histogram(
            "datamover_receiver_transaction_seconds",
            "Time to encode and commit one VM's transaction.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.assigned_vms = Gauge(
            "datamover_receiver_assigned_vms",
            "VMs whose tap topic this receiver currently consumes.",
            registry=registry,
        )
