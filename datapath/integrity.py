"""Integrity checking: does a target image equal the source after some prefix of writes?

A `Workload` generates writes whose every block (`block_size` bytes, 4 KiB by default)
carries a stamp naming the write that produced it: VM, disk, the workload's sequence
number, the block's index on the disk, and a CRC32C over the whole block. It also
generates zero and trim ranges, which leave blocks that read as zeros. Every operation
goes into a `WriteLog`.

`check_prefix(log, images)` reads the target images (one per disk, same order as the
VM's disks) and decides whether together they equal the source after the first P
operations of the log, for some P, and returns the lowest such P
(`consistent_prefixes` returns every such P, as ranges). When no P fits, it
raises `NotAPrefix` naming the first block that contradicts and why. Because every
block says which write produced it, the check needs no copy of the source.

The sequence numbers are the workload's own. When the workload is the VM's only writer
and issues one operation at a time, they are the VM's journal sequence shifted by a
constant, and "prefix of the workload" means "prefix of the VM's sequence". With writes
in flight concurrently the tap may order them differently than the workload numbered
them, and the check no longer applies.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import crc32c

from datapath.storage import StorageBackend, open_backend

DEFAULT_BLOCK_SIZE = 4096
MAGIC = b"DMICHK01"
# magic, crc32c(block[12:]), vm tag, disk, reserved, seq, block index
_STAMP = struct.Struct("<8sIIHHQQ")
_CRC_COVERS_FROM = 12
# Images are read in pieces of this size (a multiple of every sensible block size).
_READ_CHUNK = 4 << 20


class OpKind(StrEnum):
    WRITE = "write"
    ZERO = "zero"
    TRIM = "trim"


@dataclass(frozen=True, slots=True)
class WorkloadOp:
    """One operation of the workload. ZERO and TRIM carry no data; both leave the range
    reading as zeros."""

    seq: int
    kind: OpKind
    disk: int
    offset: int
    length: int
    data: bytes = b""


class IntegrityError(Exception):
    """The image cannot be checked (wrong size, unreadable, log mismatch...)."""


class NotAPrefix(IntegrityError):
    """The images equal the source after no prefix of the log. `disk` and `block` name
    the first block found to contradict; the message says what it holds and why that
    cannot be."""

    def __init__(self, message: str, *, disk: int, block: int) -> None:
        super().__init__(message)
        self.disk = disk
        self.block = block


def vm_tag(vm_id: str) -> int:
    return int(crc32c.crc32c(vm_id.encode()))


class WriteLog:
    """The operations of a workload in order, with a per-block history so the checker
    can tell which operations touched a block. Data is not kept (memory stays small)."""

    def __init__(
        self,
        vm_id: str,
        disk_sizes: Sequence[int],
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        first_seq: int = 1,
    ) -> None:
        if block_size < _STAMP.size or block_size % 512:
            raise ValueError(f"block size {block_size} must be a multiple of 512")
        for size in disk_sizes:
            if size % block_size:
                raise ValueError(f"disk size {size} is not a multiple of {block_size}")
        self.vm_id = vm_id
        self.tag = vm_tag(vm_id)
        self.disk_sizes = list(disk_sizes)
        self.block_size = block_size
        self.first_seq = first_seq
        self._ops: list[WorkloadOp] = []
        # (disk, block) -> ascending seqs of the operations that touched it
        self._history: dict[tuple[int, int], list[int]] = {}

    @property
    def ops(self) -> Sequence[WorkloadOp]:
        return self._ops

    @property
    def last_seq(self) -> int:
        """Seq of the last operation; first_seq - 1 when the log is empty."""
        return self.first_seq + len(self._ops) - 1

    def op(self, seq: int) -> WorkloadOp | None:
        index = seq - self.first_seq
        if 0 <= index < len(self._ops):
            return self._ops[index]
        return None

    def append(self, op: WorkloadOp) -> None:
        if op.seq != self.last_seq + 1:
            raise ValueError(f"operation seq {op.seq} does not follow {self.last_seq}")
        if not 0 <= op.disk < len(self.disk_sizes):
            raise ValueError(f"operation {op.seq} names disk {op.disk}, which does not exist")
        bs = self.block_size
        if op.offset % bs or op.length % bs or op.length <= 0:
            raise ValueError(f"operation {op.seq} is not aligned to {bs}-byte blocks")
        if op.offset + op.length > self.disk_sizes[op.disk]:
            raise ValueError(f"operation {op.seq} ends past the end of disk {op.disk}")
        self._ops.append(WorkloadOp(op.seq, op.kind, op.disk, op.offset, op.length))
        history = self._history
        for block in range(op.offset // bs, (op.offset + op.length) // bs):
            history.setdefault((op.disk, block), []).append(op.seq)

    def history(self, disk: int, block: int) -> Sequence[int]:
        return self._history.get((disk, block), ())

    def touched_blocks(self, disk: int) -> list[int]:
        """Sorted indexes of the blocks of `disk` that some operation touched."""
        return sorted(block for touched, block in self._history if touched == disk)

    def save(self, path: str | Path) -> None:
        """JSON lines: a header, then one line per operation."""
        with open(path, "w") as out:
            header = {
                "vm_id": self.vm_id,
                "disk_sizes": self.disk_sizes,
                "block_size": self.block_size,
                "first_seq": self.first_seq,
            }
            out.write(json.dumps(header) + "\n")
            for op in self._ops:
                out.write(json.dumps([op.seq, op.kind.value, op.disk, op.offset, op.length]))
                out.write("\n")

    @classmethod
    def load(cls, path: str | Path) -> WriteLog:
        with open(path) as lines:
            header = json.loads(next(lines))
            log = cls(
                header["vm_id"],
                header["disk_sizes"],
                block_size=header["block_size"],
                first_seq=header["first_seq"],
            )
            for line in lines:
                seq, kind, disk, offset, length = json.loads(line)
                log.append(WorkloadOp(seq, OpKind(kind), disk, offset, length))
        return log


class Workload:
    """Random stamped writes, zeroes and trims over a VM's disks, logged as they are
    generated. Deterministic for a given seed."""

    def __init__(
        self,
        vm_id: str,
        disk_sizes: Sequence[int],
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        seed: int = 0,
        max_blocks: int = 32,
        zero_fraction: float = 0.1,
        trim_fraction: float = 0.05,
        first_seq: int = 1,
    ) -> None:
        self.log = WriteLog(vm_id, disk_sizes, block_size=block_size, first_seq=first_seq)
        self._rng = random.Random(seed)
        self._max_blocks = max_blocks
        self._zero_fraction = zero_fraction
        self._trim_fraction = trim_fraction

    def next_op(self) -> WorkloadOp:
        rng = self._rng
        disk = rng.randrange(len(self.log.disk_sizes))
        disk_blocks = self.log.disk_sizes[disk] // self.log.block_size
        count = rng.randint(1, min(self._max_blocks, disk_blocks))
        block = rng.randrange(disk_blocks - count + 1)
        draw = rng.random()
        if draw < self._zero_fraction:
            return self.zero(disk, block, count)
        if draw < self._zero_fraction + self._trim_fraction:
            return self.zero(disk, block, count, kind=OpKind.TRIM)
        return self.write(disk, block, count)

    def take(self, count: int) -> list[WorkloadOp]:
        return [self.next_op() for _ in range(count)]

    def write(self, disk: int, block: int, count: int) -> WorkloadOp:
        """Logs and returns a write of `count` stamped blocks at `block`."""
        seq = self.log.last_seq + 1
        bs = self.log.block_size
        data = bytearray(self._rng.randbytes(count * bs))
        view = memoryview(data)
        for index in range(count):
            start = index * bs
            _STAMP.pack_into(data, start, MAGIC, 0, self.log.tag, disk, 0, seq, block + index)
            crc = crc32c.crc32c(view[start + _CRC_COVERS_FROM : start + bs])
            struct.pack_into("<I", data, start + 8, crc)
        op = WorkloadOp(seq, OpKind.WRITE, disk, block * bs, count * bs, bytes(data))
        self.log.append(op)
        return op

    def zero(self, disk: int, block: int, count: int, *, kind: OpKind = OpKind.ZERO) -> WorkloadOp:
        if kind is OpKind.WRITE:
            raise ValueError("zero() makes ZERO or TRIM operations")
        bs = self.log.block_size
        op = WorkloadOp(self.log.last_seq + 1, kind, disk, block * bs, count * bs)
        self.log.append(op)
        return op


def apply_op(op: WorkloadOp, disk: bytearray | memoryview) -> None:
    """Applies an operation to an in-memory model of its disk."""
    if op.kind is OpKind.WRITE:
        disk[op.offset : op.offset + op.length] = op.data
    else:
        disk[op.offset : op.offset + op.length] = bytes(op.length)


@dataclass(frozen=True, slots=True)
class _Written:
    disk: int
    block: int
    seq: int
    low: int  # the image fits prefixes low..high as far as this block is concerned
    high: int


ImageSource = str | os.PathLike[str] | StorageBackend


def check_prefix(log: WriteLog, images: Sequence[ImageSource]) -> int:
    """Returns the lowest P such that the images equal the source after operations
    first_seq..P of the log (first_seq - 1 when they equal the untouched, all-zero
    disks). Raises NotAPrefix when no P fits, IntegrityError when the images cannot be
    checked. images[i] is disk i: a path or an open StorageBackend."""
    return consistent_prefixes(log, images)[0][0]


def consistent_prefixes(log: WriteLog, images: Sequence[ImageSource]) -> list[tuple[int, int]]:
    """Every P for which the images equal the source after first_seq..P, as sorted,
    disjoint, inclusive ranges (never empty: NotAPrefix instead). Use it to check that
    the images hold exactly the prefix a replica claims to hold."""
    return _PrefixCheck(log, images).run()


def holds_prefix(ranges: Sequence[tuple[int, int]], prefix: int) -> bool:
    return any(low <= prefix <= high for low, high in ranges)


class _PrefixCheck:
    def __init__(self, log: WriteLog, images: Sequence[ImageSource]) -> None:
        if len(images) != len(log.disk_sizes):
            raise IntegrityError(f"{len(images)} images given for {len(log.disk_sizes)} disks")
        self.log = log
        self.images = images
        self.none = log.first_seq - 1
        self.end = log.last_seq
        self.written: list[_Written] = []
        self.zeroed: list[tuple[int, int]] = []  # blocks reading zeros that some op touched
        self.touched: list[int] = []  # touched blocks of the disk being scanned

    def run(self) -> list[tuple[int, int]]:
        for disk, image in enumerate(self.images):
            self._scan(disk, image)
        low, high, low_witness, high_witness = self.none, self.end, None, None
        for written in self.written:
            if written.low > low:
                low, low_witness = written.low, written
            if written.high < high:
                high, high_witness = written.high, written
            if low > high:
                assert low_witness is not None and high_witness is not None
                other = high_witness if written is low_witness else low_witness
                raise NotAPrefix(
                    f"{self._where(written)} holds write #{written.seq} "
                    f"(prefixes {written.low}..{written.high}) but {self._where(other)} "
                    f"holds write #{other.seq} (prefixes {other.low}..{other.high}): "
                    "no prefix of the log leaves both",
                    disk=written.disk,
                    block=written.block,
                )
        return self._fit_zero_blocks(low, high)

    def _fit_zero_blocks(self, low: int, high: int) -> list[tuple[int, int]]:
        # A zero block rules out every prefix in which its last operation was a write.
        # Each write's lifetime is an interval; the answer is what remains of low..high
        # outside every such interval.
        banned: list[tuple[int, int, int, int]] = []  # (start, stop, disk, block)
        for disk, block in self.zeroed:
            history = self.log.history(disk, block)
            for index, seq in enumerate(history):
                op = self.log.op(seq)
                assert op is not None
                if op.kind is OpKind.WRITE:
                    stop = history[index + 1] - 1 if index + 1 < len(history) else self.end
                    if stop >= low and seq <= high:
                        banned.append((seq, stop, disk, block))
        banned.sort()
        candidate = low
        allowed: list[tuple[int, int]] = []
        blocker: tuple[int, int, int, int] | None = None
        for start, stop, disk, block in banned:
            if start > high:
                break
            if start > candidate:
                allowed.append((candidate, start - 1))
            if stop >= candidate:
                candidate = stop + 1
                blocker = (start, stop, disk, block)
        if candidate <= high:
            allowed.append((candidate, high))
        if allowed:
            return allowed
        assert blocker is not None
        start, stop, disk, block = blocker
        raise NotAPrefix(
            f"disk {disk} block {block} reads as zeros, yet the other blocks fit only "
            f"prefixes {low}..{high} and in prefixes {start}..{stop} of them it holds "
            f"write #{start}",
            disk=disk,
            block=block,
        )

    def _where(self, written: _Written) -> str:
        return f"disk {written.disk} block {written.block}"

    def _scan(self, disk: int, image: ImageSource) -> None:
        expected = self.log.disk_sizes[disk]
        self.touched = self.log.touched_blocks(disk)
        opened: StorageBackend | None = None
        if isinstance(image, StorageBackend):
            backend = image
        else:
            try:
                opened = backend = open_backend(os.fspath(image), readonly=True)
            except OSError as exc:
                raise IntegrityError(f"cannot open image of disk {disk}: {exc}") from exc
        try:
            if backend.size < expected:
                raise IntegrityError(
                    f"image of disk {disk} has {backend.size} bytes, the log expects {expected}"
                )
            for extent in backend.allocated_extents(0, expected):
                if extent.zero:
                    self._zero_run(disk, extent.offset, extent.length)
                    continue
                position = extent.offset
                while position < extent.end:
                    step = min(_READ_CHUNK, extent.end - position)
                    self._scan_data(disk, position, backend.read(position, step))
                    position += step
        finally:
            if opened is not None:
                opened.close()

    def _zero_run(self, disk: int, offset: int, length: int) -> None:
        # Untouched blocks that read as zeros fit every prefix: only touched ones matter.
        bs = self.log.block_size
        lo = bisect.bisect_left(self.touched, offset // bs)
        hi = bisect.bisect_left(self.touched, (offset + length) // bs)
        self.zeroed.extend((disk, block) for block in self.touched[lo:hi])

    def _scan_data(self, disk: int, offset: int, data: bytes) -> None:
        bs = self.log.block_size
        if data.count(0) == len(data):
            self._zero_run(disk, offset, len(data))
            return
        view = memoryview(data)
        zero_block = bytes(bs)
        for start in range(0, len(data), bs):
            block = (offset + start) // bs
            piece = view[start : start + bs]
            if piece == zero_block:
                if self.log.history(disk, block):
                    self.zeroed.append((disk, block))
                continue
            self._stamped(disk, block, piece)

    def _stamped(self, disk: int, block: int, piece: memoryview) -> None:
        magic, crc, tag, stamp_disk, _, seq, stamp_block = _STAMP.unpack_from(piece)

        def refuse(why: str) -> NotAPrefix:
            return NotAPrefix(f"disk {disk} block {block} {why}", disk=disk, block=block)

        if magic != MAGIC:
            raise refuse("holds data that no write of the workload produced (no stamp)")
        if crc32c.crc32c(piece[_CRC_COVERS_FROM:]) != crc:
            raise refuse(f"holds a torn or corrupt block (stamp says write #{seq}, bad CRC)")
        if tag != self.log.tag or stamp_disk != disk or stamp_block != block:
            raise refuse(
                f"holds a block written for VM tag {tag:#x} disk {stamp_disk} block "
                f"{stamp_block} (misplaced data)"
            )
        history = self.log.history(disk, block)
        op = self.log.op(seq)
        index = bisect.bisect_left(history, seq)
        if (
            op is None
            or op.kind is not OpKind.WRITE
            or index == len(history)
            or history[index] != seq
        ):
            raise refuse(f"holds write #{seq}, which the log does not have for this block")
        high = history[index + 1] - 1 if index + 1 < len(history) else self.end
        self.written.append(_Written(disk, block, seq, seq, high))
