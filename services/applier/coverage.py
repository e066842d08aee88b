"""Which bytes of a VM's disks a resync bracket sets.

A VM stopped by a gap (or a corrupt batch) has lost writes it cannot name, so only a
resync that sets every byte of every disk can repair it. The applier checks that from
the bracket itself rather than trusting a flag: while it stages the bracket it adds up
the ranges its records set (data, zeros, trims), and heals only when they cover all.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from datapath.journal import RANGE_KINDS, Record


class Coverage:
    def __init__(self, disk_sizes: Sequence[int]) -> None:
        self.disk_sizes = list(disk_sizes)
        # Per disk: sorted, disjoint, non-adjacent [start, end) runs.
        self._starts: list[list[int]] = [[] for _ in disk_sizes]
        self._ends: list[list[int]] = [[] for _ in disk_sizes]

    def add_records(self, records: Iterable[Record]) -> None:
        for record in records:
            if record.kind in RANGE_KINDS and record.length:
                self.add(record.disk, record.offset, record.offset + record.length)

    def add(self, disk: int, start: int, end: int) -> None:
        if not 0 <= disk < len(self.disk_sizes):
            return
        starts, ends = self._starts[disk], self._ends[disk]
        # First run that ends at or after `start` (touching counts) ...
        first = bisect.bisect_left(ends, start)
        # ... and runs up to the last one starting at or before `end`.
        last = bisect.bisect_right(starts, end)
        if first < last:
            start = min(start, starts[first])
            end = max(end, ends[last - 1])
        starts[first:last] = [start]
        ends[first:last] = [end]

    def covered_bytes(self) -> int:
        total = 0
        for disk, size in enumerate(self.disk_sizes):
            for start, end in zip(self._starts[disk], self._ends[disk], strict=True):
                total += max(0, min(end, size) - start)
        return total

    @property
    def total_bytes(self) -> int:
        return sum(self.disk_sizes)

    def complete(self) -> bool:
        return all(
            size == 0 or (starts[:1] == [0] and ends[0] >= size)
            for starts, ends, size in zip(self._starts, self._ends, self.disk_sizes, strict=True)
        )
