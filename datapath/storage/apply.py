"""Applying one journal record to a disk: the one place a record becomes bytes on storage.

The applier (batches onto target disks) and tap replay (a tap topic onto disks) both apply
records this way, so what replay shows is what the target gets.
"""

from __future__ import annotations

from datapath.journal import Record, RecordKind
from datapath.storage.backend import StorageBackend


def apply_record(backend: StorageBackend, record: Record) -> None:
    """Sets the range ``record`` addresses on ``backend`` (the disk ``record.disk`` names).

    WRITE/SYNC_BLOCK write their data as is (no copy), ZERO deallocates the range where the
    storage can (reads as zeros), TRIM discards it (reads as zeros too, on every backend).
    Only kinds in ``RANGE_KINDS`` are accepted: FLUSH and MARKER change no byte, so the
    caller skips them (it has no disk to pick for them either).
    """
    kind = record.kind
    if kind is RecordKind.WRITE or kind is RecordKind.SYNC_BLOCK:
        backend.write(record.offset, record.data)
    elif kind is RecordKind.ZERO:
        backend.write_zeroes(record.offset, record.length, punch_hole=True)
    elif kind is RecordKind.TRIM:
        backend.trim(record.offset, record.length)
    else:
        raise ValueError(f"{kind.name} record #{record.seq} addresses no disk range")
