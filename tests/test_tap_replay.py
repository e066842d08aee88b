"""Guarantees 1 and 3 through real clients: whatever qemu-io, qemu-img and fio write
through the tap, the VM's tap topic replayed onto empty files equals the source disks
byte for byte, and its sequence is gapless across all disks of the VM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from tap_helpers import (
    DiskSpec,
    MiB,
    assert_replay_equals_source,
    nbd_uri,
    replay_onto_files,
    run,
    running_tap,
    tap_settings,
    wait_caught_up,
    wait_live,
    wait_until,
    write_plan,
)

from datapath.kafka import KafkaClusterSettings


def two_disks(tmp_path: Path, size: int = 64 * MiB) -> list[DiskSpec]:
    return [DiskSpec(f"d{i}", tmp_path / f"src{i}.img", size) for i in range(2)]


@pytest.mark.parametrize("producer_process", [True, False], ids=["child-producer", "in-process"])
async def test_qemu_io_writes_on_two_disks_replay_equal_with_one_gapless_sequence(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path, producer_process: bool
) -> None:
    disks = two_disks(tmp_path)
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    # No heartbeats: the test compares the topic's last number with the tap's, exactly.
    settings = tap_settings(
        tmp_path, plan, producer_process=producer_process, heartbeat_interval_s=0
    )
    async with running_tap(settings) as tap:
        await wait_live(tap, vm_id)
        port = tap.nbd_port
        await run(
            "qemu-io",
            "-f",
            "raw",
            nbd_uri(port, vm_id, "d0"),
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 4k 8k",
            "-c",
            "write -P 0x33 33M 3M",  # spans an activity log extent boundary
            "-c",
            "write -z 200k 64k",
            "-c",
            "discard 40M 2M",
            "-c",
            "write -P 0x44 63M 1M",
            "-c",
            "flush",
        )
        await run(
            "qemu-io",
            "-f",
            "raw",
            nbd_uri(port, vm_id, "d1"),
            "-c",
            "write -P 0x55 0 4M",
            "-c",
            "write -z -u 1M 1M",
            "-c",
            "write -P 0x66 512 512",
            "-c",
            "write -P 0x77 -f 10M 64k",  # FUA
        )
        await wait_caught_up(tap, vm_id)
        status = tap.taps[vm_id].status()
        result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(d.path, r) for d, r in zip(disks, replays, strict=True)])
    assert result.last_seq == status["last_seq_assigned"]
    assert result.counts["WRITE"] >= 9
    assert result.counts["ZERO"] >= 2 and result.counts["TRIM"] >= 1
    assert result.counts["FLUSH"] >= 1


async def test_ext4_image_converted_through_the_tap_replays_equal(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    content = tmp_path / "content"
    (content / "docs").mkdir(parents=True)
    for i in range(40):
        (content / "docs" / f"file{i}.txt").write_text(f"file {i}\n" * (i * 200 + 1))
    (content / "blob.bin").write_bytes(bytes(range(256)) * 8192)
    image = tmp_path / "ext4.img"
    await run("mke2fs", "-q", "-t", "ext4", "-d", content, image, "48M")
    disks = [DiskSpec("root", tmp_path / "root.img", 48 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    async with running_tap(tap_settings(tmp_path, plan)) as tap:
        await wait_live(tap, vm_id)
        await run(
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            image,
            nbd_uri(tap.nbd_port, vm_id, "root"),
        )
        await wait_caught_up(tap, vm_id)
        result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert_replay_equals_source(result, [(image, replays[0])])
    await run("e2fsck", "-fn", replays[0])


@pytest.mark.parametrize("fast_writes", [True, False], ids=["c-write-path", "python-write-path"])
async def test_fio_verified_writes_from_four_connections_replay_equal(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path, fast_writes: bool
) -> None:
    disks = [DiskSpec("d0", tmp_path / "src.img", 64 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    async with running_tap(tap_settings(tmp_path, plan, fast_writes=fast_writes)) as tap:
        await wait_live(tap, vm_id)
        uri = nbd_uri(tap.nbd_port, vm_id, "d0")
        # Four connections, each verifying its own 16 MiB with crc32c.
        await run(
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            cwd=tmp_path,
        )
        # Then four connections overwriting the same 8 MiB: whatever order the writes
        # reach the disk in, the sequence must say the same order.
        await run(
            "fio",
            "--name=overlap",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=8M",
            "--io_size=16M",
            cwd=tmp_path,
        )
        await wait_caught_up(tap, vm_id)
        status = tap.taps[vm_id].status()
        result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert result.counts["WRITE"] >= 16384
    # Both write paths were taken (the C one for most writes), or only Python's.
    if fast_writes:
        assert 0.5 * result.counts["WRITE"] < status["fast_writes"] < result.counts["WRITE"]
    else:
        assert status["fast_writes"] == 0


async def test_writes_queued_during_the_first_full_sync_are_not_lost(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    """Writes arrive while the initial full sync is still running (in-band, one sequence)."""
    disks = [DiskSpec("d0", tmp_path / "src.img", 96 * MiB)]
    with disks[0].path.open("wb") as f:  # a pre-existing disk with data to sync
        for i in range(0, 96, 3):
            f.seek(i * MiB)
            f.write(bytes([i + 1]) * MiB)
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    # Paced so that the guest's writes certainly land while the full sync runs.
    settings = tap_settings(
        tmp_path, plan, resync_chunk_bytes=256 * 1024, resync_max_bytes_per_s=8 * MiB
    )
    async with running_tap(settings) as tap:
        await wait_until(lambda: tap.taps[vm_id].mode.value == "resyncing", "the full sync")
        uri = nbd_uri(tap.nbd_port, vm_id, "d0")
        writers = [
            run("qemu-io", "-f", "raw", uri, "-c", f"write -P {0xA0 + i} {i * 5}M 2M")
            for i in range(16)
        ]
        await asyncio.gather(*writers)
        await wait_caught_up(tap, vm_id)
        result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])
    assert result.writes_inside_resyncs >= 16, "the writes were meant to travel in-band"
    assert len(result.resyncs_completed) >= 1


async def test_an_idle_vm_publishes_heartbeats_in_its_gapless_sequence(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = two_disks(tmp_path, 8 * MiB)
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    settings = tap_settings(tmp_path, plan, heartbeat_interval_s=0.2)
    async with running_tap(settings) as tap:
        await wait_live(tap, vm_id)
        vm_tap = tap.taps[vm_id]
        await run(
            "qemu-io", "-f", "raw", nbd_uri(tap.nbd_port, vm_id, "d0"), "-c", "write -P 0x11 0 64k"
        )
        # Heartbeats may already have been numbered while qemu-io ran: count from here.
        written = vm_tap.last_seq_assigned
        before = vm_tap.stats.heartbeats
        await wait_until(
            lambda: vm_tap.stats.heartbeats >= before + 3, "three heartbeats after the write", 30
        )
        await wait_caught_up(tap, vm_id)
        beats = vm_tap.stats.heartbeats
        result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
        metrics = generate_latest(tap.registry).decode()
    assert_replay_equals_source(result, [(d.path, r) for d, r in zip(disks, replays, strict=True)])
    # Each heartbeat took the next number: the sequence stays gapless past the last write.
    assert result.markers["HEARTBEAT"] >= beats >= 3
    assert result.last_seq >= written + 3
    assert f'datamover_tap_heartbeats_total{{vm="{vm_id}"}}' in metrics
