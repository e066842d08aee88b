"""Helpers shared by the receiver and transceiver tests: plans, tap streams, batch checks."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiokafka.structs import TopicPartition

from datapath.journal import Batch, BatchAssembler, MarkerKind, Record, RecordKind, encode_frame
from datapath.kafka import Admin, Consumer, KafkaClusterSettings, Producer
from datapath.localsite import LOG_TAIL_LINES, free_loopback_ports, log_tail
from datapath.protection import (
    Disk,
    ProtectedVM,
    ProtectionPlan,
    Site,
    Sites,
    dump_protection_plan,
)
from datapath.topics import Stream, site_topic_specs, topic_name, vm_topic_specs

REPO_ROOT = Path(__file__).resolve().parent.parent
DISK_SIZE = 256 * 1024
BLOCK = 4096
MiB = 1024 * 1024


def write_plan(
    path: Path, source: KafkaClusterSettings, target: KafkaClusterSettings, vm_ids: Iterable[str]
) -> Path:
    plan = ProtectionPlan(
        sites=Sites(source=Site(kafka=source), target=Site(kafka=target)),
        vms=[
            ProtectedVM(
                id=vm_id,
                disks=[
                    Disk(
                        name=f"d{i}", source=f"/nonexistent/{vm_id}-{i}", target="-", size=DISK_SIZE
                    )
                    for i in range(2)
                ],
            )
            for vm_id in vm_ids
        ],
    )
    dump_protection_plan(plan, path)
    return path


async def create_topics(cluster: KafkaClusterSettings, vm_ids: Iterable[str]) -> None:
    specs = site_topic_specs(replication_factor=1)
    for vm_id in vm_ids:
        specs += vm_topic_specs(
            vm_id, replication_factor=1, retention_ms=24 * 3600 * 1000, max_message_bytes=8 * MiB
        )
    async with Admin(cluster) as admin:
        await admin.create_topics(specs)


@dataclass
class TapStream:
    """A VM's synthetic guest writes, in sequence order, as the tap would publish them."""

    vm_id: str
    rng: random.Random
    epoch: int = 1
    next_seq: int = 0
    records: list[Record] = field(default_factory=list)
    next_marker: int = 1

    def frame(self, count: int, *, hot_blocks: int | None = None) -> bytes:
        """The next frame: ``count`` random writes (zero/trim/flush sprinkled in)."""
        records = []
        for _ in range(count):
            records.append(self._record(hot_blocks))
        self.records += records
        return encode_frame(self.vm_id, self.epoch, records)

    def bracket(self, blocks: int) -> list[bytes]:
        """A resync bracket of ``blocks`` sync blocks with live writes among them."""
        marker_id = self.next_marker
        self.next_marker += 1
        frames = [self._marker_frame(MarkerKind.RESYNC_START, marker_id)]
        for _ in range(blocks):
            seq = self._take_seq()
            offset = self.rng.randrange(DISK_SIZE // BLOCK) * BLOCK
            rec = Record(
                RecordKind.SYNC_BLOCK, seq, 0, offset, BLOCK, time.time_ns(), _data(self.rng)
            )
            self.records.append(rec)
            frames.append(encode_frame(self.vm_id, self.epoch, [rec]))
            frames.append(self.frame(1))
        frames.append(self._marker_frame(MarkerKind.RESYNC_END, marker_id))
        return frames

    def _marker_frame(self, kind: MarkerKind, marker_id: int) -> bytes:
        rec = Record(
            RecordKind.MARKER,
            self._take_seq(),
            0,
            0,
            0,
            time.time_ns(),
            marker=kind,
            marker_id=marker_id,
        )
        self.records.append(rec)
        return encode_frame(self.vm_id, self.epoch, [rec])

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _record(self, hot_blocks: int | None) -> Record:
        rng = self.rng
        seq = self._take_seq()
        disk = rng.randrange(2)
        blocks = hot_blocks or DISK_SIZE // BLOCK
        offset = rng.randrange(blocks) * BLOCK + rng.choice((0, 0, 0, 512))
        length = min(rng.choice((BLOCK, BLOCK, 2 * BLOCK, 512)), DISK_SIZE - offset)
        roll = rng.random()
        ts = time.time_ns()
        if roll < 0.05:
            return Record(RecordKind.ZERO, seq, disk, offset, length, ts)
        if roll < 0.08:
            return Record(RecordKind.TRIM, seq, disk, offset, length, ts)
        if roll < 0.1:
            return Record(RecordKind.FLUSH, seq, 0, 0, 0, ts)
        return Record(RecordKind.WRITE, seq, disk, offset, length, ts, _data(rng, length))


def _data(rng: random.Random, length: int = BLOCK) -> bytes:
    # Half random, half a repeated byte: compressible like real guest data, never trivially.
    half = length // 2
    return rng.randbytes(half) + bytes([rng.randrange(256)]) * (length - half)


async def publish(
    cluster: KafkaClusterSettings, vm_id: str, frames: Iterable[bytes | None]
) -> None:
    topic = topic_name(Stream.TAP, vm_id)
    async with Producer(cluster) as producer:
        deliveries = [await producer.send(topic, frame, partition=0) for frame in frames]
        for delivery in deliveries:
            await delivery


async def read_topic(
    cluster: KafkaClusterSettings, topic: str, *, timeout_s: float = 30.0
) -> list[bytes | None]:
    """Every committed record's value (None: it has none) of partition 0 of ``topic`` up
    to its current end."""
    tp = TopicPartition(topic, 0)
    async with Consumer(cluster, isolation_level="read_committed") as consumer:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[bytes | None] = []
        deadline = time.monotonic() + timeout_s
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took longer than {timeout_s}s")
            got = await consumer.getmany(tp, timeout_ms=500)
            values += [m.value for m in got.get(tp, [])]
        return values


async def read_batches(cluster: KafkaClusterSettings, vm_id: str) -> list[Batch]:
    assembler = BatchAssembler()
    batches = []
    for value in await read_topic(cluster, topic_name(Stream.BATCH, vm_id)):
        if value is None:
            continue  # no chunk (tests/test_transceiver_kafka.py puts one there)
        batch = assembler.add(value)
        if batch is not None:
            batches.append(batch)
    assert assembler.discarded_batches == 0, "a batch was left incomplete in the topic"
    return batches


async def wait_for_batches(
    cluster: KafkaClusterSettings, vm_id: str, last_seq: int, *, timeout_s: float
) -> list[Batch]:
    """Polls the batch topic until a batch ends at ``last_seq`` (or beyond)."""
    deadline = time.monotonic() + timeout_s
    while True:
        batches = await read_batches(cluster, vm_id)
        if batches and batches[-1].last_seq >= last_seq:
            return batches
        if time.monotonic() > deadline:
            got = batches[-1].last_seq if batches else None
            raise AssertionError(f"{vm_id}: batches reach seq {got}, expected {last_seq}")
        await asyncio.sleep(0.5)


def apply(disks: dict[int, bytearray], records: Iterable[Record]) -> None:
    for rec in records:
        if rec.kind in (RecordKind.WRITE, RecordKind.SYNC_BLOCK):
            disk = disks.setdefault(rec.disk, bytearray(DISK_SIZE))
            disk[rec.offset : rec.offset + rec.length] = rec.data
        elif rec.kind in (RecordKind.ZERO, RecordKind.TRIM):
            disk = disks.setdefault(rec.disk, bytearray(DISK_SIZE))
            disk[rec.offset : rec.offset + rec.length] = bytes(rec.length)


def check_batches(batches: list[Batch], raw: list[Record]) -> None:
    """The batches cover ``raw``'s sequence exactly once, in order, and applying them whole
    reproduces the source after each batch's last record (crash consistency)."""
    assert batches, "no batches"
    assert batches[0].first_seq == raw[0].seq
    assert batches[-1].last_seq == raw[-1].seq
    for before, after in itertools.pairwise(batches):
        assert after.first_seq == before.last_seq + 1, (
            f"seq {before.first_seq}..{before.last_seq} then {after.first_seq}..{after.last_seq}: "
            "gap or duplicate"
        )
    by_seq = {rec.seq: rec for rec in raw}
    source: dict[int, bytearray] = {}
    target: dict[int, bytearray] = {}
    for batch in batches:
        apply(source, (by_seq[s] for s in range(batch.first_seq, batch.last_seq + 1)))
        apply(target, batch.records)
        for disk in set(source) | set(target):
            assert source.get(disk, bytearray(DISK_SIZE)) == target.get(
                disk, bytearray(DISK_SIZE)
            ), f"disk {disk} differs after batch {batch.first_seq}..{batch.last_seq}"


class ServiceProcess:
    """A receiver or transceiver run as ``python -m services.<name>``, killable at will."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_loopback_ports(1)[0]
        self.argv = [
            sys.executable,
            "-m",
            f"services.{name}",
            *args,
            "--port",
            str(self.port),
            "--log-level",
            "INFO",
        ]
        self.log_path = log_path
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, (
                    f"{self.name} exited:\n{self.log_tail()}"
                )
                try:
                    response = await client.get(f"http://127.0.0.1:{self.port}/ready")
                    if response.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines=lines)
