"""Shared pieces of the applier tests (no tests here): a source VM that generates stamped
writes and the batches the receiver would cut from them, a writer that puts batches on a
target batch topic the way the transceiver does, an in-process applier, and an in-memory
journal for the edge cases of one VM's loop (crash states, pause and resume)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from datapath.integrity import OpKind, Workload, WorkloadOp, apply_op
from datapath.journal import Batch, MarkerKind, Record, RecordKind, encode_batch, peek_header
from datapath.kafka import Admin, KafkaClusterSettings, TransactionalProducer
from datapath.protection import Disk, ProtectedVM
from datapath.topics import Stream, site_topic_specs, topic_name, vm_topic_specs
from services.applier.journal_source import JournalMessage
from services.applier.metrics import ApplierMetrics
from services.applier.settings import ApplierSettings
from services.applier.state import StateStore
from services.applier.vm import ApplyTuning, VmApplier
from services.applier.worker import ApplierWorker
from services.receiver.folding import fold_records

BLOCK = 4096
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def write_plan(
    path: Path,
    source: KafkaClusterSettings,
    target: KafkaClusterSettings,
    vms: dict[str, Sequence[tuple[str, int]]],
) -> Path:
    """A protection plan: vms maps a VM id to its disks as (target spec, size)."""
    plan = {
        "sites": {
            "source": {"kafka": {"bootstrap_servers": source.bootstrap_servers}},
            "target": {"kafka": {"bootstrap_servers": target.bootstrap_servers}},
        },
        "vms": [
            {
                "id": vm_id,
                "disks": [
                    {"name": f"disk{i}", "source": f"/nonexistent/{vm_id}/{i}", "target": spec}
                    | {"size": size}
                    for i, (spec, size) in enumerate(disks)
                ],
                "journal": {"replication_factor": 1, "max_message_bytes": MAX_MESSAGE_BYTES},
            }
            for vm_id, disks in vms.items()
        ],
    }
    path.write_text(yaml.safe_dump(plan))
    return path


async def create_topics(cluster: KafkaClusterSettings, *vm_ids: str) -> None:
    specs = site_topic_specs(replication_factor=1)
    for vm_id in vm_ids:
        specs += vm_topic_specs(
            vm_id,
            replication_factor=1,
            retention_ms=3_600_000,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )
    async with Admin(cluster) as admin:
        await admin.create_topics(specs)


async def file_targets(
    tmp_path: Path,
    source: KafkaClusterSettings,
    target: KafkaClusterSettings,
    vm_id: str,
    sizes: Sequence[int],
) -> tuple[list[Path], Path]:
    """One VM whose target disks are files t0.img, t1.img... in tmp_path: the disks, and the
    plan (written to tmp_path/plan.yaml) with the VM's topics created on the target."""
    disks = [tmp_path / f"t{i}.img" for i in range(len(sizes))]
    plan = write_plan(
        tmp_path / "plan.yaml",
        source,
        target,
        {vm_id: [(str(d), s) for d, s in zip(disks, sizes, strict=True)]},
    )
    await create_topics(target, vm_id)
    return disks, plan


