"""Guarantee 3 across a SIGKILL: writes the tap acknowledged but had not yet published
are not lost for replication. The activity log names their regions; on restart the tap
starts a new epoch, continues the sequence from the topic and resyncs them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tap_helpers import (
    DiskSpec,
    MiB,
    TapProcess,
    assert_replay_equals_source,
    caught_up,
    nbd_uri,
    replay_onto_files,
    wait_until,
    write_plan,
)

from datapath.kafka import KafkaClusterSettings


async def test_tap_killed_during_fio_loses_no_write_after_restart(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    disks = [
        DiskSpec("d0", tmp_path / "src0.img", 64 * MiB),
        DiskSpec("d1", tmp_path / "src1.img", 32 * MiB),
    ]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    # A long linger keeps up to half a second of acknowledged writes unpublished at any
    # moment: without the activity log's resync they would be missing from the topic.
    # The producer in its own process: it must die with the tap.
    tap = TapProcess(
        tmp_path, plan, env={"DM_TAP_LINGER_MS": "500", "DM_TAP_PRODUCER_PROCESS": "true"}
    )
    await tap.start()
    fio = None
    try:
        await wait_until(lambda: _caught_up(tap), "the first full sync", limit_s=120)
        fio = await asyncio.create_subprocess_exec(
            "fio",
            "--name=crash",
            "--ioengine=nbd",
            f"--uri={nbd_uri(tap.nbd_port, vm_id, 'd0')}",
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=64M",
            "--time_based",
            "--runtime=60",
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        before = (await tap.vm_status())["last_seq_assigned"]
        await wait_until(lambda: _assigned_beyond(tap, before + 2000), "fio's writes to flow", 60)
        await tap.kill()
        await asyncio.wait_for(fio.wait(), 30)  # it fails: its server vanished
        fio = None
    finally:
        if fio is not None:
            fio.kill()
            await fio.wait()

    restarted = TapProcess(tmp_path, plan)
    await restarted.start()
    try:
        await wait_until(lambda: _caught_up(restarted), "the resync after the crash", limit_s=120)
        status = await restarted.vm_status()
        # One more write after the resync, through the second disk.
        proc = await asyncio.create_subprocess_exec(
            "qemu-io",
            "-f",
            "raw",
            nbd_uri(restarted.nbd_port, vm_id, "d1"),
            "-c",
            "write -P 0x5a 1M 1M",
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await proc.wait() == 0
        await wait_until(lambda: _caught_up(restarted), "the last write", limit_s=60)
    finally:
        await restarted.stop()
    result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert_replay_equals_source(result, [(d.path, r) for d, r in zip(disks, replays, strict=True)])
    assert result.epochs == [1, 2]
    assert status["epoch"] == 2
    assert status["resync"] is not None, "the activity log named no region to resync"
    assert status["resync"]["state"] == "complete"
    # The regions the activity log named, not the whole VM: fio wrote only d0, so a
    # resync reaching past d0's 64 MiB would be a full sync in disguise.
    assert status["resync"]["kind"] == "resync"
    assert 0 < status["resync"]["bytes_total"] <= 64 * MiB


async def _caught_up(tap: TapProcess) -> bool:
    return caught_up(await tap.vm_status())


async def _assigned_beyond(tap: TapProcess, seq: int) -> bool:
    return int((await tap.vm_status())["last_seq_assigned"]) > seq


async def test_tap_killed_during_a_resync_loses_no_write_made_meanwhile(
    source_cluster: KafkaClusterSettings, vm_id: str, tmp_path: Path
) -> None:
    """Writes published inside a resync bracket reach the target only when a bracket
    completes; if the tap dies before the bracket ends, its records wait downstream and are
    applied only with the next bracket, so the next resync must cover those writes too,
    even those Kafka acknowledged."""
    disks = [DiskSpec("d0", tmp_path / "src.img", 64 * MiB)]
    plan = write_plan(tmp_path / "plan.yaml", source_cluster, vm_id, disks)
    slow = {"DM_TAP_RESYNC_MAX_BYTES_PER_S": str(MiB), "DM_TAP_RETIRE_INTERVAL_S": "0.2"}
    uri = None
    # 1. Writes to the first 16 MiB, then a crash: the activity log names that region.
    first = TapProcess(tmp_path, plan, env=slow)
    await first.start()
    try:
        await wait_until(lambda: _caught_up(first), "the first full sync", 60)
        uri = nbd_uri(first.nbd_port, vm_id, "d0")
        await _qemu_io(uri, *(f"write -P {0x10 + i} {i}M 1M" for i in range(16)))
    finally:
        await first.kill()
    # 2. The resync of that region is slow; meanwhile the guest writes elsewhere, Kafka
    #    acknowledges it, the activity log retires it, and the tap dies again.
    second = TapProcess(tmp_path, plan, env=slow)
    await second.start()
    try:
        await wait_until(lambda: _resyncing(second), "the resync after the first crash", 60)
        uri = nbd_uri(second.nbd_port, vm_id, "d0")
        await _qemu_io(uri, *(f"write -P {0xE0 + i} {40 + i}M 1M" for i in range(4)))
        await wait_until(lambda: _all_acknowledged(second), "Kafka to acknowledge them", 60)
        await asyncio.sleep(1.5)  # idle long enough for the activity log to retire them
        assert await _resyncing(second), "the resync ended too early for this test"
    finally:
        await second.kill()
    third = TapProcess(tmp_path, plan)
    await third.start()
    try:
        await wait_until(lambda: _caught_up(third), "the resync after the second crash", 120)
    finally:
        await third.stop()
    result, replays = await replay_onto_files(source_cluster, vm_id, disks, tmp_path / "r")
    assert result.resyncs_abandoned, "the second bracket was meant to be cut short"
    assert result.epochs == [1, 2, 3]
    assert_replay_equals_source(result, [(disks[0].path, replays[0])])


async def _qemu_io(uri: str, *commands: str) -> None:
    argv = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        argv += ["-c", command]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
    assert await proc.wait() == 0


async def _resyncing(tap: TapProcess) -> bool:
    return bool((await tap.vm_status())["mode"] == "resyncing")


async def _all_acknowledged(tap: TapProcess) -> bool:
    status = await tap.vm_status()
    return bool(status["last_seq_acknowledged"] == status["last_seq_assigned"])
