"""WAN benchmark: receiver and transceiver throughput, and WAN bytes per guest byte.

Two workloads of 4 KiB guest writes with half-compressible data (half random bytes, half
a repeated byte):

* ``unique``: every block written once, in random order (nothing to fold);
* ``hotspot``: 80 % of the writes go to a 1 MiB hot set, 20 % anywhere on 1 GiB.

Each runs twice in the same session: ``optimized`` (the receiver folds and compresses,
the product default) and ``baseline`` (no folding, no compression). A run publishes the
whole tap stream first, then times the receiver turning it into batches on the source
cluster, then the transceiver copying them to the target cluster. Batches are cut at
``--batch-mib`` of raw guest data (2 MiB: what the default 100 ms interval collects at
20 MB/s of guest writes), so the folding measured does not depend on how fast this
machine happens to be. ``wan_ratio`` is the bytes the transceiver sent / guest bytes.

Prints one JSON line. Two local Kafka sites are started under a temporary directory
unless ``--source``/``--target`` bootstrap servers are given.

    .venv/bin/python bench/wan.py [--quick] [--mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapath.journal import Record, RecordKind, encode_frame
from datapath.kafka import Admin, KafkaClusterSettings, Producer
from datapath.localsite import LocalSites
from datapath.protection import Disk, ProtectedVM, ProtectionPlan, Site, Sites
from datapath.topics import Stream, site_topic_specs, topic_name, vm_topic_specs
from services.receiver.settings import ReceiverSettings
from services.receiver.worker import Receiver
from services.transceiver.settings import TransceiverSettings
from services.transceiver.worker import Transceiver

BLOCK = 4096
MIB = 1024 * 1024
DISK_BYTES = 1024 * MIB
HOT_BYTES = 1 * MIB
HOT_SHARE = 0.8
RECORDS_PER_FRAME = 64
HOTSPOT_GOAL = 0.35


@dataclass
class Workload:
    name: str
    frames: list[bytes]
    last_seq: int
    guest_bytes: int


def make_workload(name: str, guest_bytes: int, vm_id: str, seed: int) -> Workload:
    rng = random.Random(seed)
    count = guest_bytes // BLOCK
    if name == "unique":
        offsets = [b * BLOCK for b in rng.sample(range(DISK_BYTES // BLOCK), count)]
    else:
        hot, cold = HOT_BYTES // BLOCK, DISK_BYTES // BLOCK
        offsets = [
            (rng.randrange(hot) if rng.random() < HOT_SHARE else rng.randrange(cold)) * BLOCK
            for _ in range(count)
        ]
    frames, records = [], []
    now = time.time_ns()
    for seq, offset in enumerate(offsets, start=1):
        data = rng.randbytes(BLOCK // 2) + bytes([rng.randrange(256)]) * (BLOCK // 2)
        records.append(Record(RecordKind.WRITE, seq, 0, offset, BLOCK, now + seq, data))
        if len(records) == RECORDS_PER_FRAME:
            frames.append(encode_frame(vm_id, 1, records))
            records = []
    if records:
        frames.append(encode_frame(vm_id, 1, records))
    return Workload(name, frames, count, count * BLOCK)


async def create_topics(cluster: KafkaClusterSettings, vm_id: str) -> None:
    specs = site_topic_specs(replication_factor=1) + vm_topic_specs(
        vm_id, replication_factor=1, retention_ms=3_600_000, max_message_bytes=8 * MIB
    )
    async with Admin(cluster) as admin:
        await admin.create_topics(specs)


async def publish(cluster: KafkaClusterSettings, vm_id: str, frames: list[bytes]) -> None:
    topic = topic_name(Stream.TAP, vm_id)
    async with Producer(cluster, linger_ms=5) as producer:
        deliveries = [await producer.send(topic, frame, partition=0) for frame in frames]
        for delivery in deliveries:
            await delivery


async def wait_until(predicate: Any, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def run_case(
    source: KafkaClusterSettings,
    target: KafkaClusterSettings,
    scenario: str,
    optimized: bool,
    guest_bytes: int,
    batch_bytes: int,
    seed: int,
) -> dict[str, float]:
    vm_id = f"wan-{scenario}-{uuid.uuid4().hex[:8]}"
    workload = make_workload(scenario, guest_bytes, vm_id, seed)
    await asyncio.gather(create_topics(source, vm_id), create_topics(target, vm_id))
    await publish(source, vm_id, workload.frames)
    plan = ProtectionPlan(
        sites=Sites(source=Site(kafka=source), target=Site(kafka=target)),
        vms=[ProtectedVM(id=vm_id, disks=[Disk(name="d0", source="-", target="-")])],
    )
    tag = uuid.uuid4().hex[:8]
    receiver = Receiver(
        ReceiverSettings(
            plan=Path("unused"),
            group_id=f"bench-{tag}",
            transactional_id_prefix=f"bench-r-{tag}",
            batch_interval_s=3600.0,  # batches are cut by size: see the module docstring
            max_batch_bytes=batch_bytes,
            fold=optimized,
            compress=optimized,
        ),
        plan,
    )
    await receiver.start()
    try:
        started = await wait_until(receiver.ready, 120, "receiver ready")
        done = await wait_until(
            lambda: receiver.status()["vms"][vm_id]["last_committed_seq"] == workload.last_seq,
            600,
            "receiver done",
        )
    finally:
        await receiver.stop()
    receiver_s = done - started

    transceiver = Transceiver(
        TransceiverSettings(plan=Path("unused"), transactional_id_prefix=f"bench-t-{tag}"),
        plan,
    )
    await transceiver.start()
    try:
        started = await wait_until(transceiver.ready, 120, "transceiver ready")
        copier = transceiver.status
        done = await wait_until(
            lambda: copier()["vms"][vm_id]["last_seq"] == workload.last_seq,
            600,
            "transceiver done",
        )
        wan_bytes = copier()["vms"][vm_id]["copied_bytes"]
    finally:
        await transceiver.stop()
    transceiver_s = done - started
    metrics = receiver.metrics
    data_in = metrics.data_in.labels(vm=vm_id)._value.get()
    data_out = metrics.data_out.labels(vm=vm_id)._value.get()
    payload = metrics.payload.labels(vm=vm_id)._value.get()
    return {
        "receiver_mb_s": round(workload.guest_bytes / receiver_s / 1e6, 2),
        "transceiver_mb_s": round(workload.guest_bytes / transceiver_s / 1e6, 2),
        "wan_ratio": round(wan_bytes / workload.guest_bytes, 4),
        "fold_ratio": round(data_out / data_in, 4) if data_in else 1.0,
        "compression_ratio": round(wan_bytes / payload, 4) if payload else 1.0,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    sites = None
    tmp = None
    if args.source and args.target:
        source = KafkaClusterSettings(bootstrap_servers=args.source)
        target = KafkaClusterSettings(bootstrap_servers=args.target)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dm-bench-wan-")
        sites = await asyncio.to_thread(LocalSites.start, Path(tmp.name))
        source = KafkaClusterSettings(bootstrap_servers=sites.source.bootstrap)
        target = KafkaClusterSettings(bootstrap_servers=sites.target.bootstrap)
    try:
        batch_bytes = int(args.batch_mib * MIB) // BLOCK * BLOCK
        # Whole batches only: the last one is cut by size like every other.
        guest_bytes = -(-args.mib * MIB // batch_bytes) * batch_bytes
        result: dict[str, Any] = {
            "bench": "wan",
            "guest_mib": args.mib,
            "batch_raw_mib": args.batch_mib,
            "block_bytes": BLOCK,
            "hotspot_workload": f"{HOT_SHARE:.0%} of writes to {HOT_BYTES // MIB} MiB of 1 GiB",
        }
        for scenario in ("unique", "hotspot"):
            result[scenario] = {
                mode: await run_case(
                    source, target, scenario, mode == "optimized", guest_bytes, batch_bytes, 7
                )
                for mode in ("optimized", "baseline")
            }
        result["hotspot_goal_wan_ratio"] = HOTSPOT_GOAL
        result["hotspot_goal_met"] = result["hotspot"]["optimized"]["wan_ratio"] <= HOTSPOT_GOAL
        return result
    finally:
        if sites is not None:
            await asyncio.to_thread(sites.stop)
        if tmp is not None:
            tmp.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="16 MiB per run")
    parser.add_argument("--mib", type=int, default=64, help="guest MiB per run")
    parser.add_argument("--batch-mib", type=float, default=2.0, help="raw MiB per batch")
    parser.add_argument("--source", help="source bootstrap servers (default: local site)")
    parser.add_argument("--target", help="target bootstrap servers (default: local site)")
    args = parser.parse_args()
    if args.quick:
        args.mib = 16
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(asyncio.run(bench(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
