"""A VM's target disks and the one operation the applier performs on them: apply whole
batches, then make them durable.

Every record a batch carries sets the final content of its range (data for WRITE and
SYNC_BLOCK, zeros for ZERO and TRIM); none depends on what the disk held before. So
applying a unit of batches twice, or after a crash left part of it on the disk, gives the
same disks as applying it once: every byte the unit touches ends with the value of the
last record over it, every other byte is untouched. That is what makes redo from Kafka
correct.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from datapath.journal import DATA_KINDS, RANGE_KINDS, Batch
from datapath.protection import Disk, ProtectedVM
from datapath.storage import StorageBackend, StorageError, open_backend
from datapath.storage.apply import apply_record

log = logging.getLogger(__name__)


class BatchRefused(ValueError):
    """A batch that cannot be applied to these disks (unknown disk, range past the end).
    Found before any byte is written."""


@dataclass(slots=True)
class ApplyStats:
    data_bytes: int = 0
    zero_bytes: int = 0
    records: int = 0


def target_size(disk: Disk) -> int | None:
    """The size a missing target file is created with: the plan's, else the source's
    when this host can see it, else unknown (an existing target is then used as is)."""
    if disk.size is not None:
        return disk.size
    try:
        return os.stat(disk.source).st_size
    except OSError:
        return None


class TargetDisks:
    """The open target backends of one VM, index = disk number in the journal."""

    def __init__(self, vm: ProtectedVM) -> None:
        self.vm_id = vm.id
        self.backends: list[StorageBackend] = []
        # What a full resync sets: the source's size when the plan (or this host) knows
        # it, else the target's. A block device or NBD export may be larger than its
        # source (a volume rounded up); its bytes past the source's end belong to no one.
        self.source_sizes: list[int] = []
        try:
            for disk in vm.disks:
                size = target_size(disk)
                backend = open_backend(disk.target, create_size=size)
                self.backends.append(backend)
                self.source_sizes.append(backend.size if size is None else min(size, backend.size))
        except BaseException:
            self.close()
            raise

    def check(self, batches: Iterable[Batch]) -> None:
        """Refuses batches that name a disk or a range these disks do not have."""
        count = len(self.backends)
        for batch in batches:
            for record in batch.records:
                if record.kind not in RANGE_KINDS:
                    continue
                if record.disk >= count:
                    raise BatchRefused(
                        f"batch {batch.first_seq}..{batch.last_seq} of VM {self.vm_id} writes "
                        f"disk {record.disk}; the plan gives it {count} disks"
                    )
                size = self.backends[record.disk].size
                if record.offset + record.length > size:
                    raise BatchRefused(
                        f"batch {batch.first_seq}..{batch.last_seq} of VM {self.vm_id} writes "
                        f"disk {record.disk} at {record.offset}+{record.length}, past its end "
                        f"({size} bytes)"
                    )

    def apply(self, batches: Iterable[Batch]) -> ApplyStats:
        """Applies the batches in order and flushes every disk they touched. Blocking:
        run it in a thread."""
        stats, touched = self.apply_unflushed(batches)
        self.flush(touched)
        return stats

    def apply_unflushed(self, batches: Iterable[Batch]) -> tuple[ApplyStats, set[int]]:
        """Applies the batches in order; returns what was done and the disks touched,
        which the caller must flush before it records the batches as applied."""
        stats = ApplyStats()
        touched: set[int] = set()
        backends = self.backends
        for batch in batches:
            for record in batch.records:
                kind = record.kind
                if kind not in RANGE_KINDS:
                    # FLUSH: the unit is made durable as a whole. MARKER: bookkeeping.
                    continue
                apply_record(backends[record.disk], record)
                if kind in DATA_KINDS:
                    stats.data_bytes += record.length
                else:
                    stats.zero_bytes += record.length
                touched.add(record.disk)
                stats.records += 1
        return stats, touched

    def flush(self, disks: Iterable[int]) -> None:
        for index in sorted(disks):
            self.backends[index].flush()

    def flush_all(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except StorageError as exc:
                log.warning("closing target disk %s of VM %s: %s", backend.name, self.vm_id, exc)
        self.backends = []
