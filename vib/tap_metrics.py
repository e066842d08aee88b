"""The tap's Prometheus metrics.

Per-write counters live as plain integers on each `VmTap` (a Prometheus counter takes a
lock per increment, too much at 100k writes/s) and are read at scrape time by a
collector; the publish latency is a histogram observed once per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vib.vm_tap import Mode, VmTap

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class TapMetrics:
    def __init__(self, registry: CollectorRegistry, taps: Callable[[], Iterable[VmTap]]) -> None:
        self.publish_latency = Histogram(
            "datamover_tap_publish_latency_seconds",
            "Time from handing a frame to the producer to Kafka's acknowledgement (acks=all).",
            labelnames=("vm",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.resync_request_failures = Counter(
            "datamover_tap_resync_request_failures",
            "Times following a site's status topic for resync requests, or acting on one, "
            "failed (tried again after a backoff; see vib/resync_requests.py).",
            registry=registry,
        )
        registry.register(_TapCollector(taps))

    def frame_acked(self, vm_id: str, size: int, latency: float) -> None:
        self.publish_latency.labels(vm=vm_id).observe(latency)


class _TapCollector(Collector):
    def __init__(self, taps: Callable[[], Iterable[VmTap]]) -> None:
        self._taps = taps

    def collect(self) -> Iterator[Metric]:
        taps = list(self._taps())
        ops = CounterMetricFamily(
            "datamover_tap_writes",
            "Guest requests that change or flush a disk, by operation.",
            labels=["vm", "op"],
        )
        op_bytes = CounterMetricFamily(
            "datamover_tap_write_bytes",
            "Bytes of guest writes, zeroes and trims.",
            labels=["vm", "op"],
        )
        frames = CounterMetricFamily(
            "datamover_tap_frames_published", "Frames acknowledged by Kafka.", labels=["vm"]
        )
        frame_bytes = CounterMetricFamily(
            "datamover_tap_published_bytes", "Bytes of frames acknowledged.", labels=["vm"]
        )
        outages = CounterMetricFamily(
            "datamover_tap_outages",
            "Publishing sessions that ended in an error (Kafka down, a timeout).",
            labels=["vm"],
        )
        overflows = CounterMetricFamily(
            "datamover_tap_buffer_overflows",
            "Times the unacknowledged bytes passed buffer_max_bytes and writes were tracked "
            "in the bitmap until the buffer drained (policy track).",
            labels=["vm"],
        )
        fast_writes = CounterMetricFamily(
            "datamover_tap_fast_writes",
            "Guest writes that took the C write path (vib/_fast_writes.c); the others took "
            "the Python one (cold extent, resync bracket, FUA, a payload still arriving).",
            labels=["vm"],
        )
        resyncs = CounterMetricFamily(
            "datamover_tap_resyncs_completed", "Resync brackets completed.", labels=["vm"]
        )
        resync_requests = CounterMetricFamily(
            "datamover_tap_resync_requests",
            "Resync requests of the receiver and the applier acted on (each started a full sync).",
            labels=["vm"],
        )
        heartbeats = CounterMetricFamily(
            "datamover_tap_heartbeats",
            "HEARTBEAT markers published while the guest wrote nothing.",
            labels=["vm"],
        )
        writebacks = CounterMetricFamily(
            "datamover_tap_writebacks",
            "Rounds of writing the source disks' dirty pages back (writeback_interval_s).",
            labels=["vm"],
        )
        al_commits = CounterMetricFamily(
            "datamover_tap_activity_log_commits",
            "Activity log transactions made durable (a write to a cold extent).",
            labels=["vm"],
        )
        gauges = {
            name: GaugeMetricFamily(f"datamover_tap_{name}", text, labels=["vm"])
            for name, text in (
                ("buffer_bytes", "Bytes published but not yet acknowledged by Kafka."),
                ("dirty_bytes", "Bytes marked dirty in the bitmap, waiting for a resync."),
                ("last_seq_assigned", "Last sequence number given to a record."),
                ("last_seq_acknowledged", "Last sequence number acknowledged by Kafka."),
                ("epoch", "Current epoch of the VM's tap."),
                ("hot_extents", "Extents hot in the activity log."),
                ("resync_bytes_done", "Bytes of disk covered by the current resync."),
                ("resync_bytes_total", "Bytes of disk the current resync covers in all."),
                ("resync_rate_bytes_per_second", "Progress rate of the current resync."),
                ("full_sync_pending", "1 while a full sync is pending or running."),
            )
        }
        mode = GaugeMetricFamily(
            "datamover_tap_mode", "1 for the VM's current mode.", labels=["vm", "mode"]
        )
        for tap in taps:
            vm = tap.vm_id
            stats = tap.stats
            for op, count, size in (
                ("write", stats.writes, stats.write_bytes),
                ("zero", stats.zeroes, stats.zero_bytes),
                ("trim", stats.trims, stats.trim_bytes),
                ("flush", stats.flushes, 0),
            ):
                ops.add_metric([vm, op], count)
                if op != "flush":
                    op_bytes.add_metric([vm, op], size)
            frames.add_metric([vm], stats.frames)
            frame_bytes.add_metric([vm], stats.frame_bytes)
            outages.add_metric([vm], stats.outages)
            overflows.add_metric([vm], stats.overflows)
            fast_writes.add_metric([vm], stats.fast_writes)
            resyncs.add_metric([vm], stats.resyncs_completed)
            resync_requests.add_metric([vm], stats.resync_requests)
            heartbeats.add_metric([vm], stats.heartbeats)
            writebacks.add_metric([vm], stats.writebacks)
            al_commits.add_metric([vm], tap.activity_log_commits)
            resync = tap.resync
            running = resync is not None and resync.finished_at is None
            values = {
                "buffer_bytes": tap.buffered_bytes,
                "dirty_bytes": tap.dirty_bytes(),
                "last_seq_assigned": tap.last_seq_assigned,
                "last_seq_acknowledged": tap.last_seq_acked,
                "epoch": tap.epoch,
                "hot_extents": tap.hot_extents,
                "resync_bytes_done": resync.done_bytes if resync is not None and running else 0,
                "resync_bytes_total": resync.total_bytes if resync is not None and running else 0,
                "resync_rate_bytes_per_second": resync.rate
                if resync is not None and running
                else 0,
                "full_sync_pending": int(tap.full_sync_pending),
            }
            for name, value in values.items():
                gauges[name].add_metric([vm], value)
            current = tap.mode
            for each in Mode:
                mode.add_metric([vm, each.value], 1 if each is current else 0)
        yield from (ops, op_bytes, frames, frame_bytes, outages, resyncs, heartbeats)
        yield from (overflows, fast_writes, writebacks, al_commits, resync_requests)
        yield from gauges.values()
        yield mode
