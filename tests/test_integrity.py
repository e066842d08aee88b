"""The integrity checker recognises exactly the images that equal some prefix of the
workload, and names the first block that contradicts otherwise."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datapath.integrity import (
    IntegrityError,
    NotAPrefix,
    OpKind,
    Workload,
    WriteLog,
    apply_op,
    check_prefix,
    consistent_prefixes,
    holds_prefix,
)
from datapath.storage import FileBackend

BLOCK = 512
DISK_BLOCKS = 16
DISKS = [DISK_BLOCKS * BLOCK, DISK_BLOCKS * BLOCK]


def replay(workload: Workload, written: dict[int, bytes], upto: int) -> list[bytearray]:
    disks = [bytearray(size) for size in workload.log.disk_sizes]
    for op in workload.log.ops:
        if op.seq > upto:
            break
        apply_op(replace(op, data=written.get(op.seq, b"")), disks[op.disk])
    return disks


def generated(seed: int, count: int, first_seq: int = 1) -> tuple[Workload, dict[int, bytes]]:
    workload = Workload(
        "vm-integrity",
        DISKS,
        block_size=BLOCK,
        seed=seed,
        max_blocks=6,
        zero_fraction=0.2,
        trim_fraction=0.1,
        first_seq=first_seq,
    )
    data = {op.seq: op.data for op in workload.take(count) if op.kind is OpKind.WRITE}
    return workload, data


def write_images(directory: Path, disks: list[bytearray]) -> list[Path]:
    paths = []
    for index, content in enumerate(disks):
        path = directory / f"disk{index}.img"
        path.write_bytes(content)
        paths.append(path)
    return paths


def all_prefix_images(workload: Workload, data: dict[int, bytes]) -> dict[int, list[bytes]]:
    log = workload.log
    disks = [bytearray(size) for size in log.disk_sizes]
    images = {log.first_seq - 1: [bytes(d) for d in disks]}
    for op in log.ops:
        apply_op(replace(op, data=data.get(op.seq, b"")), disks[op.disk])
        images[op.seq] = [bytes(d) for d in disks]
    return images


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    count=st.integers(0, 30),
    first_seq=st.integers(1, 10**9),
    data=st.data(),
)
def test_every_prefix_image_passes_and_names_its_prefix(
    seed: int, count: int, first_seq: int, data: st.DataObject
) -> None:
    workload, written = generated(seed, count, first_seq)
    log = workload.log
    prefix = data.draw(st.integers(log.first_seq - 1, log.last_seq), label="prefix")
    images = all_prefix_images(workload, written)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), [bytearray(d) for d in images[prefix]])
        found = check_prefix(log, paths)
        ranges = consistent_prefixes(log, paths)
    # The lowest prefix that leaves the same image: nothing between it and `prefix`
    # changed any block.
    assert log.first_seq - 1 <= found <= prefix
    assert holds_prefix(ranges, prefix)
    assert images[found] == images[prefix]
    if found > log.first_seq - 1:
        assert images[found - 1] != images[prefix]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), count=st.integers(2, 30), data=st.data())
def test_mixed_image_passes_only_when_it_equals_a_prefix(
    seed: int, count: int, data: st.DataObject
) -> None:
    workload, written = generated(seed, count)
    log = workload.log
    images = all_prefix_images(workload, written)
    base = data.draw(st.integers(0, log.last_seq), label="base prefix")
    other = data.draw(st.integers(0, log.last_seq), label="other prefix")
    mixed = [bytearray(d) for d in images[base]]
    # Take some blocks from another prefix: a torn, reordered application.
    blocks = data.draw(
        st.lists(st.tuples(st.integers(0, 1), st.integers(0, DISK_BLOCKS - 1)), max_size=6),
        label="blocks from the other prefix",
    )
    for disk, block in blocks:
        start = block * BLOCK
        mixed[disk][start : start + BLOCK] = images[other][disk][start : start + BLOCK]
    matching = sorted(p for p, image in images.items() if image == [bytes(d) for d in mixed])
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), mixed)
        if matching:
            assert check_prefix(log, paths) == min(matching)
            found = consistent_prefixes(log, paths)
            assert sorted(p for low, high in found for p in range(low, high + 1)) == matching
        else:
            with pytest.raises(NotAPrefix):
                check_prefix(log, paths)


def test_torn_block_is_named(tmp_path: Path) -> None:
    workload, written = generated(seed=7, count=20)
    last = workload.write(1, 3, 2)
    written[last.seq] = last.data
    disks = replay(workload, written, workload.log.last_seq)
    # Half of block 4 of disk 1 is lost, as if the write was torn mid-block.
    start = 4 * BLOCK + BLOCK // 2
    disks[1][start : start + BLOCK // 2] = bytes(BLOCK // 2)
    paths = write_images(tmp_path, disks)
    with pytest.raises(NotAPrefix, match="disk 1 block 4 holds a torn") as raised:
        check_prefix(workload.log, paths)
    assert (raised.value.disk, raised.value.block) == (1, 4)


def test_write_applied_before_an_earlier_one_is_refused(tmp_path: Path) -> None:
    workload = Workload("vm-order", [8 * BLOCK], block_size=BLOCK)
    first = workload.write(0, 0, 1)  # seq 1, block 0
    second = workload.write(0, 1, 1)  # seq 2, block 1
    third = workload.write(0, 0, 1)  # seq 3 overwrites block 0
    image = bytearray(8 * BLOCK)
    image[0:BLOCK] = third.data  # seq 3 landed
    # ... but seq 2 did not: no prefix leaves block 0 at #3 and block 1 empty.
    paths = write_images(tmp_path, [image])
    with pytest.raises(NotAPrefix, match="disk 0 block 1 reads as zeros") as raised:
        check_prefix(workload.log, paths)
    assert raised.value.block == 1
    image[BLOCK : 2 * BLOCK] = second.data
    write_images(tmp_path, [image])
    assert check_prefix(workload.log, paths) == 3
    image[0:BLOCK] = first.data
    write_images(tmp_path, [image])
    assert check_prefix(workload.log, paths) == 2


def test_zeroed_and_trimmed_blocks_are_checked(tmp_path: Path) -> None:
    workload = Workload("vm-zero", [8 * BLOCK], block_size=BLOCK)
    one = workload.write(0, 0, 4)  # seq 1
    workload.zero(0, 1, 1)  # seq 2
    workload.zero(0, 2, 1, kind=OpKind.TRIM)  # seq 3
    image = bytearray(8 * BLOCK)
    image[0 : 4 * BLOCK] = one.data
    paths = write_images(tmp_path, [image])
    assert check_prefix(workload.log, paths) == 1
    image[BLOCK : 3 * BLOCK] = bytes(2 * BLOCK)
    write_images(tmp_path, [image])
    assert check_prefix(workload.log, paths) == 3
    # Block 2 trimmed but block 1 still holding write #1: trim (#3) without zero (#2).
    image[BLOCK : 2 * BLOCK] = one.data[BLOCK : 2 * BLOCK]
    write_images(tmp_path, [image])
    with pytest.raises(NotAPrefix):
        check_prefix(workload.log, paths)


def test_foreign_data_and_misplaced_blocks_are_refused(tmp_path: Path) -> None:
    workload = Workload("vm-foreign", [8 * BLOCK], block_size=BLOCK)
    op = workload.write(0, 0, 2)
    image = bytearray(8 * BLOCK)
    image[5 * BLOCK : 5 * BLOCK + 3] = b"abc"
    paths = write_images(tmp_path, [image])
    with pytest.raises(NotAPrefix, match="block 5 holds data that no write"):
        check_prefix(workload.log, paths)
    image = bytearray(8 * BLOCK)
    image[3 * BLOCK : 4 * BLOCK] = op.data[0:BLOCK]  # block 0's data at block 3
    write_images(tmp_path, [image])
    with pytest.raises(NotAPrefix, match=r"block 3 holds a block written for .* block 0"):
        check_prefix(workload.log, paths)


def test_backends_and_a_saved_log_are_accepted(tmp_path: Path) -> None:
    workload, written = generated(seed=3, count=25)
    disks = replay(workload, written, 17)
    paths = write_images(tmp_path, disks)
    workload.log.save(tmp_path / "log.jsonl")
    loaded = WriteLog.load(tmp_path / "log.jsonl")
    expected = check_prefix(workload.log, paths)
    assert holds_prefix(consistent_prefixes(workload.log, paths), 17) and expected <= 17
    with FileBackend(str(paths[0])) as one, FileBackend(str(paths[1])) as two:
        assert check_prefix(loaded, [one, two]) == expected


def test_wrong_number_or_size_of_images_is_an_error(tmp_path: Path) -> None:
    workload, _ = generated(seed=1, count=3)
    with pytest.raises(IntegrityError, match="1 images given for 2 disks"):
        check_prefix(workload.log, [tmp_path / "x"])
    small = tmp_path / "small"
    small.write_bytes(bytes(BLOCK))
    with pytest.raises(IntegrityError, match="has 512 bytes"):
        check_prefix(workload.log, [small, small])