class SourceVm:
    """A VM on the source site as the applier sees it: its sequence of writes (from an
    integrity workload, so every block names its write), a model of its disks, and the
    folded batches the receiver would publish."""

    def __init__(
        self,
        vm_id: str,
        disk_sizes: Sequence[int],
        *,
        seed: int = 1,
        max_blocks: int = 16,
        zero_fraction: float = 0.1,
        trim_fraction: float = 0.05,
    ) -> None:
        self.vm_id = vm_id
        self.workload = Workload(
            vm_id,
            disk_sizes,
            block_size=BLOCK,
            seed=seed,
            max_blocks=max_blocks,
            zero_fraction=zero_fraction,
            trim_fraction=trim_fraction,
        )
        self.model = [bytearray(size) for size in disk_sizes]
        self.epoch = 1
        # Journal seq = workload seq + shift (resync blocks take journal seqs of their own).
        self.shift = 0

    @property
    def log(self) -> Any:
        return self.workload.log

    @property
    def last_seq(self) -> int:
        return int(self.workload.log.last_seq) + self.shift

    def ops(self, count: int) -> list[WorkloadOp]:
        ops = self.workload.take(count)
        for op in ops:
            apply_op(op, self.model[op.disk])
        return ops

    def write(self, disk: int, block: int, count: int) -> WorkloadOp:
        op = self.workload.write(disk, block, count)
        apply_op(op, self.model[op.disk])
        return op

    def zero(self, disk: int, block: int, count: int, kind: OpKind = OpKind.ZERO) -> WorkloadOp:
        op = self.workload.zero(disk, block, count, kind=kind)
        apply_op(op, self.model[op.disk])
        return op

    def batch(
        self,
        ops: Sequence[WorkloadOp],
        *,
        resync_id: int = 0,
        starts: bool = False,
        completes: bool = False,
    ) -> Batch:
        """The folded batch of these (consecutive) operations. In a resync bracket the
        writes travel as SYNC_BLOCKs and the markers share the first/last seq."""
        now = time.time_ns()
        data_kind = RecordKind.SYNC_BLOCK if resync_id else RecordKind.WRITE
        records = [self.record(op, now, data_kind) for op in ops]
        first, last = records[0].seq, records[-1].seq
        if starts:
            marker = Record(RecordKind.MARKER, first, 0, 0, 0, now, b"", MarkerKind.RESYNC_START)
            records.insert(0, _with_marker_id(marker, resync_id))
        if completes:
            marker = Record(RecordKind.MARKER, last, 0, 0, 0, now, b"", MarkerKind.RESYNC_END)
            records.append(_with_marker_id(marker, resync_id))
        return Batch(
            vm_id=self.vm_id,
            epoch=self.epoch,
            first_seq=first,
            last_seq=last,
            min_ts_ns=now,
            max_ts_ns=now,
            records=fold_records(records),
            resync_id=resync_id,
            resync_complete=completes,
        )

    def record(self, op: WorkloadOp, ts: int, data_kind: RecordKind = RecordKind.WRITE) -> Record:
        seq = op.seq + self.shift
        if op.kind is OpKind.WRITE:
            return Record(data_kind, seq, op.disk, op.offset, op.length, ts, op.data)
        kind = RecordKind.ZERO if op.kind is OpKind.ZERO else RecordKind.TRIM
        return Record(kind, seq, op.disk, op.offset, op.length, ts)

    def full_resync(self, resync_id: int, *, pieces: int = 3) -> list[Batch]:
        """A full resync bracket: every disk's current content as SYNC_BLOCKs, split over
        `pieces` batches. Its blocks take journal seqs of their own."""
        regions = []
        for disk, content in enumerate(self.model):
            step = max(BLOCK, len(content) // pieces)
            regions += [(disk, offset, step) for offset in range(0, len(content), step)]
        return self.resync(resync_id, regions, pieces=pieces)

    def resync(
        self, resync_id: int, regions: Sequence[tuple[int, int, int]], *, pieces: int = 3
    ) -> list[Batch]:
        """A resync bracket sending the current content of (disk, offset, length) regions."""
        now = time.time_ns()
        extents = [
            (disk, offset, bytes(self.model[disk][offset : offset + length]))
            for disk, offset, length in regions
        ]
        seq = self.last_seq + 1
        records = []
        for disk, offset, data in extents:
            records.append(Record(RecordKind.SYNC_BLOCK, seq, disk, offset, len(data), now, data))
            seq += 1
        self.shift += len(records)
        start = Record(
            RecordKind.MARKER, records[0].seq, 0, 0, 0, now, b"", MarkerKind.RESYNC_START
        )
        end = Record(RecordKind.MARKER, records[-1].seq, 0, 0, 0, now, b"", MarkerKind.RESYNC_END)
        # Each batch holds a contiguous seq range.
        per = -(-len(records) // pieces)
        groups = [records[i : i + per] for i in range(0, len(records), per)]
        batches = []
        for index, group in enumerate(groups):
            body = list(group)
            if index == 0:
                body.insert(0, _with_marker_id(start, resync_id))
            completes = index == len(groups) - 1
            if completes:
                body.append(_with_marker_id(end, resync_id))
            batches.append(
                Batch(
                    vm_id=self.vm_id,
                    epoch=self.epoch,
                    first_seq=group[0].seq,
                    last_seq=group[-1].seq,
                    min_ts_ns=now,
                    max_ts_ns=now,
                    records=body,
                    resync_id=resync_id,
                    resync_complete=completes,
                )
            )
        return batches


def _with_marker_id(record: Record, marker_id: int) -> Record:
    return Record(
        record.kind,
        record.seq,
        record.disk,
        record.offset,
        record.length,
        record.ts_ns,
        record.data,
        record.marker,
        marker_id,
    )


class JournalWriter:
    """Puts batches on a VM's target batch topic as the transceiver does: chunks of one
    or more batches in one transaction."""

    def __init__(
        self, cluster: KafkaClusterSettings, vm_id: str, *, max_message_bytes: int = 64 * 1024
    ) -> None:
        self.topic = topic_name(Stream.BATCH, vm_id)
        self.max_message_bytes = max_message_bytes
        self.producer = TransactionalProducer(
            cluster, transactional_id=f"test-applier-{vm_id}-{uuid.uuid4().hex[:8]}"
        )

    async def __aenter__(self) -> JournalWriter:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(self, *batches: Batch) -> None:
        messages = [
            chunk
            for batch in batches
            for chunk in encode_batch(batch, max_message_bytes=self.max_message_bytes)
        ]
        await self.send_raw(messages)

    async def send_raw(self, messages: Sequence[bytes]) -> None:
        # The commit raises if any record failed: no delivery needs awaiting.
        async with self.producer.transaction():
            for message in messages:
                await self.producer.send(self.topic, message)


def applier_settings(plan: Path, state_dir: Path, **overrides: Any) -> ApplierSettings:
    values: dict[str, Any] = {
        "plan": plan,
        "state_dir": state_dir,
        "fetch_timeout_s": 0.2,
        "end_offset_interval_s": 0.2,
        "restart_backoff_s": 0.2,
        "pause_timeout_s": 30.0,
    }
    values.update(overrides)
    return ApplierSettings(**values)


@asynccontextmanager
async def running_applier(
    plan: Path, state_dir: Path, **overrides: Any
) -> AsyncIterator[ApplierWorker]:
    worker = ApplierWorker(applier_settings(plan, state_dir, **overrides))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def wait_until(
    predicate: Callable[[], bool], *, within: float = 60.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class MemoryJournal:
    """A VM's target journal in memory (a JournalSource): one message per offset, no
    transaction markers. `start_delay_s` makes `start()` slow, as a cluster that answers
    late; `forget_before(offset)` is retention removing the journal's head."""

    def __init__(self, *, start_delay_s: float = 0.0) -> None:
        self.messages: dict[int, bytes] = {}
        self.end = 0
        self.log_start = 0
        self.position_ = 0
        self.start_delay_s = start_delay_s
        self.seeks: list[int] = []  # every seek asked for, in order

    def append(self, *batches: Batch, max_message_bytes: int = 64 * 1024) -> None:
        for batch in batches:
            for chunk in encode_batch(batch, max_message_bytes=max_message_bytes):
                self.messages[self.end] = chunk
                self.end += 1

    def offsets_of(self, batch_index: int) -> tuple[int, int]:
        """The first and last offset of the n-th batch appended (0-based)."""
        firsts = [o for o, m in sorted(self.messages.items()) if peek_header(m).chunk_index == 0]
        first = firsts[batch_index]
        following = [o for o in firsts if o > first]
        return first, (following[0] if following else self.end) - 1

    def forget_before(self, offset: int) -> None:
        for old in [o for o in self.messages if o < offset]:
            del self.messages[old]
        self.log_start = offset

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay_s)

    async def stop(self) -> None:
        pass

    async def seek(self, offset: int) -> None:
        self.seeks.append(offset)
        self.position_ = max(offset, self.log_start)

    async def fetch(self, timeout_s: float) -> list[JournalMessage]:
        taken = []
        while self.position_ < self.end and len(taken) < 256:
            taken.append(JournalMessage(self.position_, self.messages[self.position_]))
            self.position_ += 1
        if not taken:
            await asyncio.sleep(timeout_s)
        return taken

    async def end_offset(self) -> int:
        return self.end

    async def position(self) -> int:
        return self.position_


def memory_applier(
    vm: SourceVm,
    disks: Sequence[Path],
    journal: MemoryJournal,
    state_dir: Path,
    *,
    pause_timeout_s: float = 5.0,
    max_unit_bytes: int = 64 << 20,
) -> VmApplier:
    """One VM's apply loop over `journal` (run it with `run()`), its target disks the
    files `disks` (created with the VM's disk sizes)."""
    protected = ProtectedVM(
        id=vm.vm_id,
        disks=[
            Disk(name=f"disk{i}", source=f"/nonexistent/{i}", target=str(path), size=len(model))
            for i, (path, model) in enumerate(zip(disks, vm.model, strict=True))
        ],
    )
    store = StateStore(state_dir)
    store.prepare()
    tuning = ApplyTuning(
        fetch_timeout_s=0.1,
        end_offset_interval_s=0.1,
        pause_timeout_s=pause_timeout_s,
        max_unit_bytes=max_unit_bytes,
    )
    return VmApplier(protected, journal, store, None, ApplierMetrics(CollectorRegistry()), tuning)
